"""engine.run.open, the one way to open a pair: every command loads and perturbs its models through it (and
nowhere else), its request is checked before anything loads, and a pair streamed by --gpu-mem gives kld,
attribute and replay --rerun the numbers of the pair in memory."""

from __future__ import annotations

import ast
import json
import traceback
from pathlib import Path

import pytest

import engine.models.loading
import engine.run.open as opening
from engine.errors import HieruiError

ROOT = Path(__file__).resolve().parent.parent
TEXT = " ".join(f"Sentence number {i} tells of a {w} that walked to the river." for i, w in enumerate("abcdef"))
TINY = ("--model", "tiny-random", "--device", "cpu")
CALIB = ("--calib-samples", "4", "--calib-len", "16")


class Opened:
    """Counts what engine.run.open opens, and fails any model load that does not come through it."""

    def __init__(self, monkeypatch):
        self.dense = self.pairs = self.loads = 0
        real_load, real_dense, real_pair = engine.models.loading.load, opening.open_dense, opening.open_pair

        def load(*args, **kwargs):
            stack = "".join(traceback.format_stack())
            assert "engine/run/open.py" in stack, f"a model was loaded outside engine.run.open:\n{stack}"
            self.loads += 1
            return real_load(*args, **kwargs)

        def open_dense(*args, **kwargs):
            self.dense += 1
            return real_dense(*args, **kwargs)

        def open_pair(*args, **kwargs):
            self.pairs += 1
            return real_pair(*args, **kwargs)

        monkeypatch.setattr(engine.models.loading, "load", load)
        monkeypatch.setattr(opening, "open_dense", open_dense)
        monkeypatch.setattr(opening, "open_pair", open_pair)

    def take(self) -> tuple[int, int]:
        """(dense models opened, pairs opened) since the last take."""
        out = (self.dense, self.pairs)
        self.dense = self.pairs = self.loads = 0
        return out


def _ok(run):
    assert run.returncode == 0, (run.stdout, run.stderr)
    return run


def test_every_command_opens_its_models_through_engine_run_open(cli, monkeypatch, tmp_path):
    monkeypatch.setenv("HIERUI_HOME", str(tmp_path / "home"))  # noise stores a floor: none for the other tests
    opened = Opened(monkeypatch)
    out = tmp_path / "sweep"
    prompts = tmp_path / "p.txt"
    prompts.write_text("The river\nA story about\n")
    sweep = ("batch", *TINY, "--prompts", prompts, "-p", "magnitude:0.5", "-p", "wanda:0.5", *CALIB)
    _ok(cli(*sweep, "--max-new-tokens", "3", "--out", out, "--no-lens"))
    assert opened.take() == (1, 2)  # a sweep of two specs: the dense model once, each perturbed copy once
    session = sorted((out / "sessions").glob("*magnitude*.jsonl"))[0]
    _ok(cli("replay", session, "--rerun", "--device", "cpu"))
    assert opened.take() == (1, 1)
    _ok(cli("attribute", session, "--step", "1", "--device", "cpu"))
    assert opened.take() == (1, 1)
    text = tmp_path / "corpus.txt"
    text.write_text(TEXT)
    _ok(cli("kld", *TINY, "-p", "magnitude:0.5", "-p", "none", "--text", text, "--ctx", "32", "--out", tmp_path / "k"))
    assert opened.take() == (1, 2)  # one dense forward per window serves both specs
    _ok(cli("prune", *TINY, "-p", "magnitude:0.5", "--tokens", "2"))
    assert opened.take() == (1, 1)
    _ok(cli("check", *TINY, "-p", "none", "-p", "magnitude:0.5", "--steps", "2"))
    assert opened.take() == (1, 2)
    _ok(cli("noise", *TINY, "--dtypes", "float32,bfloat16", "--max-new-tokens", "2", "--prompts", prompts))
    assert opened.take() == (2, 0)  # the dense-only form: one load per dtype measured

    import hierui.cli.launch as launch

    made = []
    monkeypatch.setattr(launch, "interactive", lambda: True)
    monkeypatch.setattr(launch, "run_app", lambda app: made.append(app.pair_factory(lambda *_a, **_k: None)))
    _ok(cli("explore", *TINY, "-p", "magnitude:0.5", "--max-new-tokens", "2", "--sessions", tmp_path / "s"))
    assert opened.take() == (1, 1) and made[0].perturbed is not None


def _imports_of(path: Path) -> list[tuple[str, str]]:
    return [
        (node.module, alias.name)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.ImportFrom) and node.module
        for alias in node.names
    ]


def test_no_module_but_engine_run_open_loads_or_perturbs_a_model():
    """Statically: engine.models.loading.load and engine.perturb.perturb are imported by engine.run.open only
    (and a checkpoint spec, which loads the other model as part of perturbing, and @auto, which perturbs the same
    loaded model at its measured levels as part of perturbing: engine.sensitivity.auto)."""
    allowed = {"engine/run/open.py", "engine/perturb/checkpoint.py", "engine/sensitivity/auto.py"}
    offences = []
    for path in sorted([*ROOT.glob("engine/**/*.py"), *ROOT.glob("hierui/**/*.py")]):
        rel = str(path.relative_to(ROOT))
        for module, name in _imports_of(path):
            wanted = (module, name) in (("engine.models.loading", "load"), ("engine.perturb", "perturb"))
            if wanted and rel not in allowed and not rel.startswith("engine/perturb/"):
                offences.append(f"{rel} imports {name} from {module}")
    assert offences == []


@pytest.mark.parametrize(
    "options, message",
    [
        ({"model": "no-such-model"}, "unknown model"),
        ({"specs": ["wanda:1.5"]}, "wanda:1.5"),
        ({"dtype": "fp8"}, "unknown dtype 'fp8'"),
        ({"gpu_mem": "5XB"}, "--gpu-mem '5XB'"),
        ({"gpus": 0}, "--gpus 0: give at least 1"),
        ({"gpus": 2}, "--gpus 2: only 0 CUDA GPU(s) here"),  # this machine has none (as hierui plan says it)
        ({"device": "tpu"}, "tpu"),
    ],
)
def test_a_bad_request_is_one_line_before_anything_loads(monkeypatch, options, message):
    import torch

    if options.get("gpus") == 2 and torch.cuda.is_available():
        pytest.skip("the --gpus count check needs a machine without CUDA GPUs")
    monkeypatch.setattr(engine.models.loading, "load", lambda *a, **k: pytest.fail("loaded a model"))
    request = {"model": "tiny-random", "device": "cpu", **options}
    with pytest.raises(HieruiError) as info:
        opening.pair_request(**request)
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("command", ["kld", "attribute", "check", "noise", "explore", "batch", "prune"])
def test_gpu_mem_and_gpus_are_checked_on_every_command_before_loading(cli, monkeypatch, tmp_path, command):
    monkeypatch.setattr(engine.models.loading, "load", lambda *a, **k: pytest.fail("loaded a model"))
    session = tmp_path / "s.jsonl"  # attribute reads its session before the budget: any valid one will do
    session.write_text(
        (ROOT / "sessions" / "factual-wanda-0.5-shared.jsonl").read_text(encoding="utf-8"), encoding="utf-8"
    )
    prompts = tmp_path / "p.txt"
    prompts.write_text("x\n")
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    args = {
        "kld": ("kld", *TINY, "-p", "none", "--text", text, "--ctx", "32", "--out", tmp_path / "o"),
        "attribute": ("attribute", session, "--step", "1", "--device", "cpu"),
        "check": ("check", *TINY, "-p", "none"),
        "noise": ("noise", *TINY, "--prompts", prompts),
        "explore": ("explore", *TINY),
        "batch": ("batch", *TINY, "--prompts", prompts, "--out", tmp_path / "b"),
        "prune": ("prune", *TINY),
    }[command]
    bad_size = cli(*args, "--gpu-mem", "5XB")
    assert bad_size.returncode == 2 and "--gpu-mem '5XB'" in bad_size.stderr, bad_size.stderr
    assert len(bad_size.stderr.strip().splitlines()) == 1 and "Traceback" not in bad_size.stderr
    bad_gpus = cli(*args, "--gpus", "2")
    assert bad_gpus.returncode == 2 and "--gpus 2" in bad_gpus.stderr, bad_gpus.stderr
    assert len(bad_gpus.stderr.strip().splitlines()) == 1


# ------------------------------------------------------------------ streamed equals in memory


def _streaming_budget(request) -> str:
    """A --gpu-mem between the pair's streamed need and its in-memory peak on the device: the plan streams."""
    from dataclasses import replace

    from engine.run.plan import STAGES, stage_total

    plan = opening.plan_pair(request)
    memory = max(stage_total(plan.items, s, device_only=True) for s in STAGES)
    streamed = opening.plan_pair(replace(request, gpu_mem=memory - 1))
    assert streamed.placement == "streamed"
    return f"{(memory + streamed.streamed_device) // 2}B"


def test_a_streamed_request_opens_a_streamed_pair_equal_to_the_one_in_memory(keep_the_allocator):
    import torch

    from engine.anatomy.linears import decoder_layers
    from engine.place.streaming import is_streamed, resident

    request = opening.pair_request("tiny-random", ["magnitude:0.5"], device="cpu", use_cache=False, lens=False)
    budget = _streaming_budget(request)
    streamed = opening.pair_request(
        "tiny-random", ["magnitude:0.5"], device="cpu", gpu_mem=budget, use_cache=False, lens=False
    )
    plan = opening.plan_pair(streamed)
    pair = opening.open_pair(streamed, plan=plan)
    memory = opening.open_pair(request, plan=opening.plan_pair(request))
    assert is_streamed(pair.dense) and not is_streamed(memory.dense)
    assert pair.plan["placement"] == "streamed"
    for a, b in zip(decoder_layers(pair.perturbed), decoder_layers(memory.perturbed)):
        with resident(a):
            for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
                assert torch.equal(x, y), name


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """A tiny-random session (magnitude:0.5, free mode, so its top-1 flips) recorded through the CLI's batch."""
    from hierui.cli import main

    folder = tmp_path_factory.mktemp("recorded")
    prompts = folder / "p.txt"
    prompts.write_text("The river\n")
    with pytest.raises(SystemExit) as e:
        main(
            ["batch", *TINY, "--prompts", str(prompts), "-p", "magnitude:0.5", "--mode", "free"]
            + ["--max-new-tokens", "6", "--out", str(folder / "out"), "--no-cache"]
        )
    assert e.value.code in (0, None)
    return sorted((folder / "out" / "sessions").glob("*.jsonl"))[0]


def _budget_for(model="tiny-random", specs=("magnitude:0.5",), **workload) -> str:
    return _streaming_budget(opening.pair_request(model, list(specs), device="cpu", use_cache=False, **workload))


def test_streamed_kld_equals_the_kld_in_memory(cli, tmp_path, keep_the_allocator):
    import pyarrow.parquet as pq

    text = tmp_path / "corpus.txt"
    text.write_text(TEXT)
    args = ("kld", *TINY, "-p", "magnitude:0.5", "--text", text, "--ctx", "32", "--no-cache")
    budget = _budget_for(max_new_tokens=1, lens=False, prompt_tokens=32, perplexity=32)
    memory = _ok(cli(*args, "--out", tmp_path / "memory"))
    streamed = _ok(cli(*args, "--out", tmp_path / "streamed", "--gpu-mem", budget))
    assert "placement: streamed" in streamed.stdout and "placement: streamed" not in memory.stdout
    a = pq.read_table(tmp_path / "memory" / "kld_tokens.parquet").to_pylist()
    b = pq.read_table(tmp_path / "streamed" / "kld_tokens.parquet").to_pylist()
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        for key, value in x.items():
            if isinstance(value, float):
                assert y[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
            else:
                assert y[key] == value, key


def test_streamed_attribute_and_rerun_equal_the_ones_in_memory(cli, recorded, tmp_path, keep_the_allocator):
    budget = _budget_for(max_new_tokens=6)
    rows = {}
    for name, extra in (("memory", ()), ("streamed", ("--gpu-mem", budget))):
        out = tmp_path / f"{name}.jsonl"
        run = _ok(cli("attribute", recorded, "--step", "1", "--device", "cpu", "--out", out, "--no-cache", *extra))
        assert ("placement: streamed" in run.stdout) == bool(extra), run.stdout
        rows[name] = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows["memory"]) == len(rows["streamed"]) > 0
    for x, y in zip(rows["memory"], rows["streamed"]):
        for key, value in x.items():
            if isinstance(value, float):
                assert y[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
            else:
                assert y[key] == value, key
    rerun = _ok(
        cli("replay", recorded, "--rerun", "--device", "cpu", "--no-cache", "--tol", "1e-5", "--gpu-mem", budget)
    )
    assert "placement: streamed" in rerun.stdout and "rerun matches the recording" in rerun.stdout
