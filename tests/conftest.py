import os
import shutil
import tempfile
from pathlib import Path

import pytest

# Tests never touch the user's HIERUI_HOME. Each test session gets an empty HIERUI_HOME of its own, removed
# at the end, so no test reuses pruned weights, drop scores or calibration of an earlier run. Only models
# are shared between sessions (fetching and converting the embedded one takes a while): the persistent
# test store, HIERUI_TEST_HOME or ~/.cache/hierui-test, keeps them in models/ (HIERUI_MODELS points there)
# and the embedded GGUF in downloads/.
TEST_STORE = Path(os.environ.get("HIERUI_TEST_HOME") or Path.home() / ".cache" / "hierui-test")
_SESSION_HOME = tempfile.mkdtemp(prefix="hierui-test-home-")
os.environ["HIERUI_HOME"] = _SESSION_HOME
os.environ["HIERUI_MODELS"] = str(TEST_STORE / "models")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# `make test` runs two pytest-xdist workers on the 2-core machines: one torch thread each (before torch is
# imported), not two each fighting over two cores
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def pytest_unconfigure(config):
    shutil.rmtree(_SESSION_HOME, ignore_errors=True)


@pytest.fixture(scope="session")
def test_store() -> Path:
    """The persistent test store (models/, downloads/), shared between test sessions."""
    return TEST_STORE


@pytest.fixture(scope="session")
def tiny():
    from engine.models.loading import load

    return load("tiny-random", device="cpu")


@pytest.fixture(scope="session")
def tiny_calib(tiny):
    from engine.perturb.calibration import build_calibration

    return build_calibration(tiny, samples=8, length=32, seed=0, use_cache=False)


@pytest.fixture(scope="module")
def keep_the_allocator():
    """Streaming sets glibc's mmap threshold for the whole process (engine.place.streaming._return_freed_memory): not
    in the test process, whose other tests would then run with it. Modules of streaming tests use it for all
    their tests (pytestmark = pytest.mark.usefixtures("keep_the_allocator"))."""
    from engine.place import streaming

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(streaming, "_return_freed_memory", lambda: None)
        yield


@pytest.fixture(scope="module")
def tiny_streamed(keep_the_allocator):
    """tiny-random with its decoder layers streamed from disk (engine.place.streaming), one per test module."""
    from engine.models.loading import load

    return load("tiny-random", device="cpu", streamed=True)


@pytest.fixture()
def fresh_home(monkeypatch):
    """An empty HIERUI_HOME for tests of the caches."""
    with tempfile.TemporaryDirectory() as d:
        monkeypatch.setenv("HIERUI_HOME", d)
        yield d


@pytest.fixture(scope="session")
def embedded():
    from engine.models.loading import load

    return load("smollm2-135m", device="cpu")


@pytest.fixture(scope="session")
def hierui():
    """Run the real `hierui` command in a subprocess (`python -m hierui ARGS`): what exit codes, stray
    tracebacks, import time and the console script itself are about. Returns CompletedProcess."""
    import subprocess
    import sys

    def run(*args, env=None, timeout=300):
        return subprocess.run(
            [sys.executable, "-m", "hierui", *map(str, args)],
            capture_output=True,
            text=True,
            env={**os.environ, "COLUMNS": "200", **(env or {})},
            timeout=timeout,
        )

    return run


@pytest.fixture(scope="session")
def cli():
    """Run `hierui ARGS` in-process through hierui.cli.main (its one-line error handling and exit codes),
    with Typer's CliRunner isolating stdin, stdout and stderr: the fast way to test a command's contract.
    Returns an object with `returncode`, `stdout` and `stderr`, like a CompletedProcess."""
    import sys
    from types import SimpleNamespace

    from typer.testing import CliRunner

    from hierui.cli import main

    def run(*args, env=None):
        runner = CliRunner()
        env = {"COLUMNS": "200", **{k: str(v) for k, v in (env or {}).items()}}
        with runner.isolation(env=env) as (out, err, _):
            from hierui import output

            output.console.width = output.err_console.width = int(env["COLUMNS"])
            try:
                main([str(a) for a in args])
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            sys.stdout.flush()
            sys.stderr.flush()
            stdout, stderr = out.getvalue().decode(), err.getvalue().decode()
        return SimpleNamespace(returncode=code, stdout=stdout, stderr=stderr)

    return run
