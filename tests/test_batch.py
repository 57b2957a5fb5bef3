"""hierui batch: prompt files, planning checks, resume after an interruption, the tables and their schema, the CLI."""

import json
import shutil

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from engine.errors import HieruiError
from engine.record import schema
from engine.record.prompts import read_prompts
from engine.record.session import load_session
from engine.record.settings import StepSettings
from engine.sweep.folder import choices_path, complete_runs
from engine.sweep.runner import run_sweep
from engine.sweep.sweeps import SweepHooks, plan_sweep
from engine.sweep.tables import group_summary

TINY = {"model": "tiny-random", "max_new_tokens": 5, "calib": {"samples": 4, "length": 16, "seed": 0}}
PROMPTS = [{"prompt": "Answer A or B:", "choices": ["A", "B"]}, {"prompt": "Hello there", "id": "hi"}]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def tables(out):
    return {name: pq.read_table(out / name) for name in ("steps.parquet", "summary.parquet")}


def assert_same_tables(a, b):
    ta, tb = tables(a), tables(b)
    for name in ta:
        assert ta[name].schema == tb[name].schema, name
        assert ta[name].to_pylist() == tb[name].to_pylist(), name
    assert (a / "summary.csv").read_bytes() == (b / "summary.csv").read_bytes()


class Recorder(SweepHooks):
    """Counts what run_sweep does; `stop_at=(run index, step index)` raises Ctrl-C there."""

    def __init__(self, stop_at=None):
        self.started, self.stop_at = [], stop_at

    def run_started(self, run, max_tokens):
        self.started.append(run.run_id)

    def step(self, run, record):
        if self.stop_at == (len(self.started) - 1, record["step"]):
            raise KeyboardInterrupt


@pytest.fixture(scope="module")
def sweep_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("batch")
    return {"jsonl": write_jsonl(d / "prompts.jsonl", PROMPTS)}


def plan(sweep_files, **kw):
    return plan_sweep(
        prompts_file=sweep_files["jsonl"], **{**TINY, "specs": ["wanda:0.5", "none"], "modes": ["shared", "free"], **kw}
    )


@pytest.fixture(scope="module")
def uninterrupted(sweep_files, tmp_path_factory):
    """One whole sweep, never interrupted: 2 prompts × 2 specs × 2 modes."""
    out = tmp_path_factory.mktemp("whole") / "out"
    sweep = plan(sweep_files)
    result = run_sweep(sweep, out, batch_size=1)
    assert result.computed == [r.run_id for r in sweep.runs()] and not result.skipped
    return sweep, out


# ------------------------------------------------------------------ prompt files and planning (no model)


def test_read_prompts_text_and_jsonl(tmp_path):
    text = tmp_path / "p.txt"
    text.write_text("first prompt\n\n  \nsecond {not json}\n", encoding="utf-8")
    assert [(p.id, p.prompt, p.choices) for p in read_prompts(text)] == [
        ("p000", "first prompt", None),
        ("p001", "second {not json}", None),
    ]
    rows = [{"prompt": "q one", "choices": ["A", "B"]}, {"prompt": "q two", "id": "my id/2"}]
    items = read_prompts(write_jsonl(tmp_path / "p.jsonl", rows))
    assert [(p.id, p.prompt, p.choices) for p in items] == [("p000", "q one", ["A", "B"]), ("my_id_2", "q two", None)]


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("missing.txt", None, "missing.txt: not found"),
        ("empty.txt", "\n \n", "empty.txt: the file is empty"),
        ("noprompt.jsonl", '{"prompt": "ok"}\n{"text": "x"}\n', 'line 2 has no "prompt"'),
        ("bad.jsonl", '{"prompt": "ok"\n', "line 1 is not valid JSON"),
        ("dup.jsonl", '{"prompt": "a", "id": "x"}\n{"prompt": "b", "id": "x"}\n', "'x' is used twice"),
        ("choices.jsonl", '{"prompt": "a", "choices": "AB"}\n', "list of at least two"),
    ],
)
def test_bad_prompt_files(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(HieruiError, match=message):
        read_prompts(path)


def test_plan_checks_before_loading(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("hi\n", encoding="utf-8")
    with pytest.raises(HieruiError, match="unknown method 'foo'"):
        plan_sweep(prompts_file=prompts, model="tiny-random", specs=["wanda:0.5", "foo:0.5"])
    with pytest.raises(HieruiError, match="unknown mode 'teacher'"):
        plan_sweep(prompts_file=prompts, model="tiny-random", modes=["shared", "teacher"])
    with pytest.raises(HieruiError, match="exactly one of --prompts FILE or --from SESSION"):
        plan_sweep(model="tiny-random")
    with pytest.raises(HieruiError, match="max new tokens"):
        plan_sweep(prompts_file=prompts, model="tiny-random", max_new_tokens=0)
    sweep = plan_sweep(
        prompts_file=prompts, model="tiny-random", specs=["wanda:2:4", "none", "none"], modes=["free", "shared"]
    )
    assert [r.run_id for r in sweep.runs()] == [
        "p000-wanda-2of4-free",
        "p000-wanda-2of4-shared",
        "p000-none-free",
        "p000-none-shared",
    ]


# ------------------------------------------------------------------ resume


def test_resume_after_ctrl_c_equals_uninterrupted(sweep_files, uninterrupted, tmp_path):
    sweep, whole = uninterrupted
    runs = [r.run_id for r in sweep.runs()]
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C at step 2 of the fourth run
        run_sweep(plan(sweep_files), out, hooks=Recorder(stop_at=(3, 2)), batch_size=1)
    assert complete_runs(sweep, out) == runs[:3]
    cut = load_session(out / "sessions" / f"{runs[3]}.jsonl")
    assert not cut.complete and len(cut.steps) == 3
    assert not (out / "steps.parquet").exists()

    again = Recorder()
    result = run_sweep(plan(sweep_files), out, hooks=again, batch_size=1)
    assert result.skipped == runs[:3]
    assert result.computed == again.started == runs[3:]  # the cut run again from scratch, then the rest
    assert_same_tables(out, whole)


def test_resume_recomputes_only_missing_and_truncated_runs(uninterrupted, sweep_files, tmp_path):
    sweep, whole = uninterrupted
    out = tmp_path / "out"
    shutil.copytree(whole, out)
    runs = [r.run_id for r in sweep.runs()]
    sessions = out / "sessions"
    gone, cut = runs[1], runs[6]
    (sessions / f"{gone}.jsonl").unlink()
    lines = (sessions / f"{cut}.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    (sessions / f"{cut}.jsonl").write_text("".join(lines[:2]) + lines[2][:10], encoding="utf-8")  # + a torn line
    (out / "steps.parquet").unlink()
    kept = {p.name: p.stat().st_mtime_ns for p in sessions.iterdir() if p.stem not in (gone, cut)}

    recorder = Recorder()
    result = run_sweep(plan(sweep_files), out, hooks=recorder, batch_size=1)
    assert result.computed == recorder.started == [gone, cut]
    assert {p.name: p.stat().st_mtime_ns for p in sessions.iterdir() if p.stem not in (gone, cut)} == kept
    assert load_session(sessions / f"{cut}.jsonl").complete
    assert_same_tables(out, whole)

    nothing = Recorder()
    assert run_sweep(plan(sweep_files), out, hooks=nothing, batch_size=1).computed == [] and nothing.started == []
    assert_same_tables(out, whole)


def test_resume_with_other_settings_is_refused(uninterrupted, sweep_files):
    _, out = uninterrupted
    with pytest.raises(HieruiError, match="holds another sweep .*specs"):
        run_sweep(plan(sweep_files, specs=["magnitude:0.5"]), out)
    with pytest.raises(HieruiError, match="holds another sweep .*settings"):
        run_sweep(plan(sweep_files, max_new_tokens=3), out)


# ------------------------------------------------------------------ the tables


def test_tables_none_is_exactly_zero_and_choices_give_sub_columns(uninterrupted):
    sweep, out = uninterrupted
    steps, summary = tables(out)["steps.parquet"].to_pylist(), tables(out)["summary.parquet"].to_pylist()
    assert [r["run_id"] for r in summary] == sorted(r.run_id for r in sweep.runs())
    assert len(steps) == sum(r["steps"] for r in summary)
    assert [(r["run_id"], r["step"]) for r in steps] == sorted((r["run_id"], r["step"]) for r in steps)
    schema = tables(out)["steps.parquet"].schema
    for name in ("emb_cos", "emb_rel", "emb_perp", "emb_cos_est", "sub_p_d", "sub_p_p"):
        assert str(schema.field(name).type) == "list<element: double>", name
    layers = 4 + 1
    assert all(len(r["emb_cos"]) == layers for r in steps)

    none = [r for r in steps if r["spec"] == "none"]
    assert none and all(r["kl"] == 0 and r["tv"] == 0 and r["top1_agree"] == 1 for r in none)
    wanda = [r for r in steps if r["spec"] == "wanda:0.5"]
    assert any(r["kl"] > 0 for r in wanda)

    with_choices = [r for r in steps if r["prompt_id"] == "p000"]
    assert with_choices and all(r["sub_kl"] is not None and len(r["sub_p_d"]) == 2 for r in with_choices)
    assert all(r["sub_kl"] is None for r in steps if r["prompt_id"] == "hi")

    for row in summary:
        for name in (
            "kl_mean",
            "kl_p50",
            "kl_p90",
            "kl_p99",
            "tv_mean",
            "tv_p99",
            "same_top1_rate",
            "emb_cos_final_mean",
            "logit_cos_mean",
            "prob_cos_mean",
            "ln_ppl_ratio",
            "measured_sparsity",
        ):
            assert row[name] is not None, (row["run_id"], name)
        assert (row["sub_kl_mean"] is not None) == (row["prompt_id"] == "p000")
    assert {r["measured_sparsity"] for r in summary if r["spec"] == "wanda:0.5"} == {0.5}
    assert all(r["kl_mean"] == 0 and r["ln_ppl_ratio"] == 0 for r in summary if r["spec"] == "none")
    groups = group_summary(sweep, summary)
    assert [(g["spec"], g["mode"], g["runs"]) for g in groups] == [
        ("wanda:0.5", "shared", 2),
        ("wanda:0.5", "free", 2),
        ("none", "shared", 2),
        ("none", "free", 2),
    ]
    csv_header = (out / "summary.csv").read_text(encoding="utf-8").splitlines()[0]
    assert '"kl_p99"' in csv_header and '"first_divergence"' in csv_header


def test_step_and_summary_tables_have_the_declared_schema(uninterrupted, tmp_path):
    """Every column always present, typed from engine.record.schema: with choices and free mode (the whole sweep)
    and without either (a shared-only sweep of a prompt without choices: sub_* and first_divergence null)."""
    _, out = uninterrupted
    prompts = tmp_path / "p.txt"
    prompts.write_text("Hello there\n", encoding="utf-8")
    plain = tmp_path / "plain"
    run_sweep(
        plan_sweep(prompts_file=prompts, model="tiny-random", specs=["none"], modes=["shared"], max_new_tokens=3),
        plain,
        batch_size=1,
    )
    for folder in (out, plain):
        assert pq.read_schema(folder / "steps.parquet") == schema.arrow_schema(schema.STEPS), folder
        assert pq.read_schema(folder / "summary.parquet") == schema.arrow_schema(schema.SUMMARY), folder
        assert pq.read_schema(folder / "steps.parquet").names == list(schema.STEPS)
    steps = pq.read_table(out / "steps.parquet").to_pylist()
    assert any(r["first_divergence"] is not None for r in steps if r["mode"] == "free")
    assert all(r["first_divergence"] is None for r in steps if r["mode"] == "shared")
    assert all(isinstance(r["top1_agree"], bool) and isinstance(r["rank_shift"], int) for r in steps)
    assert all(isinstance(r["sub_agree"], bool) for r in steps if r["prompt_id"] == "p000")
    assert all(json.loads(r["topk_d"])[0][0] == r["token_d"] for r in steps)  # greedy: the dense top-1

    plain_steps = pq.read_table(plain / "steps.parquet").to_pylist()
    assert plain_steps and all(
        r[name] is None
        for r in plain_steps
        for name in ("sub_p_d", "sub_p_p", "sub_kl", "sub_cos", "sub_agree", "first_divergence")
    )
    (row,) = pq.read_table(plain / "summary.parquet").to_pylist()
    assert row["choices"] is None and row["sub_kl_mean"] is None and row["first_divergence"] is None
    assert row["kl_mean"] == 0 and row["steps"] == len(plain_steps)


def test_schema_refuses_undeclared_fields_and_wrong_kinds():
    row = {"run_id": "r", "spec": "none", "mode": "shared", "prompt_id": "p", "step": 0, "kl": 0.5}
    table = schema.to_table([row], schema.STEPS)
    assert table.schema == schema.arrow_schema(schema.STEPS) and table.to_pylist()[0]["tv"] is None
    assert schema.to_table([], schema.STEPS).schema == schema.arrow_schema(schema.STEPS)
    assert (
        schema.to_table([{**row, "rank_shift": 3.0, "top1_agree": 1.0}], schema.STEPS).to_pylist()[0]["rank_shift"] == 3
    )
    with pytest.raises(schema.SchemaError, match="'new_metric'.*engine/record/schema.py"):
        schema.to_table([{**row, "new_metric": 1.0}], schema.STEPS, "steps.parquet")
    for name, value in (("step", 1.5), ("top1_agree", 0.5), ("kl", "high"), ("emb_cos", 1.0), ("fed", [1.5])):
        with pytest.raises(schema.SchemaError, match=f"column '{name}'"):
            schema.to_table([{**row, name: value}], schema.STEPS)


def test_summary_columns_cover_summarize():
    """Every key summarize() can give (free mode, choices), then the counterfactual branch's (engine.run.branch), is a
    declared summary column."""
    from engine.record.branches import branch_summary
    from engine.record.summary import summarize

    record = {
        "kl": 0.1,
        "kl_est": 0.1,
        "tv": 0.1,
        "top1_agree": 1.0,
        "near_tie": False,
        "emb_cos": [1.0],
        "logit_cos": 1.0,
        "prob_cos": 1.0,
        "prob_cos_est": 1.0,
        "js": 0.0,
        "amp": 1.0,
        "cum_kl": 0.1,
        "cum_nll_gap": 0.0,
        "nll_d": 1.0,
        "nll_p": 1.0,
        "same_token": True,
        "first_divergence": None,
        "sub_kl": 0.0,
        "sub_agree": 1.0,
    }
    assert [*summarize([record], "free"), *branch_summary(None)] == list(schema.SUMMARY_FIELDS)


def test_settings_are_frozen_and_the_manifest_format_is_unchanged(sweep_files, uninterrupted):
    sweep, out = uninterrupted
    assert isinstance(sweep.settings, StepSettings) and sweep.settings.max_new_tokens == 5
    assert sweep.step_settings("free").mode == "free" and sweep.settings.mode == "shared"
    manifest = json.loads((out / "batch.json").read_text(encoding="utf-8"))
    assert manifest.pop("created")
    architecture = manifest.pop("architecture")  # added once the model is loaded; not compared on resume
    assert architecture["model_type"] == "llama" and architecture["layers"] == 4 and architecture["kv_heads"] == 2
    assert manifest == {
        "format": "hierui-batch",
        "version": 1,
        "model": "tiny-random",
        "prompts": [
            {"id": "p000", "prompt": "Answer A or B:", "choices": ["A", "B"]},
            {"id": "hi", "prompt": "Hello there", "choices": None},
        ],
        "specs": ["wanda:0.5", "none"],
        "modes": ["shared", "free"],
        "settings": {
            "temperature": 1.0,
            "max_new_tokens": 5,
            "sample": False,
            "seed": 0,
            "raw": False,
            "topk": 5,
            "lens": "sampled",
        },
        "calibration": {"wanda:0.5": {"source": None, "samples": 4, "length": 16, "seed": 0}},  # per spec
        "device": "auto",
        "dtype": "auto",
        "source": str(sweep_files["jsonl"]),
    }


# ------------------------------------------------------------------ the CLI


def cli(*args):
    from hierui.cli import app

    return CliRunner().invoke(app, ["batch", *args])


def test_cli_sweep_rerun_interrupt_and_from_session(tmp_path, monkeypatch):
    prompts = tmp_path / "p.txt"
    prompts.write_text("Hello\nThe cat sat\n", encoding="utf-8")
    out = tmp_path / "out"
    args = [
        "-m",
        "tiny-random",
        "--prompts",
        str(prompts),
        "-p",
        "magnitude:0.5",
        "--mode",
        "shared",
        "--mode",
        "free",
        "--max-new-tokens",
        "4",
        "--out",
        str(out),
    ]
    run = cli(*args)
    assert run.exit_code == 0, run.output
    assert "magnitude:0.5" in run.stdout and "4 runs (4 computed, 0 already complete)" in run.stdout
    assert len(list((out / "sessions").glob("*.jsonl"))) == 4
    assert pq.read_table(out / "summary.parquet").num_rows == 4 and (out / "summary.csv").is_file()

    again = cli(*args)
    assert again.exit_code == 0 and "4 runs (0 computed, 4 already complete)" in again.stdout

    import hierui.views.bars  # Ctrl-C in the second run: exit 130, and it says which runs are complete

    def ctrl_c(self, run, record):
        if run.run_id.endswith("free"):
            raise KeyboardInterrupt

    monkeypatch.setattr(hierui.views.bars.BatchBars, "step", ctrl_c)
    cut = cli(*args[:-1], str(tmp_path / "cut2"))
    assert cut.exit_code == 130
    # the two shared runs are stepped together (one batch) and complete before the free ones start
    assert "interrupted: 2 of 4 runs complete" in cut.stderr and "p000-magnitude-0.5-shared" in cut.stderr
    monkeypatch.undo()
    resumed = cli(*args[:-1], str(tmp_path / "cut2"))
    assert resumed.exit_code == 0 and "(2 computed, 2 already complete)" in resumed.stdout
    assert_same_tables(tmp_path / "cut2", out)

    source = out / "sessions" / "p001-magnitude-0.5-free.jsonl"
    header = load_session(source).header
    rerun = cli("--from", str(source), "-p", "none", "--out", str(tmp_path / "from"))
    assert rerun.exit_code == 0, rerun.output
    (row,) = pq.read_table(tmp_path / "from" / "summary.parquet").to_pylist()
    assert (row["run_id"], row["prompt"], row["mode"], row["model"]) == (
        "p000-none-free",
        "The cat sat",
        "free",
        "tiny-random",
    )
    assert row["kl_mean"] == 0
    made = load_session(tmp_path / "from" / "sessions" / "p000-none-free.jsonl").header
    for key in ("prompt", "mode", "temperature", "choices", "seed", "sample", "max_new_tokens", "raw", "topk", "model"):
        assert made[key] == header[key], key

    override = cli(
        "--from",
        str(source),
        "-p",
        "none",
        "--mode",
        "shared",
        "--max-new-tokens",
        "2",
        "--out",
        str(tmp_path / "from2"),
    )
    assert override.exit_code == 0, override.output
    made = load_session(tmp_path / "from2" / "sessions" / "p000-none-shared.jsonl")
    assert made.header["max_new_tokens"] == 2 and made.header["prompt"] == "The cat sat" and len(made.steps) <= 2


@pytest.mark.parametrize(
    "args, message",
    [
        (["--prompts", "{dir}/missing.txt"], "missing.txt: not found"),
        (["--prompts", "{dir}/empty.txt"], "empty.txt: the file is empty"),
        (["--prompts", "{dir}/noprompt.jsonl"], 'has no "prompt"'),
        (["--prompts", "{dir}/ok.txt", "-p", "wanda:0.5", "-p", "wanda:1.5"], "sparsity must be in (0, 1)"),
        (["--prompts", "{dir}/ok.txt", "--mode", "sideways"], "unknown mode 'sideways'"),
        (["--prompts", "{dir}/ok.txt", "--from", "{dir}/ok.txt"], "exactly one of --prompts FILE or --from SESSION"),
        (["--from", "{dir}/ok.txt", "-p", "none"], "is not a hierui session"),
        (["--from", "{dir}/ok.txt"], "give at least one --prune"),
    ],
)
def test_cli_bad_input_is_one_line_exit_2_before_loading(cli, tmp_path, args, message):
    (tmp_path / "empty.txt").write_text("\n", encoding="utf-8")
    (tmp_path / "ok.txt").write_text("hello\n", encoding="utf-8")
    (tmp_path / "noprompt.jsonl").write_text('{"text": "hello"}\n', encoding="utf-8")
    home = tmp_path / "home"
    run = cli(
        "batch", *[a.format(dir=tmp_path) for a in args], "--out", str(tmp_path / "out"), env={"HIERUI_HOME": str(home)}
    )
    assert run.returncode == 2, run.stderr
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], run.stderr
    assert "Traceback" not in run.stderr + run.stdout
    assert not home.exists() and not (tmp_path / "out").exists()  # nothing loaded, nothing written


def test_batched_sweep_matches_one_prompt_at_a_time(sweep_files, uninterrupted, tmp_path):
    """--batch-size 4 steps the prompts together; the recorded runs equal the one-at-a-time sweep's."""
    _sweep, one_at_a_time = uninterrupted
    out = tmp_path / "batched"
    result = run_sweep(plan(sweep_files), out, batch_size=4)
    assert sorted(result.computed) == sorted(r.run_id for r in plan(sweep_files).runs())
    a = pq.read_table(one_at_a_time / "steps.parquet").to_pylist()
    b = pq.read_table(out / "steps.parquet").to_pylist()
    assert [(r["run_id"], r["step"], r["token_d"], r["token_p"]) for r in a] == [
        (r["run_id"], r["step"], r["token_d"], r["token_p"]) for r in b
    ]
    for ra, rb in zip(a, b):
        for name in ("kl", "tv", "logit_cos", "prob_cos", "nll_p"):
            assert rb[name] == pytest.approx(ra[name], abs=1e-4), name


def test_multiple_choice_items_are_scored_per_spec_and_resume(tmp_path):
    items = [
        {"id": "gen", "prompt": "Hello"},
        {"id": "m1", "prompt": "Pick:", "choices": ["A", "B", "C", "D"], "answer": 2, "topic": "t1"},
        {"id": "m2", "prompt": "Again:", "choices": ["x", "yy", "z", "w"], "answer": "yy", "topic": "t2"},
        {"id": "m3", "prompt": "Last:", "choices": ["a", "b"], "answer": 0},
    ]
    path = write_jsonl(tmp_path / "mixed.jsonl", items)
    sweep = plan_sweep(prompts_file=path, **{**TINY, "specs": ["magnitude:0.5", "none"], "modes": ["shared"]})
    assert [r.run_id for r in sweep.runs()] == ["gen-magnitude-0.5-shared", "gen-none-shared"]
    assert [p.id for p in sweep.choice_items] == ["m1", "m2", "m3"] and sweep.choice_items[1].answer == 1
    out = tmp_path / "out"
    result = run_sweep(sweep, out)
    rows = pq.read_table(out / "mc.parquet").to_pylist()
    assert [(r["spec"], r["item_id"]) for r in rows] == [
        (s, i) for s in ("magnitude:0.5", "none") for i in ("m1", "m2", "m3")
    ]
    none_rows = [r for r in rows if r["spec"] == "none"]
    assert all(r["sub_kl"] == 0 and r["kl"] == 0 and r["agree"] for r in none_rows)
    by_spec = {r["spec"]: r for r in result.choice_summary}
    for spec, summary in by_spec.items():
        mine = [r for r in rows if r["spec"] == spec]
        assert summary["acc_d"] == pytest.approx(sum(r["pred_d"] == r["answer"] for r in mine) / 3)
        assert summary["acc_p"] == pytest.approx(sum(r["pred_p"] == r["answer"] for r in mine) / 3)
    assert by_spec["none"]["acc_d"] == by_spec["none"]["acc_p"] == by_spec["magnitude:0.5"]["acc_d"]
    assert pq.read_table(out / "mc_summary.parquet").num_rows == 2 and (out / "mc_summary.csv").is_file()
    assert pq.read_schema(out / "mc.parquet") == schema.arrow_schema(schema.CHOICES)
    assert pq.read_schema(out / "mc_summary.parquet") == schema.arrow_schema(schema.CHOICE_SUMMARY)
    assert [json.loads(r["choices"]) for r in rows[:3]] == [item["choices"] for item in items[1:]]
    assert pq.read_table(out / "steps.parquet").schema == schema.arrow_schema(schema.STEPS)
    stamp = choices_path(out, sweep.specs[0]).stat().st_mtime_ns
    choices_path(out, sweep.specs[1]).unlink()  # interrupted before the second spec's items were written
    again = run_sweep(sweep, out)
    assert again.computed == [] and choices_path(out, sweep.specs[0]).stat().st_mtime_ns == stamp
    assert pq.read_table(out / "mc.parquet").to_pylist() == rows


def test_bad_multiple_choice_items(tmp_path):
    for line, message in (
        ('{"prompt": "q", "answer": 0}', 'needs "choices"'),
        ('{"prompt": "q", "choices": ["a", "b"], "answer": 5}', '"answer" must be an index'),
    ):
        path = tmp_path / "bad.jsonl"
        path.write_text(line + "\n", encoding="utf-8")
        with pytest.raises(HieruiError, match=message):
            read_prompts(path)


# ------------------------------------------------------------------ one writer per --out, a clean failed start


def _batch_args(prompts, out, *extra):
    return ["batch", "-m", "tiny-random", "--prompts", str(prompts), "-p", "none", "--max-new-tokens", "2"] + [
        *extra,
        "--out",
        str(out),
    ]


@pytest.mark.parametrize(
    "bad, good, message",
    [
        (["--device", "cuda"], ["--device", "cpu"], "no CUDA GPU is available"),
        (["--dtype", "float8"], ["--dtype", "float32"], "unknown dtype 'float8'"),
        (["--device", "tpu"], ["--device", "cpu"], "device 'tpu'"),
        ("collide", [], "do not start with distinct tokens"),
    ],
)
def test_a_failed_start_leaves_nothing_and_the_corrected_command_succeeds(cli, tmp_path, bad, good, message):
    """Checks that fail at the start (device, dtype, first tokens of the choices) leave no batch.json behind
    that would refuse the corrected command as "another sweep"."""
    import torch

    if bad[:2] == ["--device", "cuda"] and torch.cuda.is_available():
        pytest.skip("a GPU is here: --device cuda does not fail")
    prompts = tmp_path / "p.jsonl"
    out = tmp_path / "out"
    if bad == "collide":  # choices whose first tokens are the same on tiny-random: found after the tokenizer loads
        write_jsonl(prompts, [{"prompt": "Pick a fruit:", "choices": ["Apple", "Apricot"]}])
        bad = []
    else:
        write_jsonl(prompts, [{"prompt": "Pick a fruit:", "choices": ["Apple", "Pear"]}])
    failed = cli(*_batch_args(prompts, out, *bad))
    assert failed.returncode != 0 and message in failed.stderr, failed.stderr
    assert not (out / "batch.json").exists() and not (out / ".hierui.lock").exists()
    assert not out.exists()  # the folder the failed start made is gone again
    write_jsonl(prompts, [{"prompt": "Pick a fruit:", "choices": ["Apple", "Pear"]}])
    fixed = cli(*_batch_args(prompts, out, *good))
    assert fixed.returncode == 0, fixed.stderr
    assert "1 run (1 computed, 0 already complete)" in fixed.stdout
    assert load_session(out / "sessions" / "p000-none-shared.jsonl").complete
    assert not (out / ".hierui.lock").exists()  # released at the end


SLOW_BATCH = """
import sys, time
import engine.record.session
write_step = engine.record.session.SessionWriter.write_step
def slow(self, record):  # each step takes a while: the two runs certainly overlap
    time.sleep(float(sys.argv[1]))
    write_step(self, record)
engine.record.session.SessionWriter.write_step = slow
from hierui.cli import main
main(sys.argv[2:])
"""


@pytest.mark.slow
def test_two_concurrent_sweeps_on_one_out(tmp_path):
    """Two sweeps started together into one --out: one records every run, the other exits 2 naming the
    first, and every session file loads whole."""
    import os
    import socket
    import subprocess
    import sys

    prompts = tmp_path / "p.txt"
    prompts.write_text("Hello\nThe cat sat\nOnce upon a time\n", encoding="utf-8")
    out = tmp_path / "out"
    args = _batch_args(prompts, out, "--mode", "shared", "--mode", "free")
    args[args.index("2")] = "8"  # --max-new-tokens 8
    env = {**os.environ, "COLUMNS": "300"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", SLOW_BATCH, "0.05", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(2)
    ]
    results = [(p, *p.communicate(timeout=300)) for p in procs]
    codes = sorted(p.returncode for p, _, _ in results)
    assert codes == [0, 2], [(p.returncode, err) for p, _, err in results]
    (winner,) = [r for r in results if r[0].returncode == 0]
    (loser,) = [r for r in results if r[0].returncode == 2]
    lines = [line for line in loser[2].splitlines() if line.strip()]
    assert len(lines) == 1, loser[2]
    assert f"{out} is in use by hierui pid {winner[0].pid} on {socket.gethostname()} since " in lines[0]
    assert "6 runs (6 computed, 0 already complete)" in winner[1]
    files = sorted((out / "sessions").glob("*.jsonl"))
    assert len(files) == 6
    for path in files:
        session = load_session(path)
        assert session.complete and not session.warnings and len(session.steps) >= 1, path
    assert not (out / ".hierui.lock").exists()


def test_a_sweep_takes_over_a_stale_lock(cli, tmp_path):
    import socket
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "out"
    out.mkdir()
    stale = {"pid": dead.pid, "host": socket.gethostname(), "started": "2026-01-01T00:00:00+0000"}
    (out / ".hierui.lock").write_text(json.dumps(stale), encoding="utf-8")
    prompts = tmp_path / "p.txt"
    prompts.write_text("Hello\n", encoding="utf-8")
    run = cli(*_batch_args(prompts, out))
    assert run.returncode == 0, run.stderr
    assert f"taking over a stale lock of pid {dead.pid} (not running)" in run.stderr
    assert load_session(out / "sessions" / "p000-none-shared.jsonl").complete
    assert not (out / ".hierui.lock").exists()


def test_the_lock_is_released_after_an_error(sweep_files, tmp_path):
    from engine.record.lock import held_locks

    out = tmp_path / "out"
    sweep = plan_sweep(prompts_file=sweep_files["jsonl"], model="tiny-random", specs=["none"], max_new_tokens=2)

    class Boom(SweepHooks):
        def step(self, run, record):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        run_sweep(sweep, out, hooks=Boom(), batch_size=1)
    assert held_locks() == [] and not (out / ".hierui.lock").exists()
    with pytest.raises(KeyboardInterrupt):
        run_sweep(sweep, out, hooks=Recorder(stop_at=(0, 0)), batch_size=1)
    assert held_locks() == [] and not (out / ".hierui.lock").exists()
    assert run_sweep(sweep, out, batch_size=1).computed  # and the folder is free for the next run


def test_prompts_can_name_a_shipped_suite(cli, tmp_path):
    import pyarrow.parquet as pq

    from engine.record.prompts import read_prompts
    from engine.sweep.recipe import SUITES

    out = tmp_path / "out"
    r = cli("batch", "--model", "tiny-random", "--prompts", "suite:open", "--max-new-tokens", "1", "--out", out)
    assert r.returncode == 0, r.stderr
    ids = {row["prompt_id"] for row in pq.read_table(out / "summary.parquet").to_pylist()}
    assert ids == {item.id for item in read_prompts(SUITES / "open.jsonl")}
    bad = cli("batch", "--model", "tiny-random", "--prompts", "suite:nope", "--out", tmp_path / "x")
    assert bad.returncode == 2 and "unknown suite 'suite:nope'" in bad.stderr and "suite:open" in bad.stderr
