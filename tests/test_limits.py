"""Limits (issue 11): every check that needs only the arguments, the config or the file system runs before a
model is loaded; value ranges live in engine.record.settings; a prompt longer than the context is refused in one
line or, with --truncate, cut on the left; `hierui show` stays fast and bounded on huge cells."""

import json
import time

import pytest

from engine.errors import HieruiError

LONG_PROMPT = "a" * 1100  # 1,100 byte tokens: beyond tiny-random's context of 1,024


def _one_line(run, message):
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert run.returncode == 2, run.stderr + run.stdout
    assert len(lines) == 1, run.stderr
    assert message in lines[0], lines[0]
    assert "Traceback" not in run.stderr + run.stdout


@pytest.fixture()
def no_load(monkeypatch):
    """Fail the test if anything tries to load a model."""
    import engine.models.loading

    def boom(*_a, **_k):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(engine.models.loading, "load", boom)


# ------------------------------------------------------------------ class 3: before loading


@pytest.mark.parametrize("command", ["prune", "explore"])
@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "tiny-random", "--prune", "checkpoint:/nonexistent"], "not found"),
        (["--model", "tiny-random", "--device", "tpu"], "unknown device 'tpu'"),
        (["--model", "tiny-random", "--device", "cuda:x"], "unknown device 'cuda:x'"),
        (["--model", "tiny-random", "--prune", "attndrop:4"], "drop at most 3"),
        (["--model", "tiny-random", "--prune", "blockdrop:9"], "drop at most 3"),
        (["--model", "tiny-random", "--prune", "magnitude:0.0001"], "prunes no weight"),
        (["--model", "tiny-random", "--prune", "wanda:0.01"], "prunes no weight"),
    ],
)
def test_argument_checks_run_before_loading(cli, no_load, command, args, message):
    _one_line(cli(command, *args), message)


def test_gpu_devices_that_are_not_here_fail_before_loading(cli, no_load):
    import torch

    if not torch.cuda.is_available():
        _one_line(cli("prune", "--model", "tiny-random", "--device", "cuda"), "no CUDA GPU")
        _one_line(cli("prune", "--model", "tiny-random", "--device", "cuda:0"), "no CUDA GPU")
    mps = getattr(torch.backends, "mps", None)
    if mps is None or not mps.is_available():
        _one_line(cli("explore", "--model", "tiny-random", "--device", "mps"), "no Apple GPU")


def test_check_device_parses_without_loading():
    from engine.models.devices import check_device

    assert check_device("AUTO") == "auto" and check_device(" cpu ") == "cpu"
    for bad in ("tpu", "cuda:", "cuda:-1", "cpu:0", "cuda:1:2", ""):
        if bad == "":
            assert check_device(bad) == "auto"
            continue
        with pytest.raises(HieruiError, match="unknown device"):
            check_device(bad)


def test_batch_and_replay_check_the_device_first(cli, tmp_path, no_load):
    prompts = tmp_path / "p.txt"
    prompts.write_text("hello\n")
    run = cli("batch", "-m", "tiny-random", "--prompts", prompts, "--device", "tpu", "--out", tmp_path / "o")
    _one_line(run, "unknown device 'tpu'")
    run = cli("batch", "-m", "tiny-random", "--prompts", prompts, "-p", "attndrop:7", "--out", tmp_path / "o")
    _one_line(run, "drop at most 3")


def test_tiny_config_matches_the_built_model():
    from engine.models.configs import TINY_CONFIG, read_config
    from engine.models.tiny import tiny_config

    built = tiny_config()
    assert read_config("tiny-random") == TINY_CONFIG
    for key, value in TINY_CONFIG.items():
        assert getattr(built, key) == value, key


def test_read_config_of_a_local_checkpoint_reads_its_shape(tmp_path):
    """A local checkpoint's config.json, read without loading: the shape the checks before loading use (a config
    without its model_type or shape is refused: tests/test_cli.py)."""
    from engine.models.configs import read_config, smallest_linear

    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "model_type": "llama",
                "vocab_size": 256,
                "num_hidden_layers": 2,
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_attention_heads": 4,
                "num_key_value_heads": 1,
                "max_position_embeddings": 128,
            }
        )
    )
    config = read_config(str(tmp_path))
    assert config["num_hidden_layers"] == 2
    assert smallest_linear(config) == (32, 32 * 8)  # fewest inputs: hidden; fewest weights: k/v (1 head of 8)


# ------------------------------------------------------------------ class 4: value ranges (engine.record.settings)


@pytest.mark.parametrize("t", [1e-30, 0.0, -1.0, 0.049, 100.5, float("inf"), float("nan")])
def test_temperature_outside_the_computable_range_is_refused(t):
    from engine.record.settings import StepSettings

    with pytest.raises(HieruiError, match="temperature must be"):
        StepSettings(temperature=t).validate()


@pytest.mark.parametrize("t", [0.05, 1.0, 100.0])
def test_temperature_bounds_are_inclusive(t):
    from engine.record.settings import StepSettings

    assert StepSettings(temperature=t).validate().temperature == t


def test_temperature_keys_stay_within_the_bounds():
    from engine.record.settings import MAX_TEMPERATURE, StepSettings

    top = StepSettings(temperature=MAX_TEMPERATURE)
    assert top.nudged_temperature(+1) is top


@pytest.mark.parametrize("t", ["1e-30", "inf", "nan", "1000"])
def test_cli_temperature_is_one_line(cli, t):
    _one_line(cli("explore", "--model", "tiny-random", "--temperature", t), "temperature must be")


@pytest.mark.parametrize("n", ["0", "-3"])
def test_cli_max_new_tokens_at_least_one(cli, n):
    _one_line(cli("explore", "--model", "tiny-random", "--max-new-tokens", n), "at least 1")


def test_max_new_tokens_beyond_the_context_is_refused_before_loading(cli, no_load):
    _one_line(cli("explore", "--model", "tiny-random", "--max-new-tokens", "5000"), "context of 1024 tokens")


def test_fit_context():
    from engine.record.settings import fit_context

    assert fit_context(10, 5, 100) == 10
    assert fit_context(10, 5, None) == 10
    assert fit_context(100, 10, 100, truncate=True) == 90
    with pytest.raises(HieruiError, match="exceed the model's context"):
        fit_context(100, 10, 100)
    with pytest.raises(HieruiError, match="does not fit"):
        fit_context(1, 100, 100, truncate=True)


@pytest.mark.parametrize("spec", ["wanda:０.５", "wanda:0.5_0", "wanda:1e-1", "wanda:nan", "attndrop:٤", "wanda:２:4"])
def test_specs_take_ascii_decimals_only(cli, spec):
    run = cli("prune", "--model", "tiny-random", "--prune", spec)
    _one_line(run, "invalid perturbation spec")


# ------------------------------------------------------------------ class 5: prompts longer than the context


def _long_prompts(tmp_path):
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"id": "long", "prompt": LONG_PROMPT}) + "\n")
    return path


def test_a_prompt_beyond_the_context_is_refused_in_one_line_before_loading(cli, tmp_path, no_load):
    args = ["batch", "-m", "tiny-random", "--raw", "-p", "none", "--max-new-tokens", "4"]
    run = cli(*args, "--prompts", _long_prompts(tmp_path), "--out", tmp_path / "out")
    _one_line(run, "exceed the model's context of 1,024 tokens")
    assert not (tmp_path / "out" / "sessions").exists()


@pytest.fixture(scope="module")
def pair(tiny):
    from engine.perturb import perturb

    return perturb(tiny, "magnitude:0.6")


def test_the_stepper_refuses_a_prompt_beyond_the_context(pair):
    from engine.record.settings import StepSettings
    from engine.run.stepper import Stepper

    with pytest.raises(HieruiError, match="--truncate"):
        Stepper(pair, LONG_PROMPT, StepSettings(raw=True, max_new_tokens=4))


def test_truncate_keeps_the_last_tokens_and_records_the_length(cli, tmp_path):
    from engine.record.session import load_session

    out = tmp_path / "out"
    args = ["batch", "-m", "tiny-random", "--raw", "-p", "none", "--max-new-tokens", "4", "--truncate"]
    run = cli(*args, "--prompts", _long_prompts(tmp_path), "--out", out)
    assert run.returncode == 0, run.stderr
    (path,) = sorted((out / "sessions").glob("*.jsonl"))
    session = load_session(path)
    header = session.header
    assert header["truncated_from"] >= 1100
    assert header["prompt_tokens"] == 1024 - 4 == len(header["prompt_ids"])
    assert len(session.steps) == 4


def test_truncate_keeps_the_last_tokens_and_steps(pair):
    from engine.models.tokens import prompt_ids
    from engine.record.settings import StepSettings
    from engine.run.stepper import Stepper

    full = prompt_ids(pair.tokenizer, LONG_PROMPT, raw=True)
    cut = Stepper(pair, LONG_PROMPT, StepSettings(raw=True, max_new_tokens=3, truncate=True))
    assert cut.row.truncated_from == len(full)
    assert cut.prompt_ids == full[-(1024 - 3) :]
    records = cut.run()
    assert len(records) == 3 and all(r["kl"] is not None for r in records)


# ------------------------------------------------------------------ class 10: show on pathological content


def _huge_session(tmp_path, recorded_line_count=3, size=2_000_000):
    from engine.record.session import FORMAT as SESSION_FORMAT

    header = {
        "format": SESSION_FORMAT,
        "version": 1,
        "model": "tiny-random",
        "perturbation": {"spec": "none"},
        "prompt": "p" * size,
        "mode": "shared",
        "temperature": 1.0,
        "max_new_tokens": recorded_line_count,
    }
    lines = [json.dumps(header)]
    for i in range(recorded_line_count):
        lines.append(json.dumps({"step": i, "token_d": 1, "token_p": 1, "text_d": "x" * (size // 2), "text_p": "y"}))
    path = tmp_path / "huge.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_show_of_a_2mb_session_is_fast_and_bounded(cli, tmp_path):
    path = _huge_session(tmp_path)
    start = time.perf_counter()
    run = cli("show", path)
    took = time.perf_counter() - start
    assert run.returncode == 0, run.stderr
    assert took < 5, took
    assert len(run.stdout) < 100_000
    assert "more characters; --full shows all" in run.stdout


def test_show_full_prints_everything(cli, tmp_path):
    path = _huge_session(tmp_path, recorded_line_count=1, size=30_000)
    run = cli("show", path, "--full")
    assert run.returncode == 0, run.stderr
    assert "--full shows all" not in run.stdout
    assert run.stdout.count("p") >= 30_000
    run = cli("replay", path, "--print", "--full")
    assert run.returncode == 0 and "--full shows all" not in run.stdout


@pytest.mark.parametrize(
    "args",
    [
        ["batch", "-m", "tiny-random", "--prompts", "p.txt", "--out", ""],
        ["batch", "-m", "tiny-random", "--prompts", "p.txt", "-o", " "],
        ["report", "runs/x", "--out="],
        ["prune", "--save", ""],
    ],
)
def test_an_empty_path_option_is_an_error_not_the_current_folder(cli, args):
    _one_line(cli(*args), "is empty: give a path")


def test_a_long_jsonl_id_is_shortened_with_a_hash(tmp_path):
    from engine.record.prompts import MAX_ID, read_prompts

    path = tmp_path / "p.jsonl"
    long_a, long_b = "x" * 300 + "a", "x" * 300 + "b"
    path.write_text("\n".join(json.dumps({"id": i, "prompt": "hi"}) for i in (long_a, long_b, "short")) + "\n")
    a, b, short = read_prompts(path)
    assert len(a.id) <= MAX_ID and len(b.id) <= MAX_ID and a.id != b.id
    assert short.id == "short"
    (tmp_path / f"{a.id}-checkpoint-{'y' * 60}-shared.jsonl").write_text("")  # a file name that fits


def test_prune_refuses_a_prompt_beyond_the_context_before_loading(cli, no_load):
    run = cli("prune", "--model", "tiny-random", "--raw", "--prompt", LONG_PROMPT, "--tokens", "4")
    _one_line(run, "exceed the model's context")
    run = cli("prune", "--model", "tiny-random", "--tokens", "2000")
    _one_line(run, "--tokens 2000 does not fit the model's context of 1024 tokens")


def test_rerun_of_a_truncated_session_that_stopped_early_keeps_the_same_prompt(pair, tiny, tmp_path):
    """The prompt was cut to fit the recorded max_new_tokens: a rerun of fewer steps must cut it the same way."""
    from engine.record.session import load_session
    from engine.record.settings import StepSettings
    from engine.run import rerun as R
    from engine.run.recorder import SessionRecorder
    from engine.run.stepper import Stepper

    stepper = Stepper(pair, LONG_PROMPT, StepSettings(raw=True, max_new_tokens=6, truncate=True))
    path = tmp_path / "cut.jsonl"
    SessionRecorder(stepper, [path]).run(stop=lambda: len(stepper.records) >= 2)  # ended before the limit
    session = load_session(path)
    kept = tmp_path / "again.jsonl"
    new = R.rerun(session, loaded=tiny, save=kept)
    assert load_session(kept).header["prompt_ids"] == session.header["prompt_ids"]
    assert len(new) == 2 and R.compare(session.steps, new).ok(1e-5)
