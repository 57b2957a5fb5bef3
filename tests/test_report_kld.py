"""The "Corpus KLD" section of hierui report (hierui.report.kld): a hierui kld output alone, or beside a batch."""

from __future__ import annotations

import json
import re
import shutil

import pyarrow.parquet as pq
import pytest

from engine.kld import corpus as kld
from engine.record import schema
from hierui.format import count, metric, pct
from hierui.report import kld as K
from hierui.report import page as HR

CTX = 32
TEXT = " ".join(f"Sentence number {i} tells of a {w} that walked to the river." for i, w in enumerate("abcde"))
SPECS = ("magnitude:0.5", "magnitude:0.8")
FILES = ("kld_summary.parquet", "kld_pairs.parquet", "kld_worst.json", "kld_tokens.parquet")


@pytest.fixture(scope="module")
def kld_out(tiny, tmp_path_factory):
    """hierui kld's tables for two specs on tiny-random (what `hierui kld --out` writes)."""
    from engine.perturb import perturb

    pairs = [perturb(tiny, spec, use_cache=False) for spec in SPECS]
    run = kld.score(tiny, pairs, TEXT, "test", ctx=CTX)
    out = tmp_path_factory.mktemp("kld")
    kld.write_tables(run, out, tiny.tokenizer)
    return out


def _copy(kld_out, folder):
    folder.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        shutil.copy(kld_out / name, folder / name)
    return folder


def _rewrite_summary(folder, change):
    rows = pq.read_table(folder / K.SUMMARY).to_pylist()
    for row in rows:
        for name, kind in schema.KLD_SUMMARY.items():  # to_table encodes JSON columns again
            if kind == schema.JSON and isinstance(row.get(name), str):
                row[name] = json.loads(row[name])
        change(row)
    pq.write_table(schema.to_table(rows, schema.KLD_SUMMARY, K.SUMMARY), folder / K.SUMMARY)
    return rows


def _section(page: str) -> str:
    return page[page.index(f'<section id="{K.SECTION_ID}">') :]


def test_a_kld_folder_alone_is_a_page_of_its_section(kld_out, tmp_path):
    page = HR.write_report(kld_out, tmp_path / "a.html").read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert "<title>hierui report — kld: tiny-random on test</title>" in page
    assert page.count("<section") == 1 and f'<section id="{K.SECTION_ID}">' in page
    assert 'id="claim"' not in page and "The claim." not in page
    summary = pq.read_table(kld_out / K.SUMMARY).to_pylist()
    first = summary[0]
    assert f"ctx {CTX}, stride {CTX}" in page and f"{first['windows']} windows" in page
    assert f"{first['tokens']} scored tokens" in page and "2 specs" in page
    # the per-spec figures of kld_summary.parquet, as the page prints them
    for row in summary:
        cells = re.search(rf"<tr><td>{re.escape(row['spec'])}</td>(.*?)</tr>", page).group(1)
        expected = [
            count(row["tokens"]),
            metric("kl", row["kl_mean"]) + f" [{metric('kl', row['kl_mean_lo'])}, {metric('kl', row['kl_mean_hi'])}]",
            metric("kl", row["kl_p99"]),
            metric("kl", row["kl_max"]),
            pct(row["same_top"]) + " ± " + pct(row["same_top_unc"]),
            pct(row["dp_rms"]),
            str(row["right_to_wrong"]),
            str(row["wrong_to_right"]),
            metric("mcnemar_p", row["mcnemar_p"]),
        ]
        for text in expected:
            assert f"<td>{text}</td>" in cells, (text, cells)
        assert f"<td>{metric('ppl_ratio', row['ppl_ratio'])} ± " in cells
    # the pair, its differences and the verdict kldview.pair_lines would give
    pair = pq.read_table(kld_out / K.PAIRS).to_pylist()[0]
    assert f"<td>{SPECS[0]} vs {SPECS[1]}</td>" in page
    diff = f"{metric('kl', pair['kl_diff'])} [{metric('kl', pair['kl_diff_lo'])}, {metric('kl', pair['kl_diff_hi'])}]"
    assert f"<td>{diff}</td>" in page
    assert f"<td>{pair['a_only']}, {pair['b_only']}</td>" in page
    differs, _ = K.pair_verdict(pair)
    verdict = "differs: " + ", ".join(differs) if differs else "no significant difference"
    assert f"<td>{verdict}</td>" in page
    # the worst tokens: the highest KLD of the file first, 20 rows
    worst = json.loads((kld_out / K.WORST).read_text(encoding="utf-8"))["worst"]
    top = max(worst, key=lambda w: w["kl"])
    table = page[page.index("<th>context (its tail)</th>") :]
    table = table[: table.index("</table>")]
    assert table.count("<tr>") == K.WORST_SHOWN and f"<td>{metric('kl', top['kl'])}</td>" in table
    # readings and the two charts (confidence deciles, hidden-state cosine per layer)
    assert "Silent failures: none found" in page and "lower bound" not in page
    assert page.count("<svg") == 2 and 'id="kld-confidence-' in page and 'id="kld-hidden-' in page
    ids = re.findall(r'\bid="([^"]+)"', page)
    assert len(ids) == len(set(ids))
    assert not re.search(r"<script|<link|<img|\bsrc=|url\((?!#)", page)
    # the same page, byte for byte, on a second write
    assert HR.write_report(kld_out, tmp_path / "b.html").read_bytes() == (tmp_path / "a.html").read_bytes()


def test_a_batch_folder_with_kld_tables_gets_section_8(kld_out, tmp_path):
    from test_report import _synthetic_run

    folder = _copy(kld_out, _synthetic_run(tmp_path / "batch", specs=("wanda:0.5", "none")))
    page = HR.write_report(folder).read_text(encoding="utf-8")
    ids = re.findall(r'<section id="([^"]+)">', page)
    assert ids == ["claim", *HR.SECTION_IDS, K.SECTION_ID]
    assert "<h2>8. Corpus KLD" in page and "The claim." in page
    assert page.count("<svg", page.index(f'<section id="{K.SECTION_ID}">')) == 2
    assert "kld_summary.parquet, kld_pairs.parquet, kld_worst.json." in page  # the footer names the files
    assert page == HR.render_html(HR.load_run(folder))


def test_a_folder_with_neither_output_is_one_line(cli, tmp_path):
    (tmp_path / "empty").mkdir()
    run = cli("report", tmp_path / "empty")
    assert run.returncode == 2, (run.stdout, run.stderr)
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "batch.json" in lines[0] and "kld_summary.parquet" in lines[0], lines
    assert "hierui batch --out" in lines[0] and "hierui kld --out" in lines[0]


def test_unreadable_kld_files_are_one_line(cli, kld_out, tmp_path):
    folder = _copy(kld_out, tmp_path / "bad")
    (folder / K.WORST).write_text("{", encoding="utf-8")
    run = cli("report", folder)
    assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1
    assert "kld_worst.json is unreadable" in run.stderr
    (folder / K.SUMMARY).write_bytes(b"not parquet")
    run = cli("report", folder)
    assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1
    assert "kld_summary.parquet is unreadable" in run.stderr and "Traceback" not in run.stderr


def test_a_silent_failure_is_read_out_and_names_are_escaped(kld_out, tmp_path):
    folder = _copy(kld_out, tmp_path / "silent")

    def silent(row):
        if row["spec"] == SPECS[0]:
            row.update(spec="<b>quiet</b>\x1b", kl_mean=0.002, right_to_wrong=9, wrong_to_right=0, mcnemar_p=0.0039)
            row["silent"] = True

    _rewrite_summary(folder, silent)
    section = _section(HR.write_report(folder).read_text(encoding="utf-8"))
    assert "<b>quiet" not in section and "\x1b" not in section
    name = "&lt;b&gt;quiet&lt;/b&gt;\\x1b"
    assert f"Silent failures: {name} — a mean KLD per corpus token below a threshold of" in section
    assert f"{name}: KLD {metric('kl', 0.002)}, 9 right → wrong and 0 wrong → right" in section
    assert 'class="reading contradicted"' in section
    assert re.search(rf"<tr><td>{re.escape(name)}</td>.*?<td>yes</td></tr>", section)


def test_a_top_k_base_file_says_lower_bounds_and_has_no_hidden_chart(kld_out, tmp_path):
    folder = _copy(kld_out, tmp_path / "base")
    _rewrite_summary(folder, lambda row: row.update(base="dense.kldbase", base_k=32, hidden_cos=None))
    page = HR.write_report(folder).read_text(encoding="utf-8")
    assert "top-32 base file (dense.kldbase)" in page and "is a lower bound" in page
    assert "against base file dense.kldbase (top-32, KLD lower bounds)" in page  # the meta line
    assert page.count("<svg") == 1 and 'id="kld-hidden-' not in page


def test_gguf_candidates_get_the_size_table_and_chart(kld_out, tmp_path):
    """Rows with a file size (GGUF candidates): the candidates-by-size table, smallest first, and the KLD-against-
    size chart; a folder without them has neither."""
    folder = _copy(kld_out, tmp_path / "sized")
    sizes = {SPECS[0]: 3 * 2**20, SPECS[1]: 2 * 2**20}  # the sparser spec stands for the smaller file

    def sized(row):
        row.update(file_size=sizes[row["spec"]], bits_per_weight=4.5, quant_types={"Q4_K": 3, "F32": 1})

    _rewrite_summary(folder, sized)
    section = _section(HR.write_report(folder).read_text(encoding="utf-8"))
    assert 'id="kld-size-' in section and "Pareto front" in section
    table = section[section.index("<th>candidate</th>") :]
    assert table.index("<td>2.0</td>") < table.index("<td>3.0</td>")  # smallest first
    assert "Q4_K 75% · F32 25%" in table
    plain = _section(HR.write_report(kld_out, tmp_path / "plain.html").read_text(encoding="utf-8"))
    assert "kld-size" not in plain and "<th>candidate</th>" not in plain
