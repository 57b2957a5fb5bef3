"""Token ids read from files are checked before any model work (issue 25, class 2): every id a session holds (the
prompt's, each step's, the branch's), a kld base file's top-K ids and a cached calibration batch must be a row
of the model's embedding (its config's vocab_size, which may exceed the tokenizer's vocabulary): one line, exit
2, naming the file, the field, the step and the id, before the model loads (engine.models.tokens.check_token_ids).
`replay --rerun` feeds the recorded prompt ids and says when a tokenization now differs. Errors about a value a
session header gave name the session's field, not an option the user never typed (class 8)."""

import json

import pytest

from engine.errors import HieruiError
from engine.models.tokens import check_token_ids, embedding_rows
from engine.record.session import load_session
from engine.run import rerun as R
from engine.run.recorder import SessionRecorder
from engine.sweep.runner import FROM_FEEDS


@pytest.fixture(scope="module")
def good(tiny, tmp_path_factory):
    """A tiny-random magnitude:0.5 session of 3 steps."""
    from engine.perturb import perturb
    from engine.run.stepper import Stepper, StepSettings

    path = tmp_path_factory.mktemp("ids") / "good.jsonl"
    stepper = Stepper(perturb(tiny, "magnitude:0.5"), "Hello", StepSettings(max_new_tokens=3))
    SessionRecorder(stepper, [path]).run()
    return path


def _edited(good, tmp_path, name, header=None, step=None):
    """`good` with header fields replaced (`header`: {field: value}) and one step changed (`step`: (index, field,
    value), fed[1] as ("fed", 1))."""
    lines = [json.loads(line) for line in good.read_text(encoding="utf-8").splitlines()]
    lines[0].update(header or {})
    if step is not None:
        index, field, value = step
        if isinstance(field, tuple):
            lines[1 + index][field[0]][field[1]] = value
        else:
            lines[1 + index][field] = value
    path = tmp_path / name
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return path


@pytest.fixture()
def no_loading(monkeypatch):
    """Any model load fails the test: the checks must come first."""
    import engine.models.loading

    def refuse(*_args, **_kwargs):
        pytest.fail("a model was loaded")

    monkeypatch.setattr(engine.models.loading, "load", refuse)


def _one_line(run) -> str:
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert run.returncode == 2 and len(lines) == 1, run.stdout + run.stderr
    assert "Traceback" not in run.stdout + run.stderr
    return lines[0]


COMMANDS = {
    "attribute": lambda p: ("attribute", p, "--step", "2", "--device", "cpu"),
    "replay --rerun": lambda p: ("replay", p, "--rerun", "--device", "cpu"),
}
# the readers that check a session's token ids: batch --from too (it sweeps the prompt's text, but refuses a file
# holding an impossible id, as replay --rerun does)
ID_COMMANDS = {
    **COMMANDS,
    "batch --from": lambda p: ("batch", "--from", p, "-p", "int8", "--device", "cpu", "--out", p.parent / "o"),
}
PROMPT_ID = 1  # the position changed in prompt_ids


@pytest.mark.parametrize("command", sorted(ID_COMMANDS))
@pytest.mark.parametrize("bad", [-1, 260])  # tiny-random embeds ids 0 … 259
@pytest.mark.parametrize("where", ["prompt_ids", "step"])
def test_an_id_outside_the_vocabulary_is_one_line_before_loading(cli, good, tmp_path, no_loading, command, bad, where):
    """Guards against an IndexError inside the embedding after loading and pruning (attribute), and against a
    rerun that silently fed other ids."""
    if where == "prompt_ids":
        ids = load_session(good).header.prompt_ids
        path = _edited(
            good, tmp_path, "bad.jsonl", header={"prompt_ids": [*ids[:PROMPT_ID], bad, *ids[PROMPT_ID + 1 :]]}
        )
        shown = f"{path}: prompt_ids[{PROMPT_ID}] is {bad}"
    else:
        path = _edited(good, tmp_path, "bad.jsonl", step=(0, ("fed", 1), bad))
        shown = f"{path}: step 1: fed[1] is {bad}"
    line = _one_line(cli(*ID_COMMANDS[command](path)))
    assert shown in line and "expected a token id of tiny-random (0 … 259)" in line, line
    assert not (tmp_path / "o").exists()


def test_every_id_field_of_a_session_is_checked(good, tmp_path):
    """token_d, token_p, the top-k lists' ids, a branch's tokens: each one a model would read or compare."""
    session = load_session(good)
    R.check_session_ids(session, 260, "tiny-random")  # the recording itself passes
    cases = {
        "token_d": ((1, "token_d", 300), "step 2: token_d is 300"),
        "topk": ((2, "topk_p", [[1, "a", 0.5], [-3, "b", 0.1]]), "step 3: topk_p[1][0] is -3"),
    }
    for name, (step, shown) in cases.items():
        edited = load_session(_edited(good, tmp_path, f"{name}.jsonl", step=step))
        with pytest.raises(HieruiError, match=shown.replace("[", r"\[").replace("]", r"\]")):
            R.check_session_ids(edited, 260, "tiny-random")


def test_an_id_above_the_tokenizers_vocabulary_but_below_vocab_size_passes(cli, good, tmp_path, monkeypatch):
    """vocab_size (the embedding's rows) is the bound, not the tokenizer's size: a model whose embedding is padded
    past its tokenizer (here 300 rows, a 260-token tokenizer) reads id 280; the rerun goes on to load the model."""
    import engine.models.loading
    from engine.models.configs import TINY_CONFIG

    folder = tmp_path / "padded"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**TINY_CONFIG, "model_type": "llama", "vocab_size": 300}))
    from engine.models.tiny import byte_tokenizer

    byte_tokenizer().save_pretrained(str(folder))  # a checkpoint has its tokenizer (checked before loading)
    assert embedding_rows(str(folder)) == 300
    ids = load_session(good).header.prompt_ids
    path = _edited(good, tmp_path, "padded.jsonl", header={"model": str(folder), "prompt_ids": [*ids, 280]})
    R.check_session_ids(load_session(path), 300)
    with pytest.raises(HieruiError, match=r"prompt_ids\[\d+\] is 300"):
        check_token_ids([*ids, 300], 300, f"{path}: prompt_ids")

    def loaded(*_args, **_kwargs):
        raise HieruiError("the model loads now")

    monkeypatch.setattr(engine.models.loading, "load", loaded)
    line = _one_line(cli("replay", path, "--rerun", "--device", "cpu", "--model", folder))
    assert line == "error: the model loads now", line


def test_check_token_ids_reads_tensors_and_refuses_floats():
    import torch

    check_token_ids(torch.tensor([[0, 259]]), 260, "x")
    with pytest.raises(HieruiError, match=r"x\[1\]\[0\] is 260"):
        check_token_ids(torch.tensor([[0, 1], [260, 2]]), 260, "x")
    with pytest.raises(HieruiError, match="x holds float32 values"):
        check_token_ids(torch.tensor([0.5]), 260, "x")


# ------------------------------------------------------------------ replay --rerun feeds the recorded ids


def test_rerun_feeds_the_recorded_prompt_ids_and_says_when_a_tokenization_differs(cli, good, tmp_path):
    """The header's prompt changed but not its prompt_ids (as a newer tokenizer would make them differ): the rerun
    feeds the recorded ids, so it reproduces the recording, and one stderr line says which ids it used and how
    they differ (before: the prompt was tokenized again, silently, and the rerun did not match)."""
    path = _edited(good, tmp_path, "edited.jsonl", header={"prompt": "Hellx"})
    run = cli("replay", path, "--rerun", "--device", "cpu")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "rerun matches the recording" in run.stdout
    n = len(load_session(good).header.prompt_ids)
    note = f"the recorded prompt_ids ({n} tokens) and the prompt tokenized again ({n} tokens) first differ at position"
    assert note in run.stderr and "rerunning with the recorded ids" in run.stderr, run.stderr
    same = cli("replay", good, "--rerun", "--device", "cpu")
    assert same.returncode == 0 and "prompt_ids" not in same.stderr, same.stderr


def test_batch_from_says_when_the_recorded_ids_differ_from_the_text_it_sweeps(tiny, good, tmp_path):
    """batch --from sweeps the session's prompt as text, tokenized as every prompt of a sweep; where that differs
    from the prompt_ids the session recorded, one note says so and which it feeds (before: nothing was said).
    The notes a sweep shows once its tokenizer is loaded (engine.sweep.runner.tokenizer_notes), without a run."""
    from engine.sweep.runner import tokenizer_notes
    from engine.sweep.sweeps import plan_sweep

    ids = load_session(good).header.prompt_ids
    path = _edited(good, tmp_path, "edited.jsonl", header={"prompt_ids": [*ids[:-1], (ids[-1] + 1) % 260]})
    notes = tokenizer_notes(plan_sweep(from_session=path, specs=["int8"]), tiny.tokenizer)
    note = f"the recorded prompt_ids ({len(ids)} tokens) and the prompt tokenized again ({len(ids)} tokens) first "
    assert notes == [note + f"differ at position {len(ids) - 1} (counted from 0): {FROM_FEEDS}"], notes
    assert tokenizer_notes(plan_sweep(from_session=good, specs=["int8"]), tiny.tokenizer) == []
    other = plan_sweep(from_session=path, specs=["int8"], model="tiny-random:qwen2")
    assert tokenizer_notes(other, tiny.tokenizer) == []  # another model: the ids are of another vocabulary


@pytest.mark.slow
def test_batch_from_sweeps_the_prompt_text_and_says_when_the_recorded_ids_differ(cli, good, tmp_path):
    """The same through the CLI: the note on stderr, and the sweep's session holds the text's ids."""
    ids = load_session(good).header.prompt_ids
    path = _edited(good, tmp_path, "edited.jsonl", header={"prompt_ids": [*ids[:-1], (ids[-1] + 1) % 260]})
    out = tmp_path / "o"
    run = cli("batch", "--from", path, "-p", "int8", "--device", "cpu", "--max-new-tokens", "1", "--out", out)
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"first differ at position {len(ids) - 1} (counted from 0): {FROM_FEEDS}" in run.stderr, run.stderr
    assert load_session(out / "sessions" / "p000-int8-shared.jsonl").header.prompt_ids == ids  # the text's


# ------------------------------------------------------------------ kld base files and calibration caches


def test_a_base_file_with_an_id_outside_the_vocabulary_is_one_line_before_loading(cli, tmp_path, no_loading):
    """A top-K base file's ids index the perturbed model's log-probabilities: one out of range is refused before
    the model loads (before: a gather out of range inside the scoring, after loading and pruning)."""
    import torch

    from engine.kld import corpus as kldmod
    from engine.kld.base import BaseWriter
    from engine.models.tiny import byte_tokenizer

    tok, body = byte_tokenizer(), kldmod.suite_text("heldout")
    _ids, lay, _bos = kldmod.prepare(tok, body, 64, None, None)
    n, k = lay.total, 4
    writer = BaseWriter(tmp_path / "base.st", k=k)
    ids = torch.arange(n * k, dtype=torch.int32).reshape(n, k) % 260
    ids[2, 3] = 260
    writer.parts = {"topk_ids": [ids], "topk_logp": [torch.zeros(n, k)]}
    writer.parts |= {"tail_logp": [torch.zeros(n)], "nll": [torch.zeros(n)]}
    writer.write(tok, body, lay, "tiny-random")
    line = _one_line(
        cli("kld", "-m", "tiny-random", "--base", tmp_path / "base.st", "--ctx", 64, "--out", tmp_path / "o")
    )
    assert f"--base {tmp_path / 'base.st'}: topk_ids[2][3] is 260, expected a token id of tiny-random" in line, line


def test_a_cached_calibration_batch_with_an_id_outside_the_vocabulary_is_rebuilt(tiny, fresh_home):
    """A corrupt cache entry (here: an id the model has not) is recomputed, not fed to the model."""
    import torch

    from engine.perturb.calibration import build_calibration

    first = build_calibration(tiny, samples=2, length=8, seed=0)
    assert not first.from_cache
    cached = next((__import__("pathlib").Path(fresh_home) / "calib").glob("*.pt"))
    torch.save(torch.full((2, 8), 999, dtype=torch.long), cached)
    again = build_calibration(tiny, samples=2, length=8, seed=0)
    assert not again.from_cache and torch.equal(again.ids, first.ids)
    assert build_calibration(tiny, samples=2, length=8, seed=0).from_cache  # rebuilt and stored again


# ------------------------------------------------------------------ errors name where a value came from (class 8)


@pytest.mark.parametrize(
    "header, shown, blamed",
    [
        ({"dtype": "float64"}, "the session's dtype: unknown dtype 'float64'", "--dtype float64"),
        (
            {"perturbation": {"spec": "blockdrop:9"}},
            "the session's perturbation: invalid perturbation spec 'blockdrop:9': the model has 4 layers",
            "--prune",
        ),
        ({"model": "llama-9000"}, "names the model 'llama-9000': unknown model 'llama-9000'", "--model llama"),
    ],
)
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_an_error_about_a_header_value_names_the_session(
    cli, good, tmp_path, no_loading, command, header, shown, blamed
):
    """Guards against blaming an option the user never typed (or naming no source at all) for a value the
    session header gave."""
    path = _edited(good, tmp_path, "header.jsonl", header=header)
    line = _one_line(cli(*COMMANDS[command](path)))
    assert str(path) in line and shown in line and blamed not in line, line
