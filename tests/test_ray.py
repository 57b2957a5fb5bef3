"""hierui batch --ray (engine.sweep.distributed): on a local Ray instance of 2 CPUs started by this module, a sweep
gives the tables of the same sweep run locally, survives a worker killed mid-sweep and a driver killed mid-sweep, and
--ray without Ray installed is one line, exit 2. No Ray process is left behind."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest

from engine.record.session import load_session
from engine.sweep.distributed import WORKERS_FILE, RayHooks, read_workers, run_ray_sweep
from engine.sweep.folder import complete_runs
from engine.sweep.ray_options import RayOptions
from engine.sweep.runner import run_sweep
from engine.sweep.sweeps import plan_sweep

TINY = {"model": "tiny-random", "max_new_tokens": 5, "calib": {"samples": 4, "length": 16, "seed": 0}}
PROMPTS = [
    {"prompt": "Answer A or B:", "choices": ["A", "B"]},
    {"prompt": "Hello there", "id": "hi"},
    {"prompt": "Once upon a time"},
]


def processes() -> dict[int, tuple[int, str]]:
    """Every process on this machine: pid → (parent pid, command line) (Linux /proc; empty elsewhere)."""
    found = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        found[int(entry.name)] = (parent, cmd)
    return found


def ray_processes(session: str) -> dict[int, str]:
    """The processes of the Ray instance `session` (its name is on their command lines) and their children (the
    workers: `ray::PairWorker`, …), leaving out any other Ray instance on the machine."""
    table = processes()
    ours = {pid for pid, (_parent, cmd) in table.items() if session in cmd and pid != os.getpid()}
    ours |= {pid for pid, (parent, _cmd) in table.items() if parent in ours}
    return {pid: table[pid][1] for pid in ours}


def wait_for(condition, timeout: float, every: float = 0.05) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(every)
    return condition()


@pytest.fixture(scope="module")
def cluster():
    """A local Ray instance of 2 CPUs for the whole module (its gcs address and session name), stopped at the end;
    the test fails if a process of that instance (or one of its workers) is still there a few seconds later."""
    ray = pytest.importorskip("ray")
    context = ray.init(
        num_cpus=2,
        object_store_memory=200 * 1024 * 1024,
        include_dashboard=False,
        log_to_driver=False,
        logging_level="ERROR",
    )
    session = Path(context.address_info["session_dir"]).name
    try:
        yield SimpleNamespace(address=context.address_info["gcs_address"], session=session)
    finally:
        started = set(ray_processes(session))
        ray.shutdown()

        def left():
            return {pid: cmd for pid, (_parent, cmd) in processes().items() if pid in started or session in cmd}

        assert wait_for(lambda: not left(), 20, 0.2), f"Ray left processes: {left()}"


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("ray") / "prompts.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS), encoding="utf-8")
    return path


def plan(prompts, **kw):
    return plan_sweep(prompts_file=prompts, **{**TINY, "specs": ["wanda:0.5", "none"], "modes": ["shared"], **kw})


# ------------------------------------------------------------------ comparing outputs


def close(a, b, path="") -> list:
    """Where `a` and `b` differ beyond float tolerance: floats (relative 1e-3, absolute 1e-5; a worker steps with
    1 thread, the local run with every core, so the last bits differ), the JSON text of the top-k lists, and
    everything else exactly."""
    if isinstance(a, str) and isinstance(b, str) and a[:1] == "[" and a != b:
        try:
            return close(json.loads(a), json.loads(b), path)
        except ValueError:
            return [(path, a, b)]
    if isinstance(a, float) and isinstance(b, float):
        same = (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-3, abs_tol=1e-5)
        return [] if same else [(path, a, b)]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [(path, "length", len(a), len(b))]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in close(x, y, f"{path}[{i}]")]
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [(path, "keys", sorted(a), sorted(b))]
        return [d for k in a for d in close(a[k], b[k], f"{path}.{k}")]
    return [] if a == b else [(path, a, b)]


def assert_same_output(local: Path, distributed: Path) -> None:
    """The same tables (schema, runs, values to float tolerance) and the same sessions' tokens."""
    for name in ("steps.parquet", "summary.parquet"):
        a, b = pq.read_table(local / name), pq.read_table(distributed / name)
        assert a.schema == b.schema, name
        assert a.column("run_id").to_pylist() == b.column("run_id").to_pylist(), name
        assert close(a.to_pylist(), b.to_pylist()) == [], name
    for path in sorted((local / "sessions").glob("*.jsonl")):
        other = load_session(distributed / "sessions" / path.name)
        mine = load_session(path)
        assert [s["token_d"] for s in mine.steps] == [s["token_d"] for s in other.steps]
        assert [s["token_p"] for s in mine.steps] == [s["token_p"] for s in other.steps]
    assert sorted(p.name for p in (local / "sessions").iterdir()) == sorted(
        p.name for p in (distributed / "sessions").iterdir()
    )


def run_lines(out: Path) -> list[str]:
    return [line["run_id"] for line in read_workers(out) if line.get("kind") == "run"]


# ------------------------------------------------------------------ the tests


def test_ray_sweep_equals_local_sweep(cluster, prompts, tmp_path):
    sweep = plan(prompts, modes=["shared", "free"])
    local = run_sweep(sweep, tmp_path / "local", batch_size=2)
    result = run_ray_sweep(sweep, tmp_path / "ray", RayOptions(address=cluster.address), batch_size=2)
    assert sorted(result.computed) == sorted(local.computed) and not result.skipped
    assert_same_output(tmp_path / "local", tmp_path / "ray")
    assert sorted(run_lines(tmp_path / "ray")) == sorted(r.run_id for r in sweep.runs())  # who ran each, once
    prunes = [line for line in read_workers(tmp_path / "ray") if line["kind"] == "prune"]
    assert {line["spec"] for line in prunes} == {"wanda:0.5", "none"}
    for spec in ("wanda:0.5", "none"):  # every worker that perturbed a spec found the same mask
        assert len({line["mask_hash"] for line in prunes if line["spec"] == spec}) == 1
    # rerun into the same OUT: nothing to do (no worker is started)
    assert run_ray_sweep(sweep, tmp_path / "ray", RayOptions(address=cluster.address)).computed == []


def test_ray_workers_stream_their_layers_when_the_plan_says_so(cluster, prompts, tmp_path):
    """A pair above the device's budget (hierui plan: streamed; here the plan's verdict is given) runs on Ray with
    every worker's decoder layers streamed from disk (engine.place.streaming), with the in-memory local sweep's
    output."""
    sweep = plan(prompts, specs=["wanda:0.5"])
    local = run_sweep(sweep, tmp_path / "local", batch_size=2)
    sweep.plan = {"placement": "streamed", "fits": False}
    result = run_ray_sweep(sweep, tmp_path / "ray", RayOptions(address=cluster.address), batch_size=2)
    assert sorted(result.computed) == sorted(local.computed)
    assert_same_output(tmp_path / "local", tmp_path / "ray")
    header = load_session(next((tmp_path / "ray" / "sessions").glob("*.jsonl"))).header
    assert header["plan"]["placement"] == "streamed"
    prunes = [line for line in read_workers(tmp_path / "ray") if line["kind"] == "prune"]
    local_hash = {line["mask_hash"] for line in prunes}
    assert len(local_hash) == 1  # every streamed worker found the same mask


class KillFirstWorker(RayHooks):
    """Kills the first worker's process (SIGKILL, by its pid) as soon as it is handed its first runs."""

    def __init__(self):
        self.killed = None
        self.states = []

    def worker_state(self, worker, state, spec, runs_done):
        self.states.append((worker, state))
        if self.killed is None and state in ("perturbing", "stepping"):
            self.killed = int(worker.rsplit(":", 1)[1])
            os.kill(self.killed, signal.SIGKILL)


def test_worker_killed_mid_sweep_its_runs_are_retried(cluster, prompts, tmp_path):
    """With the driver collecting the sessions (--ray-collect driver): what the killed worker was doing is lost
    and rerun by a live one; the output is still the local sweep's."""
    sweep = plan(prompts)
    hooks = KillFirstWorker()
    options = RayOptions(address=cluster.address, collect="driver")
    result = run_ray_sweep(sweep, tmp_path / "out", options, hooks=hooks, batch_size=1)
    assert hooks.killed is not None
    ids = [r.run_id for r in sweep.runs()]
    assert sorted(result.computed) == sorted(ids)  # every run exactly once
    assert sorted(complete_runs(sweep, tmp_path / "out")) == sorted(ids)
    assert sorted(run_lines(tmp_path / "out")) == sorted(ids)
    retried = [line for line in read_workers(tmp_path / "out") if line.get("attempt", 1) > 1]
    assert retried and all(line["pid"] != hooks.killed for line in retried)  # rerun by a live worker
    assert any(state == "restarting" for _w, state in hooks.states)
    run_sweep(sweep, tmp_path / "local", batch_size=1)
    assert_same_output(tmp_path / "local", tmp_path / "out")


def test_driver_killed_mid_sweep_rerun_computes_only_the_missing_runs(cluster, prompts, tmp_path):
    out = tmp_path / "out"
    many = tmp_path / "many.jsonl"
    many.write_text("".join(json.dumps({"prompt": f"Prompt number {i}:"}) + "\n" for i in range(8)), encoding="utf-8")
    args = ["--prompts", many, "--model", "tiny-random", "--prune", "wanda:0.5", "--prune", "none", "--mode", "shared"]
    args += ["--mode", "free", "--max-new-tokens", "12", "--calib-samples", "4", "--calib-len", "16", "-b", "1"]
    driver = subprocess.Popen(
        [sys.executable, "-m", "hierui", "batch", *map(str, args), "--ray", cluster.address, "--out", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "COLUMNS": "200"},
    )
    sweep = plan_sweep(
        prompts_file=many, **{**TINY, "max_new_tokens": 12, "specs": ["wanda:0.5", "none"], "modes": ["shared", "free"]}
    )
    try:
        assert wait_for(lambda: (out / WORKERS_FILE).is_file() and run_lines(out), 120), driver.stderr
    finally:
        driver.kill()  # SIGKILL: no cleanup of any kind
        driver.wait()
    # Ray ends the dead driver's workers; once they are gone nothing writes into OUT any more
    assert wait_for(lambda: not any("PairWorker" in cmd for cmd in ray_processes(cluster.session).values()), 30, 0.2)
    done = complete_runs(sweep, out)
    ids = [r.run_id for r in sweep.runs()]
    assert 0 < len(done) < len(ids)  # killed mid-sweep
    result = run_ray_sweep(sweep, out, RayOptions(address=cluster.address), batch_size=1)
    assert sorted(result.skipped) == sorted(done)
    assert sorted(result.computed) == sorted(set(ids) - set(done))  # only the missing runs
    assert sorted(complete_runs(sweep, out)) == sorted(ids)
    lines = run_lines(out)
    assert len(lines) == len(set(lines))  # nothing recorded twice
    assert set(result.computed) <= set(lines)
    assert len(pq.read_table(out / "summary.parquet")) == len(ids)


def test_ray_missing_is_one_line_exit_2(cli, prompts, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    monkeypatch.setenv("RAY_AUTH_MODE", "token")  # as it is: nothing to turn on in this process
    r = cli("batch", "--prompts", prompts, "--model", "tiny-random", "--ray", "auto", "--out", tmp_path / "out")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'hierui[ray]'" in lines[0] and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()
    r = cli("batch", "--prompts", prompts, "--model", "tiny-random", "--ray-cpus", "2")
    assert r.returncode == 2 and "--ray" in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.slow
@pytest.mark.embedded
def test_ray_sweep_equals_local_sweep_on_the_embedded_model(cluster, prompts, tmp_path):
    """attndrop:2 on a small self-generated calibration: a real perturbation that is quick to make."""
    two = prompts.with_name("two.jsonl")
    two.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS[:2]), encoding="utf-8")
    sweep = plan(two, model="smollm2-135m", specs=["attndrop:2", "none"], max_new_tokens=4, lens=False)
    run_sweep(sweep, tmp_path / "local")
    result = run_ray_sweep(sweep, tmp_path / "ray", RayOptions(address=cluster.address))
    assert sorted(result.computed) == sorted(r.run_id for r in sweep.runs())
    assert_same_output(tmp_path / "local", tmp_path / "ray")


def test_recipe_takes_the_ray_options(tmp_path, prompts):
    from engine.errors import HieruiError
    from engine.sweep.recipe import load_recipe

    path = tmp_path / "r.toml"
    base = f'prompts = ["{prompts}"]\nspecs = ["none"]\n'
    path.write_text(base + 'ray = "auto"\nray_cpus = 2\nray_collect = "driver"\n', encoding="utf-8")
    assert load_recipe(path).ray == {"address": "auto", "cpus": 2, "collect": "driver"}
    path.write_text(base + 'ray = "auto"\nray_collect = "nfs"\n', encoding="utf-8")
    with pytest.raises(HieruiError, match="unknown --ray-collect 'nfs'"):
        load_recipe(path)


def test_kld_on_ray_equals_the_local_kld(cluster, tmp_path, capsys):
    """hierui kld --ray: each spec scored by a worker; the same per-token values, tables and report as locally,
    and kld_workers.json says who scored what."""
    import numpy as np

    from engine.kld import corpus as kld
    from engine.kld.distributed import score_on_ray
    from engine.models.loading import load
    from engine.perturb import perturb
    from engine.sweep.ray_options import RayOptions
    from hierui.cli import main

    text = " ".join(f"Sentence number {i} tells of a {w} that walked to the river." for i, w in enumerate("abcde"))
    specs = ["magnitude:0.5", "wanda:0.5"]
    loaded = load("tiny-random", device="cpu")
    from engine.record.settings import calibration_for

    pairs = [
        perturb(loaded, s, use_cache=False, calib_options=calibration_for(s.split(":")[0]).to_dict()) for s in specs
    ]
    local = kld.score(loaded, pairs, text, "test", ctx=32)
    remote = score_on_ray("tiny-random", specs, text, "test", 32, None, RayOptions(address=cluster.address), "cpu")
    assert [r.spec for r in remote.results] == specs and [w["spec"] for w in remote.workers] == specs
    for a, b in zip(local.results, remote.results):
        for name in ("kl", "kl_rev", "nll_p", "dp"):
            np.testing.assert_allclose(b.tokens[name], a.tokens[name], rtol=1e-4, atol=1e-6, err_msg=name)
        assert (a.tokens["same_top"] == b.tokens["same_top"]).all()
    corpus = tmp_path / "c.txt"
    corpus.write_text(text)
    with pytest.raises(SystemExit) as e:
        main(
            ["kld", "-m", "tiny-random", "--device", "cpu", "-p", "magnitude:0.5", "--text", str(corpus)]
            + ["--ctx", "32", "--out", str(tmp_path / "o"), "--ray", cluster.address]
        )
    assert e.value.code in (0, None)
    said = capsys.readouterr()
    assert "Mean    KLD:" in said.out and "scored by" in said.err
    workers = json.loads((tmp_path / "o" / "kld_workers.json").read_text())
    assert [w["spec"] for w in workers] == ["magnitude:0.5"] and workers[0]["attempts"] == 1
    assert (tmp_path / "o" / "kld_summary.parquet").is_file()
