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

from engine import recipe as RC
from engine import runs as R
from engine.errors import HieruiError
from engine.perturb.spec import parse_spec
from hierui import report as HR
from hierui.cli import app
from hierui.format import metric

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
    ("missing prompts file", 'prompts = ["absent.txt"]\nspecs = ["none"]\n', "prompts file not found: absent.txt"),
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
]


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
    assert (tmp_path / "out" / "recipe.toml").read_text() == path.read_text()
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
    assert manifest["settings"]["max_new_tokens"] == 4 and manifest["calibration"]["samples"] == 4
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
    assert page.count("<svg") == 6  # one chart per section
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
    """A batch output without a model: batch.json and summary.parquet, shared mode, two specs."""
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
    assert page.count("<svg") == 4


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
