"""The README's support matrix is generated from `hierui check` results (scripts/support_matrix.py), never
written by hand: its zoo rows must be what the checks give today."""

import importlib.util
from pathlib import Path

import pytest

from engine.check.selfcheck import DEFAULT_SPECS
from engine.models.zoo import member_names

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("support_matrix", ROOT / "scripts" / "support_matrix.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_REPORTS: dict[str, object] = {}


def _check(script, name: str):
    """script.check_model(name), run once per test session: the slow matrix test and the fast gpt2 row check
    the same model with the same default specs, so the second reads the first's report instead of rerunning it."""
    if name not in _REPORTS:
        _REPORTS[name] = script.check_model(name)
    return _REPORTS[name]


def _rows(block: str) -> dict[str, str]:
    return {line.split("|")[1].strip(): line for line in block.splitlines() if line.startswith("| `")}


def test_the_readme_matrix_has_a_row_per_family_and_a_column_per_spec():
    block = _script().readme_block()
    rows = _rows(block)
    assert all(f"`{name}`" in rows for name in member_names())
    header = next(line for line in block.splitlines() if line.startswith("| model"))
    assert [c.strip(" `") for c in header.strip("|").split("|")[1:]] == list(DEFAULT_SPECS)


@pytest.mark.slow
def test_the_readme_matrix_is_what_the_checks_give():
    """Run `hierui check` on every zoo member with every default spec; the README's rows must match (else run
    scripts/support_matrix.py)."""
    script = _script()
    reports = [(script.label(name), _check(script, name)) for name in member_names()]
    _head, body, notes = script.rows(reports)
    generated = {line.split("|")[1].strip(): line for line in body}
    written = _rows(script.readme_block())
    for name, line in generated.items():
        assert written.get(name) == line, f"README row of {name} is out of date: run scripts/support_matrix.py"
    # and hierui check passes on every family for every spec (none is skipped as not applicable either)
    failed = [(r.spec, r.check, r.reason) for _label, rep in reports for r in rep.results if r.status == "fail"]
    assert not failed and not notes


@pytest.mark.slow
def test_check_passes_on_the_embedded_model_for_every_spec(cli, tmp_path):
    import json

    # 4 steps and a 4×32 calibration: every check of every spec on the real model, at two thirds of the default cost
    small = ("--steps", "4", "--calib-samples", "4", "--calib-len", "32")
    result = cli("check", "--model", "smollm2-135m", *small, "--json", str(tmp_path / "check.json"))
    data = json.loads((tmp_path / "check.json").read_text())
    assert result.returncode == 0, [r for r in data["results"] if r["status"] == "fail"]
    assert [s for s in DEFAULT_SPECS] == list(dict.fromkeys(r["spec"] for r in data["results"]))


def test_one_zoo_member_checks_like_its_readme_row():
    """The fast representative: one family's row (gpt2: Conv1D, fused c_attn) regenerated and compared."""
    script = _script()
    report = _check(script, "tiny-random:gpt2")
    notes: dict = {}
    line = "| `tiny-random:gpt2` | " + " | ".join(script.cell(report, s, notes) for s in report.specs) + " |"
    written = _rows(script.readme_block())["`tiny-random:gpt2`"]
    assert [c.strip() for c in line.split("|") if "n/a" not in c] == [
        c.strip() for c in written.split("|") if "n/a" not in c
    ]
