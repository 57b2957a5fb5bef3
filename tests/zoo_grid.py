"""Family × option grids for the zoo tests that keep the default run fast: every family runs once in the
default selection (with one option, rotating over the families so every option runs too), the rest of the
grid is marked `slow` (CI's `make test` runs it all; `make test-fast` skips it)."""

import pytest


def grid(families, options):
    """pytest.param(family, option) for the whole grid; (family i, option i mod n) fast, the others slow."""
    families, options = list(families), list(options)
    return [
        pytest.param(family, option, marks=() if j == i % len(options) else pytest.mark.slow)
        for i, family in enumerate(families)
        for j, option in enumerate(options)
    ]
