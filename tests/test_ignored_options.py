"""An option that has no effect in the mode chosen is refused with one line, exit 2, before any model loads (issue
25, class 7; the rule: hierui.cli.checks.refuse_unused): replay's rerun options without --rerun, explore
--from-kld's prompt, a --model or --calib that names something else than the file it confirms, --seed without
sampling, calibration options with specs that calibrate nothing. --model repeating exactly what the file names
stays allowed (the trust policy, engine.models.trust)."""

import json

import pytest

from engine.run.recorder import SessionRecorder


@pytest.fixture(scope="module")
def session(tiny, tmp_path_factory):
    """A tiny-random magnitude:0.5 session of 2 steps (no calibration)."""
    from engine.perturb import perturb
    from engine.run.stepper import Stepper, StepSettings

    path = tmp_path_factory.mktemp("ignored") / "s.jsonl"
    SessionRecorder(Stepper(perturb(tiny, "magnitude:0.5"), "Hello", StepSettings(max_new_tokens=2)), [path]).run()
    return path


@pytest.fixture()
def no_loading(monkeypatch):
    """Any model load or app start fails the test: the refusal must come first."""
    import engine.models.loading

    def refuse(*_args, **_kwargs):
        pytest.fail("a model was loaded")

    monkeypatch.setattr(engine.models.loading, "load", refuse)
    monkeypatch.setattr("hierui.explorer.app.HieruiApp.run", lambda self: pytest.fail("the explorer started"))


def _one_line(run) -> str:
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert run.returncode == 2 and len(lines) == 1, run.stdout + run.stderr
    assert "Traceback" not in run.stdout + run.stderr
    return lines[0]


def _kld_folder(tmp_path, model="tiny-random", specs=("magnitude:0.5",)):
    folder = tmp_path / "kld"
    folder.mkdir(exist_ok=True)
    worst = [{"spec": s, "rank": 1, "context": "The cat sat on the", "kl": 2.5, "text": " mat"} for s in specs]
    (folder / "kld_worst.json").write_text(json.dumps({"model": model, "corpus": "heldout", "ctx": 64, "worst": worst}))
    return folder


# each: (command line, with {s} the session and {k} a kld folder, {t} the temporary folder; the line's words)
REFUSED = {
    "replay rerun options without --rerun": (
        "replay {s} --save {t}/F.jsonl --tol 5 --dtype float16",
        "error: --dtype, --tol, --save only apply with --rerun",
    ),
    "replay --model without --rerun": ("replay {s} --model tiny-random", "--model only applies with --rerun"),
    "replay --print with --rerun": ("replay {s} --rerun --print --steps", "--print, --steps do nothing with --rerun"),
    "replay --rerun, another model": (
        "replay {s} --rerun --model tiny-random:llama",
        "--model tiny-random:llama: {s} names the model 'tiny-random', and --model only confirms it here",
    ),
    "replay --rerun, another spec": ("replay {s} --rerun --prune wanda:0.5", "--prune only confirms it here"),
    "replay --rerun, a calibration file the session lacks": (
        "replay {s} --rerun --calib {t}/c.txt",
        "--calib {t}/c.txt: {s} was recorded with no calibration",
    ),
    "attribute, another model": ("attribute {s} --model smollm2-135m", "--model only confirms it here"),
    "explore --from-kld, another model": (
        "explore --from-kld {k} --model smollm2-135m",
        "--model smollm2-135m: {k}/kld_worst.json names the model 'tiny-random', and --model only confirms it here",
    ),
    "explore --from-kld --prompt": (
        "explore --from-kld {k} --prompt hi --raw",
        "--prompt, --raw do nothing with --from-kld: the prompt is the raw text before the run's token",
    ),
    "explore --from-kld, a spec it lacks": (
        "explore --from-kld {k} --prune wanda:0.5",
        "--prune wanda:0.5: {k}/kld_worst.json holds the worst tokens of magnitude:0.5: pick one",
    ),
    "explore --worst without --from-kld": ("explore -m tiny-random --worst 2", "--worst only applies with --from-kld"),
    "explore --seed without --sample": ("explore -m tiny-random --seed 3", "--seed only applies with --sample"),
    "explore calibration, no spec calibrates": (
        "explore -m tiny-random -p magnitude:0.5 --calib-len 8",
        "--calib-len does nothing with --prune magnitude:0.5: it calibrates nothing",
    ),
    "batch --seed without --sample": (
        "batch --prompts {t}/p.txt -m tiny-random -p none --seed 3 --out {t}/o",
        "--seed only applies with --sample",
    ),
    "batch calibration, no spec calibrates": (
        "batch --prompts {t}/p.txt -m tiny-random -p magnitude:0.5 -p none --calib-samples 4 --out {t}/o",
        "--calib-samples does nothing with --prune magnitude:0.5, none: they calibrate nothing",
    ),
    "prune calibration, no spec calibrates": ("prune -m tiny-random -p int8 --calib-seed 3", "it calibrates nothing"),
    "plan calibration, no spec calibrates": ("plan -m tiny-random -p none --calib-len 8", "it calibrates nothing"),
    "kld calibration, no spec calibrates": (
        "kld -m tiny-random -p magnitude:0.5 --calib-len 8 --out {t}/o",
        "it calibrates nothing",
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_an_option_without_effect_is_refused_in_one_line_before_loading(cli, session, tmp_path, no_loading, case):
    """Guards against options silently ignored (or silently replaced by a file's values)."""
    (tmp_path / "p.txt").write_text("Hello\n")
    (tmp_path / "c.txt").write_text("The quick brown fox jumps over the lazy dog. " * 20)
    names = {"s": session, "k": _kld_folder(tmp_path), "t": tmp_path}
    command, words = (text.format(**names) for text in REFUSED[case])
    line = _one_line(cli(*command.split()))
    assert words in line, line
    assert not (tmp_path / "o").exists() and not (tmp_path / "F.jsonl").exists()


def test_replay_steps_and_full_only_with_print_where_the_explorer_opens(cli, session, no_loading, monkeypatch):
    import hierui.cli.launch

    monkeypatch.setattr(hierui.cli.launch, "interactive", lambda: True)
    assert "--steps, --full only apply with --print" in _one_line(cli("replay", session, "--steps", "--full"))


def test_what_a_file_names_repeated_exactly_is_allowed(cli, session, tmp_path):
    """The trust policy's confirmation: the same model (or the same weights by another name) and the same spec
    pass the check and reach the command's next step."""
    folder = _kld_folder(tmp_path)
    terminal = "explore needs an interactive terminal"
    assert terminal in _one_line(cli("explore", "--from-kld", folder, "--model", "tiny-random", "-p", "magnitude:0.50"))
    run = cli("replay", session, "--rerun", "--device", "cpu", "--model", "TINY-RANDOM", "--prune", "magnitude:0.5")
    assert run.returncode == 0 and "rerun matches the recording" in run.stdout, run.stdout + run.stderr


def test_show_steps_or_full_on_a_folder_is_refused(cli, tmp_path):
    """`show FOLDER --steps` (or --full) printed exactly what `show FOLDER` prints: options without effect."""
    (tmp_path / "sessions").mkdir()
    run = cli("show", tmp_path, "--steps")
    assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1
    assert "--steps only applies to a session file" in run.stderr


def _kld_manifest(folder, calibration):
    """A kld.json beside _kld_folder's kld_worst.json, recording `calibration` (spec → its settings)."""
    manifest = {"format": "hierui-kld", "version": 1, "model": "tiny-random", "calibration": calibration}
    (folder / "kld.json").write_text(json.dumps({**manifest, "specs": list(calibration)}))
    return folder


@pytest.fixture()
def opened(monkeypatch):
    """explore's pair request as it would open, without a terminal, a model or the app."""
    import hierui.cli.launch
    import hierui.explorer.app

    seen = {}

    def plan(request, *_args, **_kwargs):
        seen["request"] = request

    monkeypatch.setattr(hierui.explorer.app, "HieruiApp", lambda **kwargs: None)
    monkeypatch.setattr(hierui.cli.launch, "interactive", lambda: True)
    monkeypatch.setattr(hierui.cli.launch, "print_plan", plan)
    monkeypatch.setattr(hierui.cli.launch, "run_app", lambda app: None)
    return seen


def test_explore_from_kld_opens_the_calibration_the_kld_run_recorded(cli, tmp_path, opened):
    """Guards against explore --from-kld opening the run's spec with the default calibration (a model other than
    the one that produced the worst tokens): kld.json's calibration of the spec is used; a folder without
    kld.json (an older hierui) keeps the default."""
    recorded = {"source": None, "samples": 4, "length": 16, "seed": 0}
    folder = _kld_folder(tmp_path, specs=("wanda:0.5",))
    run = cli("explore", "--from-kld", folder, "--device", "cpu")
    assert run.returncode == 0, run.stdout + run.stderr
    assert opened["request"].calib["samples"] != 4  # no kld.json: the default, as before
    _kld_manifest(folder, {"wanda:0.5": recorded})
    run = cli("explore", "--from-kld", folder, "--device", "cpu")
    assert run.returncode == 0, run.stdout + run.stderr
    assert opened["request"].calib == recorded
    confirmed = cli("explore", "--from-kld", folder, "--device", "cpu", "--calib-samples", "4", "--calib-len", "16")
    assert confirmed.returncode == 0 and opened["request"].calib == recorded, confirmed.stderr


def test_explore_from_kld_calibration_options_only_confirm_the_runs(cli, tmp_path, no_loading):
    """Guards against --calib-samples/--calib-len/--calib-seed/--calib replacing the kld run's calibration with
    --from-kld (another model than the run's): a different value is one line, exit 2, before anything loads."""
    (tmp_path / "c.txt").write_text("The quick brown fox jumps over the lazy dog. " * 20)
    folder = _kld_manifest(
        _kld_folder(tmp_path, specs=("wanda:0.5",)),
        {"wanda:0.5": {"source": None, "samples": 4, "length": 16, "seed": 0}},
    )
    line = _one_line(cli("explore", "--from-kld", folder, "--calib-samples", "8", "--calib-len", "16"))
    assert "--calib-samples 8: " in line and "records wanda:0.5 calibrated with --calib-samples 4" in line, line
    assert "--calib-seed 3: " in _one_line(cli("explore", "--from-kld", folder, "--calib-seed", "3"))
    line = _one_line(cli("explore", "--from-kld", folder, "--calib", tmp_path / "c.txt"))
    assert "sampled itself" in line and "leave --calib out" in line, line
    (folder / "kld.json").write_text("{not json")
    assert "not a readable kld.json" in _one_line(cli("explore", "--from-kld", folder))
