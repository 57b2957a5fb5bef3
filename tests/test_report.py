"""Recipes (hierui batch --recipe), the HTML report (hierui report) and the batch view of hierui show."""

import json
import re
import shutil
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from engine.errors import HieruiError
from engine.perturb.spec import parse_spec
from engine.results import runs as R
from engine.sweep import recipe as RC
from hierui.cli import app
from hierui.format import metric
from hierui.report import page as HR
from hierui.report import readings as RD

TINY_RECIPE = """\
name = "tiny"
description = "two open prompts and two multiple-choice items on tiny-random"
model = "tiny-random"
prompts = ["open.txt", "mc.jsonl"]
specs = ["magnitude:0.5", "none"]
modes = ["shared", "free"]
max_new_tokens = 4
batch_size = 4

[calibration]
samples = 4
length = 16
seed = 0
"""
# tiny-random's tokenizer is byte-level: choices must start with distinct bytes
MC_ITEMS = [
    {"id": "q1", "topic": "facts", "prompt": "The capital of France is", "choices": ["Paris", "Rome"], "answer": 0},
    {"id": "q2", "topic": "maths", "prompt": "Two plus two is", "choices": ["four", "two", "six"], "answer": "four"},
]


def one_line_error(run, *needles):
    assert run.returncode == 2, (run.stdout, run.stderr)
    lines = [line for line in run.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), run.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def write_recipe(folder, text=TINY_RECIPE):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open.txt").write_text("Hello there\nOnce upon a time\n", encoding="utf-8")
    (folder / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in MC_ITEMS), encoding="utf-8")
    path = folder / "tiny.toml"
    path.write_text(text, encoding="utf-8")
    return path


# ------------------------------------------------------------------ recipes (no model)


def test_shipped_hierarchy_recipe_is_valid():
    assert "hierarchy" in RC.shipped_recipes()
    recipe = RC.load_recipe("hierarchy")
    assert recipe.name == "hierarchy" and recipe.description
    assert recipe.prompts == ["suite:open", "suite:mc"]
    assert recipe.modes == ["shared", "free"] and recipe.settings["max_new_tokens"] == 32
    specs = [parse_spec(s) for s in recipe.specs]
    assert len(set(specs)) == len(specs)
    methods = {s.method for s in specs}
    assert {"magnitude", "wanda", "sparsegpt", "attndrop", "mlpdrop", "int8", "nf4"} <= methods
    for method in ("magnitude", "wanda", "sparsegpt"):
        assert {s.sparsity for s in specs if s.method == method and s.sparsity} == {0.3, 0.5, 0.7}
    assert parse_spec("wanda:2:4") in specs
    items = RC.read_items(recipe)
    ids = [i["id"] for i in items]
    assert len(ids) == len(set(ids))
    assert all(i["id"].startswith(("open.", "mc.")) for i in items)
    mc = [i for i in items if i["id"].startswith("mc.")]
    assert mc and all("choices" in i and "answer" in i and "topic" in i for i in mc)
    lines = sum(
        1 for s in ("open", "mc") for line in (RC.SUITES / f"{s}.jsonl").read_text().splitlines() if line.strip()
    )
    assert len(items) == lines


def test_recipe_by_path_resolves_relative_sources(tmp_path):
    recipe = RC.load_recipe(write_recipe(tmp_path / "r"))
    assert [prefix for prefix, _ in recipe.sources] == ["open", "mc"]
    assert recipe.model == "tiny-random" and recipe.batch_size == 4
    assert recipe.calibration == {"samples": 4, "length": 16, "seed": 0}
    items = RC.read_items(recipe)
    assert [i["id"] for i in items] == ["open.p000", "open.p001", "mc.q1", "mc.q2"]
    assert items[2]["choices"] == ["Paris", "Rome"] and items[2]["answer"] == 0 and items[2]["topic"] == "facts"


BAD = [
    ("missing", None, "recipe file not found"),
    ("syntax", 'name = "x"\nprompts = [\n', "is not valid TOML"),
    ("unknown key", 'prompts = ["open.txt"]\nspecs = ["none"]\nprune = ["wanda:0.5"]\n', "unknown key 'prune'"),
    ("wrong type", 'prompts = ["open.txt"]\nspecs = "wanda:0.5"\n', "'specs' must be a list"),
    (
        "wrong setting type",
        'prompts = ["open.txt"]\nspecs = ["none"]\nmax_new_tokens = "32"\n',
        "'max_new_tokens' must be an integer",
    ),
    ("empty specs", 'prompts = ["open.txt"]\nspecs = []\n', "'specs' is empty"),
    ("no specs", 'prompts = ["open.txt"]\n', "'specs' is missing"),
    ("bad spec", 'prompts = ["open.txt"]\nspecs = ["wanda:1.5"]\n', "spec 'wanda:1.5'"),
    ("bad mode", 'prompts = ["open.txt"]\nspecs = ["none"]\nmodes = ["teacher"]\n', "unknown mode 'teacher'"),
    ("unknown suite", 'prompts = ["suite:nosuch"]\nspecs = ["none"]\n', "unknown suite 'suite:nosuch'"),
    ("missing prompts file", 'prompts = ["absent.txt"]\nspecs = ["none"]\n', "absent.txt: not found"),
    (
        "calibration key",
        'prompts = ["open.txt"]\nspecs = ["none"]\n[calibration]\nsize = 3\n',
        "unknown key 'calibration.size'",
    ),
    (
        "calibration value",
        'prompts = ["open.txt"]\nspecs = ["none"]\n[calibration]\nsamples = 0\n',
        "'calibration.samples' must be at least 1",
    ),
    # a value the step settings refuse is named as the recipe's (it read as if the user had typed --temperature)
    ("infinite temperature", 'prompts = ["open.txt"]\nspecs = ["none"]\ntemperature = inf\n', "temperature must be a"),
    ("nan temperature", 'prompts = ["open.txt"]\nspecs = ["none"]\ntemperature = nan\n', "temperature must be a"),
    ("unknown lens", 'prompts = ["open.txt"]\nspecs = ["none"]\nlens = "some"\n', "unknown lens 'some'"),
]


@pytest.mark.parametrize("text, mode", [("true", "all"), ("false", "off"), ('"sampled"', "sampled")])
def test_a_recipes_lens_reads_as_a_mode_old_booleans_included(tmp_path, text, mode):
    """Guards the recipes written before the lens modes: `lens = true/false` was the only way to say it."""
    path = write_recipe(tmp_path / "r", TINY_RECIPE.replace("batch_size = 4\n", f"batch_size = 4\nlens = {text}\n"))
    assert RC.load_recipe(path).settings["lens"] == mode


def test_a_recipes_max_new_tokens_beyond_the_context_is_named_as_the_recipes(cli, tmp_path):
    """A recipe's max_new_tokens that overflows the model's context was reported as `--max-new-tokens N`, an option
    the user never typed."""
    text = 'model = "tiny-random"\nprompts = ["open.txt"]\nspecs = ["none"]\nmax_new_tokens = 50000\n'
    write_recipe(tmp_path / "r", text)
    run = cli("batch", "--recipe", tmp_path / "r" / "tiny.toml", "--out", tmp_path / "out")
    assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert "recipe tiny.toml's max_new_tokens 50000 does not fit" in run.stderr and "--max-new-tokens" not in run.stderr


@pytest.mark.parametrize("kind, text, message", BAD, ids=[b[0] for b in BAD])
def test_bad_recipes_fail_with_one_clear_line(tmp_path, kind, text, message):
    path = tmp_path / "r" / "bad.toml"
    if text is not None:
        write_recipe(tmp_path / "r", text)
        (tmp_path / "r" / "tiny.toml").rename(path)
    with pytest.raises(HieruiError) as e:
        RC.load_recipe(path)
    line = str(e.value)
    assert "\n" not in line and message in line and str(path) in line, line


def test_unknown_recipe_name_lists_the_shipped_ones():
    with pytest.raises(HieruiError, match="shipped: .*hierarchy"):
        RC.load_recipe("nosuch")


def test_command_line_options_override_the_recipe(tmp_path):
    path = write_recipe(tmp_path / "r")
    given = dict(
        prompts_file=None,
        from_session=None,
        model=None,
        specs=["wanda:0.3"],
        modes=None,
        calib={"source": None, "samples": 8, "length": None, "seed": None},
        device="auto",
        dtype="auto",
        temperature=None,
        max_new_tokens=7,
        sample=None,
        seed=None,
        raw=None,
        topk=None,
    )
    args, batch_size = RC.apply_recipe(path, tmp_path / "out", given, None)
    assert args["specs"] == ["wanda:0.3"] and args["modes"] == ["shared", "free"] and args["model"] == "tiny-random"
    assert args["max_new_tokens"] == 7 and args["calib"]["samples"] == 8 and args["calib"]["length"] == 16
    assert batch_size == 4 and args["prompts_file"] == tmp_path / "out" / "prompts.jsonl"
    assert args["files"]["recipe.toml"] == path.read_text() and args["files"]["prompts.jsonl"] == args["prompts_text"]
    assert not (tmp_path / "out").exists()  # nothing is written before the sweep really starts
    with pytest.raises(HieruiError, match="without --from"):
        RC.apply_recipe(path, tmp_path / "out", {**given, "from_session": "x.jsonl"})


# ------------------------------------------------------------------ one tiny sweep from a recipe


@pytest.fixture(scope="module")
def recipe_run(tmp_path_factory):
    """hierui batch --recipe: 2 open prompts + 2 MC items × magnitude:0.5, none × shared, free on tiny-random."""
    folder = tmp_path_factory.mktemp("recipe")
    path = write_recipe(folder / "r")
    out = folder / "out"
    result = CliRunner().invoke(app, ["batch", "--recipe", str(path), "--out", str(out)])
    assert result.exit_code == 0, (result.output, result.exception)
    return out


def test_batch_recipe_end_to_end(recipe_run):
    out = recipe_run
    prompts = [json.loads(line) for line in (out / "prompts.jsonl").read_text().splitlines()]
    assert [p["id"] for p in prompts] == ["open.p000", "open.p001", "mc.q1", "mc.q2"]
    manifest = json.loads((out / "batch.json").read_text())
    assert manifest["model"] == "tiny-random" and manifest["specs"] == ["magnitude:0.5", "none"]
    assert manifest["settings"]["max_new_tokens"] == 4 and manifest["calibration"] == {}  # no spec calibrates
    summary = pq.read_table(out / "summary.parquet").to_pylist()
    assert len(summary) == 2 * 2 * 2 and {r["mode"] for r in summary} == {"shared", "free"}
    assert all(r["steps"] == 4 for r in summary)
    mc = pq.read_table(out / "mc_summary.parquet").to_pylist()
    assert [r["spec"] for r in mc] == ["magnitude:0.5", "none"] and all(r["items"] == 2 for r in mc)
    # rerunning the same recipe into the same folder resumes (nothing to compute)
    rerun = CliRunner().invoke(app, ["batch", "--recipe", str(out.parent / "r" / "tiny.toml"), "--out", str(out)])
    assert rerun.exit_code == 0 and "0 computed, 8 already complete" in rerun.output


def test_batch_recipe_errors_exit_2(cli, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('prompts = ["suite:open"]\nspecs = ["wanda:2:2"]\n', encoding="utf-8")
    one_line_error(cli("batch", "--recipe", str(bad), "--out", str(tmp_path / "out")), str(bad), "wanda:2:2")
    assert not (tmp_path / "out").exists()
    one_line_error(cli("batch", "--recipe", "nosuch"), "recipe 'nosuch' not found")


def test_batch_recipe_failed_start_writes_nothing(cli, tmp_path, monkeypatch):
    """A start that fails after the checks (here: the model's loading) leaves OUT without prompts.jsonl or
    recipe.toml, so the corrected command starts afresh in the same folder."""
    import engine.models.loading
    from engine.errors import HieruiError

    recipe = tmp_path / "r.toml"
    recipe.write_text('model = "tiny-random"\nprompts = ["suite:open"]\nspecs = ["none"]\n', encoding="utf-8")

    def fail(*_a, **_k):
        raise HieruiError("out of memory loading tiny-random", 1)

    monkeypatch.setattr(engine.models.loading, "load", fail)
    result = cli("batch", "--recipe", str(recipe), "--out", str(tmp_path / "out"), "--max-new-tokens", "2")
    assert result.returncode == 1 and "out of memory" in result.stderr
    left = sorted(p.name for p in (tmp_path / "out").iterdir()) if (tmp_path / "out").exists() else []
    assert "prompts.jsonl" not in left and "recipe.toml" not in left and "batch.json" not in left


# ------------------------------------------------------------------ the report


def _shared_means(out, field):
    rows = pq.read_table(out / "summary.parquet").to_pylist()
    means = {}
    for spec in ("magnitude:0.5", "none"):
        vals = [r[field] for r in rows if r["spec"] == spec and r["mode"] == "shared" and r[field] is not None]
        means[spec] = sum(vals) / len(vals) if vals else None
    return means


def test_report_contains_every_section(recipe_run, tmp_path):
    out = recipe_run
    target = tmp_path / "page.html"
    result = CliRunner().invoke(app, ["report", str(out), "--out", str(target)])
    assert result.exit_code == 0, (result.output, result.exception)
    page = target.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    for sid in HR.SECTION_IDS:
        assert f'<section id="{sid}">' in page, sid
    assert "The claim." in page and "softmax" in page
    assert page.count("<svg") == 7  # one chart per section (the lens heatmap in "where it breaks")
    ids = re.findall(r'\bid="([^"]+)"', page)
    assert len(ids) == len(set(ids))  # the charts' clip paths and markers do not collide
    assert not re.search(r"<script|<link|<img|\bsrc=|url\((?!#)", page)  # self-contained: nothing fetched
    assert "tiny" in page and "magnitude:0.5" in page and "none" in page
    # figures from summary.parquet: shared-mode means per spec as the page prints them
    for field in ("kl_mean", "logit_cos_mean", "prob_cos_mean", "emb_cos_final_mean", "kl_est_mean"):
        value = _shared_means(out, field)["magnitude:0.5"]
        assert f"<td>{metric(field, value)}</td>" in page, (field, metric(field, value))
    mc = {r["spec"]: r for r in pq.read_table(out / "mc_summary.parquet").to_pylist()}
    assert f"<td>{metric('sub_kl_mean', mc['magnitude:0.5']['sub_kl_mean'])}</td>" in page
    assert f"<td>{metric('acc_p', mc['magnitude:0.5']['acc_p'])}</td>" in page
    # no section says its data is missing
    assert 'class="nodata"' not in page.split('id="first-divergence"')[0]
    assert "No multiple-choice items" not in page and "No free-mode runs" not in page


def test_report_default_path_and_print_path(cli, recipe_run):
    run = cli("report", str(recipe_run), "--print-path")
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == str((recipe_run / "report.html").resolve())
    assert (recipe_run / "report.html").is_file()


def test_report_open_launches_the_page(recipe_run, tmp_path, monkeypatch):
    import typer

    opened = []
    monkeypatch.setattr(typer, "launch", lambda url, *a, **k: opened.append(url) or 0)  # no browser in tests
    target = tmp_path / "opened.html"
    result = CliRunner().invoke(app, ["report", str(recipe_run), "--out", str(target), "--open"])
    assert result.exit_code == 0, (result.output, result.exception)
    assert opened == [str(target.resolve())] and target.is_file()
    assert f"report: {target}" in result.output


def test_report_is_byte_identical_for_the_same_run(recipe_run, tmp_path):
    first = HR.write_report(recipe_run, tmp_path / "a.html").read_bytes()
    second = HR.write_report(recipe_run, tmp_path / "b.html").read_bytes()
    assert first == second
    assert b"<svg" in first and "Generated by hierui from" in first.decode("utf-8")
    stamped = tmp_path / "stamped.html"
    result = CliRunner().invoke(app, ["report", str(recipe_run), "--out", str(stamped), "--stamp"])
    assert result.exit_code == 0, (result.output, result.exception)
    footer = re.search(r"<footer>.*</footer>", stamped.read_text(encoding="utf-8")).group(0)
    assert re.search(r" on \d{4}-\d\d-\d\d \d\d:\d\d:", footer), footer
    assert not re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d", re.search(r"<footer>.*</footer>", first.decode()).group(0))


EVIL = "<script>alert('spec')</script>"


def _synthetic_run(folder, specs=(EVIL, "none")):
    """A batch output without a model: batch.json, summary.parquet and an empty steps.parquet, shared mode,
    two specs."""
    folder.mkdir(parents=True)
    manifest = {
        "format": "hierui-batch",
        "model": "<b>model</b>",
        "specs": list(specs),
        "modes": ["shared"],
        "settings": {"max_new_tokens": 4, "temperature": 1.0},
        "calibration": {"samples": 4, "length": 16},
    }
    (folder / "batch.json").write_text(json.dumps(manifest), encoding="utf-8")
    rows = [
        {
            "run_id": f"r{i}",
            "spec": spec,
            "mode": "shared",
            "prompt_id": "p0",
            "measured_sparsity": 0.5 * (i == 0),
            "emb_cos_final_mean": 0.99 + 0.01 * i,
            "logit_cos_mean": 0.98 + 0.02 * i,
            "prob_cos_mean": 0.9 + 0.1 * i,
            "kl_mean": 0.05 * (i == 0),
            "kl_est_mean": 0.04 * (i == 0),
            "amp_mean": 5.0 if i == 0 else None,
            "same_top1_rate": 0.75 + 0.25 * i,
            "cum_kl": 0.2 * (i == 0),
            "first_divergence": None,
        }
        for i, spec in enumerate(specs)
    ]
    pq.write_table(pa.Table.from_pylist(rows), folder / "summary.parquet")
    from engine.record import schema

    pq.write_table(schema.to_table([], schema.STEPS, "steps.parquet"), folder / "steps.parquet")  # no steps
    return folder


def test_report_escapes_what_it_reads(tmp_path):
    """A spec (or model) name with markup is text on the page: autoescape, in tables, headings and charts."""
    run = R.load_run(_synthetic_run(tmp_path / "evil"))
    page = HR.render_html(run)
    assert "<script" not in page and "<b>model" not in page
    assert "&lt;script&gt;" in page and "&lt;b&gt;model&lt;/b&gt;" in page
    assert page == HR.render_html(R.load_run(tmp_path / "evil"))  # the same page again, byte for byte
    for sid in HR.SECTION_IDS:
        assert f'<section id="{sid}">' in page


def test_report_says_when_parts_have_no_data(recipe_run, tmp_path):
    """Shared mode only and no multiple choice: those sections say so instead of failing."""
    out = tmp_path / "shared-only"
    shutil.copytree(recipe_run, out)
    for name in ("mc.parquet", "mc_summary.parquet", "mc_summary.csv", "report.html"):
        (out / name).unlink(missing_ok=True)
    for name in ("summary.parquet", "steps.parquet"):
        table = pq.read_table(out / name)
        keep = [m == "shared" for m in table.column("mode").to_pylist()]
        pq.write_table(table.filter(pa.array(keep)), out / name)
    page = HR.write_report(out).read_text(encoding="utf-8")
    for sid in HR.SECTION_IDS:
        assert f'<section id="{sid}">' in page
    assert "No free-mode runs" in page and "No multiple-choice items" in page
    assert page.count("<svg") == 5  # 4 of the argument's sections, and the lens heatmap (shared runs have it)


def test_report_rejects_a_folder_that_is_not_a_batch_output(cli, tmp_path):
    one_line_error(cli("report", str(tmp_path / "absent")), "run folder not found")
    (tmp_path / "empty").mkdir()
    one_line_error(cli("report", str(tmp_path / "empty")), "not a hierui batch output", "batch.json")
    (tmp_path / "file.txt").write_text("x")
    one_line_error(cli("report", str(tmp_path / "file.txt")), "is not a folder")


# ------------------------------------------------------------------ hierui show RUN_DIR


def test_show_prints_the_per_spec_table_and_charts(recipe_run):
    result = CliRunner().invoke(app, ["show", str(recipe_run)], env={"COLUMNS": "160"})
    assert result.exit_code == 0, (result.output, result.exception)
    text = result.output
    assert "the hierarchy, per spec" in text and "accumulation, first divergence and multiple choice" in text
    assert "magnitude:0.5" in text and "none" in text
    kl = _shared_means(recipe_run, "kl_mean")["magnitude:0.5"]
    assert metric("kl", kl) in text
    assert "accumulated KL over generation steps" in text and "multiple-choice accuracy per spec" in text
    assert "hierui report" in text


def test_show_batch_output_loads_no_model_library(recipe_run):
    code = (
        "import sys\nfrom hierui.cli import app\nfrom typer.testing import CliRunner\n"
        "r = CliRunner().invoke(app, ['show', sys.argv[1]])\nassert r.exit_code == 0, r.output\n"
        "print('HEAVY', [m for m in ('torch', 'transformers', 'matplotlib') if m in sys.modules])\n"
    )
    run = subprocess.run([sys.executable, "-c", code, str(recipe_run)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "HEAVY []" in run.stdout, run.stdout[-500:]


def test_spec_rows_follow_the_sweep_order(recipe_run):
    rows = R.spec_rows(R.load_run(recipe_run))
    assert [r["spec"] for r in rows] == ["magnitude:0.5", "none"]
    none = rows[1]
    assert none["kl"] == 0 and none["logit_cos"] == pytest.approx(1.0) and none["first_div"] is None
    assert none["diverged"] == 0 and none["mc_agree"] == 1.0
    assert re.fullmatch(r"[0-9.e+-]+", metric("kl", rows[0]["kl"]))


# ------------------------------------------------------------------ runs that stop at different steps (hand-made)

# (prompt, mode) → per step (kl, cum_kl); kl None: one model has ended, nothing compared (cum_kl kept)
UNEVEN_STEPS = {
    ("p0", "shared"): [(0.1, 0.1), (0.2, 0.3), (0.3, 0.6), (0.4, 1.0)],
    ("p1", "shared"): [(0.2, 0.2), (0.2, 0.4), (0.1, 0.5)],
    ("p2", "shared"): [(0.3, 0.3)],
    ("p0", "free"): [(0.5, 0.5), (0.5, 1.0), (0.5, 1.5), (None, 1.5), (None, 1.5)],
    ("p1", "free"): [(0.4, 0.4), (0.4, 0.8), (0.4, 1.2), (0.4, 1.6), (0.4, 2.0)],
    ("p2", "free"): [(0.6, 0.6), (0.6, 1.2)],
}
UNEVEN_SPLIT = {"p0": 1, "p1": 3, "p2": None}  # free mode's first_divergence, 0-based as in the tables


def _uneven_run(folder):
    """A batch output written by hand: wanda:0.5, three prompts that stop at different steps, both modes."""
    folder.mkdir(parents=True)
    manifest = {
        "format": "hierui-batch",
        "model": "tiny-random",
        "specs": ["wanda:0.5"],
        "modes": ["shared", "free"],
        "settings": {"max_new_tokens": 5, "temperature": 1.0},
        "calibration": {"samples": 4, "length": 16},
    }
    (folder / "batch.json").write_text(json.dumps(manifest), encoding="utf-8")
    steps, summary = [], []
    for (prompt, mode), values in UNEVEN_STEPS.items():
        ident = {"run_id": f"{prompt}-wanda-0.5-{mode}", "spec": "wanda:0.5", "mode": mode, "prompt_id": prompt}
        steps += [{**ident, "step": i, "kl": kl, "cum_kl": cum} for i, (kl, cum) in enumerate(values)]
        summary.append(
            {
                **ident,
                "measured_sparsity": 0.5,
                "emb_cos_final_mean": 0.95,
                "logit_cos_mean": 0.9,
                "prob_cos_mean": 0.8,
                "kl_mean": 0.2,
                "kl_est_mean": 0.18,
                "amp_mean": 2.0,
                "same_top1_rate": 0.8,
                "cum_kl": values[-1][1],
                "first_divergence": UNEVEN_SPLIT[prompt] if mode == "free" else None,
            }
        )
    pq.write_table(pa.Table.from_pylist(steps), folder / "steps.parquet")
    pq.write_table(pa.Table.from_pylist(summary), folder / "summary.parquet")
    return folder


@pytest.fixture()
def uneven(tmp_path):
    return _uneven_run(tmp_path / "uneven")


def test_cum_kl_curves_average_over_the_runs_still_generating(uneven):
    run = R.load_run(uneven)
    curves = R.cum_kl_curves(run)
    assert list(curves) == [("wanda:0.5", "shared"), ("wanda:0.5", "free")]
    shared, free = curves.values()
    # shared: the runs stop after 4, 3 and 1 steps
    assert shared.steps == [0, 1, 2, 3] and shared.n == [3, 2, 2, 1] and shared.runs == 3
    assert shared.generating == pytest.approx([0.2, 0.35, 0.55, 1.0])  # the last point is one run's value
    assert shared.carried == pytest.approx([0.2, (0.3 + 0.4 + 0.3) / 3, (0.6 + 0.5 + 0.3) / 3, 0.6])
    assert shared.varies and shared.lengths == (1, 4)
    # free: p0's last two records compare nothing (one model ended): it stopped generating after 3 steps
    assert free.n == [3, 3, 2, 1, 1] and free.lengths == (2, 5)
    assert free.generating[-1] == pytest.approx(2.0)
    assert free.final == pytest.approx((1.5 + 2.0 + 1.2) / 3)
    # the tables' figure (mean final cum KL over runs) is where the carried curve ends
    row = R.spec_rows(run)[0]
    assert row["cum_kl_shared"] == pytest.approx(shared.final) and row["cum_kl_free"] == pytest.approx(free.final)


def test_cum_kl_curves_of_runs_of_equal_length_coincide(recipe_run):
    for curve in R.cum_kl_curves(R.load_run(recipe_run)).values():
        assert not curve.varies and curve.n == [curve.runs] * len(curve.steps)
        assert curve.generating == pytest.approx(curve.carried)


def _lines(text):
    return [line.rstrip() for line in text.splitlines()]


@pytest.mark.parametrize("columns", [80, 120])
def test_show_run_dir_wraps_no_table_title(cli, uneven, recipe_run, columns):
    for folder in (uneven, recipe_run):
        run = cli("show", folder, env={"COLUMNS": str(columns)})
        assert run.returncode == 0, run.stderr
        lines = _lines(run.stdout)
        drawn = [line for line in lines if str(folder) not in line]  # paths are left whole, to copy
        assert all(len(line) <= columns for line in drawn), max(drawn, key=len)
        for title in (
            "the hierarchy, per spec (shared mode means over steps and prompts)",
            "accumulation, first divergence and multiple choice, per spec",
        ):  # each title whole on one line of its own (a rich title would wrap inside the narrow table)
            assert any(line.strip().startswith(title) for line in lines), (title, run.stdout)
        assert "cum KL: the mean final accumulated KL over runs" in run.stdout


def test_show_run_dir_draws_both_honest_means(cli, uneven):
    run = cli("show", uneven, env={"COLUMNS": "120"})
    assert run.returncode == 0, run.stderr
    out = run.stdout
    assert "mean over all 3 runs per line: a run that stopped keeps its final value" in out
    assert "mean over only the runs still generating (both models)" in out
    assert "wanda:0.5 shared n 3→1" in out and "wanda:0.5 free n 3→1" in out  # how many are left, per line
    # the table's figures, and the carried chart's top tick agrees with the free one (1.567)
    row = next(line for line in _lines(out) if line.strip().startswith("wanda:0.5") and "0.6000" in line)
    assert row.split()[1:] == ["0.6000", "1.567", "3"]  # 1st div: median of steps 1 and 3 (0-based) → step 3
    assert "1.57┤" in out


def test_report_shows_both_means_and_n_per_step(uneven):
    page = HR.render_html(R.load_run(uneven))
    accumulation = page.split('id="accumulation"')[1].split("</section>")[0]
    assert "cum KL shared: mean final over runs" in accumulation
    assert "<td>0.6000</td><td>1–4</td><td>1.567</td><td>2–5</td>" in accumulation
    for text in ("runs still", "a run that stopped keeps its final value", "still generating at each step"):
        assert text in accumulation, text
    assert "generation step (1 = the first generated token)" in accumulation


def test_steps_are_counted_from_1_in_the_report(uneven):
    page = HR.render_html(R.load_run(uneven))
    split = page.split('id="first-divergence"')[1].split("</section>")[0]
    # free runs split at steps 1 and 3 (0-based): 2 and 4 as people count, median 3
    assert "<td>wanda:0.5</td><td>3</td><td>2</td><td>3</td><td>2</td><td>4</td>" in split
    assert "Steps count from 1" in page


def test_show_batch_counts_steps_from_1():
    from hierui.format import step_label
    from hierui.views.batch import value_text

    assert step_label(0) == "1" and step_label(None) == "—" and step_label(3.0) == "4" and step_label(3.5) == "4.5"
    assert value_text("first_div", 2.0) == "3" and value_text("first_divergence", 1.5) == "2.5"
    assert value_text("cum_kl_free", 2.0) == metric("cum_kl_free", 2.0)


# ------------------------------------------------------------------ the report's sentences read the run's numbers


def _row(spec="wanda:0.5", **values):
    base = dict.fromkeys(
        ("emb_cos", "logit_cos", "prob_cos", "kl", "kl_est", "amp", "top1", "cum_kl_shared", "cum_kl_free")
    )
    return {"spec": spec, **base, **values}


def test_hierarchy_check_confirms_and_contradicts():
    grows = RD.hierarchy_check(_row(emb_cos=0.99, logit_cos=0.95, prob_cos=0.9))
    assert grows.holds is True
    # wanda:0.5 in the README's sweep: prob cos above logit cos, 1 − cos shrinks from logits to probabilities
    shrinks = RD.hierarchy_check(_row(emb_cos=0.747, logit_cos=0.503, prob_cos=0.66))
    assert shrinks.holds is False
    assert (
        "shrinks from logits to probabilities" in shrinks.detail and "0.66000 above logit cos 0.50300" in shrinks.detail
    )
    first = RD.hierarchy_check(_row(emb_cos=0.9, logit_cos=0.95, prob_cos=0.5))
    assert first.holds is False and "from hidden states to logits" in first.detail
    assert RD.hierarchy_check(_row(spec="none", emb_cos=1.0, logit_cos=1.0, prob_cos=1.0)).identical
    assert RD.hierarchy_check(_row()) is None


def test_amplification_check_confirms_and_contradicts():
    assert RD.amplification_check(_row(amp=4.3, logit_cos=0.9)).holds is True
    below = RD.amplification_check(_row(amp=0.538, logit_cos=0.72))
    assert below.holds is False and "amp 0.5380" in below.detail
    assert RD.amplification_check(_row(spec="none", amp=None, logit_cos=1.0)).identical
    # amp (mean of a per-step ratio) above 1 while the mean cosines say probabilities deviate less
    rows = [_row(amp=3.5, logit_cos=0.503, prob_cos=0.66), _row(spec="int8", amp=6.2, logit_cos=0.99, prob_cos=0.98)]
    assert RD.amplification_disagreements(rows) == ["wanda:0.5"]


def test_kl_theory_check_confirms_and_contradicts():
    assert RD.kl_theory_check(_row(kl=0.179, kl_est=0.164)).holds is True
    far = RD.kl_theory_check(_row(kl=5.112, kl_est=2.674))
    assert far.holds is False and "0.52× the measured" in far.detail and "below" in far.detail
    assert RD.kl_theory_check(_row(kl=0.0, kl_est=0.0)).identical


def test_accumulation_check_confirms_and_contradicts():
    assert RD.accumulation_check(_row(cum_kl_shared=5.7, cum_kl_free=256.0)).holds is True
    less = RD.accumulation_check(_row(cum_kl_shared=4.0, cum_kl_free=3.0))
    assert less.holds is False and "free 3.000 against shared 4.000" in less.detail
    assert RD.accumulation_check(_row(cum_kl_shared=1.0)) is None  # one mode only: nothing to compare


def test_choice_checks_confirm_and_contradict():
    stable = {"spec": "wanda:0.3", "acc_d": 0.875, "acc_p": 0.833, "agree": 0.9, "gen_top1": 0.82}
    assert RD.choice_check(stable).holds is True  # accuracy −0.042, top-1 agreement −0.18
    drops = {"spec": "magnitude:0.7", "acc_d": 0.875, "acc_p": 0.264, "agree": 0.3, "gen_top1": 0.9}
    check = RD.choice_check(drops)
    assert check.holds is False and "accuracy drops by 0.611" in check.detail and "(to 0.900)" in check.detail
    assert RD.choice_check({**drops, "gen_top1": None}).holds is None  # no generation to set it against
    same = {"spec": "none", "acc_d": 0.5, "acc_p": 0.5, "agree": 1.0, "gen_top1": 1.0}
    assert RD.choice_check(same).identical
    assert RD.choice_kl_check({"spec": "x", "sub_kl": 0.05, "kl": 0.19}).holds is True
    assert RD.choice_kl_check({"spec": "x", "sub_kl": 0.3, "kl": 0.2}).holds is False


def test_reading_says_whether_the_pattern_holds_spec_by_spec():
    pattern, contrary = RD.CLAIMS["hierarchy"]
    ok = RD.Check("a", True)
    bad = RD.Check("b", False, "1 − cos shrinks from logits to probabilities")
    same = RD.Check("none", None, identical=True)
    assert RD.reading([], pattern, contrary) is None
    every = RD.reading([ok, RD.Check("c", True), same], pattern, contrary)
    assert every["holds"] is True and every["verdict"] == f"Under all 2 specs that change the outputs, {pattern}."
    assert "none leaves the outputs identical" in every["details"]
    mixed = RD.reading([ok, bad], pattern, contrary)
    assert mixed["holds"] is False and mixed["verdict"] == f"Under 1 of 2 specs, {pattern}; under b, it does not."
    assert "b: 1 − cos shrinks from logits to probabilities" in mixed["details"]
    none = RD.reading([bad], pattern, contrary)
    assert (
        none["holds"] is False and none["verdict"].startswith("Contrary to the claim") and contrary in none["verdict"]
    )
    nothing = RD.reading([same], pattern, contrary)
    assert nothing["holds"] is None and "identical" in nothing["verdict"]


def test_report_says_when_a_run_contradicts_the_pattern(uneven, tmp_path):
    """The page states what the run's numbers show: the claimed pattern where they confirm it, the
    contrary, spec by spec, where they do not."""
    page = HR.render_html(R.load_run(uneven))
    assert f"Under wanda:0.5, the one spec that changes the outputs, {RD.CLAIMS['hierarchy'][0]}." in page
    # the same run with probabilities closer than logits and amp below 1
    folder = tmp_path / "contrary"
    shutil.copytree(uneven, folder)
    table = pq.read_table(folder / "summary.parquet").to_pylist()
    for r in table:
        r.update(prob_cos_mean=0.95, amp_mean=0.5)
    pq.write_table(pa.Table.from_pylist(table), folder / "summary.parquet")
    page = HR.render_html(R.load_run(folder))
    said = re.findall(r'<(?:p class="reading|li class=")[^>]*>(.*?)</(?:p|li)>', page)  # the page's findings
    # four claims with data, in the summary and in their sections, and the lens's reading in "where it breaks"
    assert len(said) == 2 * 4 + 1
    assert not any(RD.CLAIMS["hierarchy"][0] in text for text in said)  # the pattern is not claimed …
    assert "Expected: 1 − cos grows" in page  # … only named as what is expected
    assert "Contrary to the claim" in page and RD.CLAIMS["hierarchy"][1] in page
    assert "1 − cos shrinks from logits to probabilities (prob cos 0.95000 above logit cos 0.90000)" in page
    assert RD.CLAIMS["amplification"][1] in page and "amp 0.5000" in page
    assert 'class="reading contradicted"' in page


def test_a_run_folder_without_its_steps_table_is_one_line(cli, tmp_path):
    folder = _synthetic_run(tmp_path / "nosteps")
    (folder / "steps.parquet").unlink()
    for command in ("show", "report"):
        run = cli(command, folder)
        assert run.returncode == 2 and "no steps.parquet" in run.stderr
        assert len(run.stderr.strip().splitlines()) == 1 and "Traceback" not in run.stderr


def test_show_run_dir_prints_names_from_its_files_escaped(cli, tmp_path):
    """A manifest's model and a spec name are text from a file: no markup, no terminal control characters."""
    folder = _synthetic_run(tmp_path / "ctl", specs=("wanda:0.5\x1b[31m", "none"))
    manifest = json.loads((folder / "batch.json").read_text(encoding="utf-8"))
    manifest["model"] = "[bold]m\x1b]0;pwned\x07"
    (folder / "batch.json").write_text(json.dumps(manifest), encoding="utf-8")
    run = cli("show", folder)
    assert run.returncode == 0, run.stderr
    assert "\x1b" not in run.stdout and "\x07" not in run.stdout
    assert "[bold]m\\x1b]0;pwned\\x07" in run.stdout and "wanda:0.5\\x1b[31m" in run.stdout
