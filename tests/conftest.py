import os
import tempfile

import pytest

# Tests never touch the user's cache, except for the embedded model, which is shared across runs
# (fetching and converting it takes a while): HIERUI_TEST_HOME or ~/.cache/hierui-test.
_HOME = os.environ.get("HIERUI_TEST_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "hierui-test")
os.environ["HIERUI_HOME"] = _HOME
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


@pytest.fixture(scope="session")
def tiny():
    from engine.models import load

    return load("tiny-random", device="cpu")


@pytest.fixture(scope="session")
def tiny_calib(tiny):
    from engine.calibration import build_calibration

    return build_calibration(tiny, samples=8, length=32, seed=0, use_cache=False)


@pytest.fixture()
def fresh_home(monkeypatch):
    """An empty HIERUI_HOME for tests of the caches."""
    with tempfile.TemporaryDirectory() as d:
        monkeypatch.setenv("HIERUI_HOME", d)
        yield d


@pytest.fixture(scope="session")
def embedded():
    from engine.models import load

    return load("smollm2-135m", device="cpu")
