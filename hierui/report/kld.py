"""The "Corpus KLD" section of `hierui report`: a `hierui kld --out` folder's tables as one section of the page.

    data       load_kld(folder): kld_summary.parquet (required), kld_pairs.parquet and kld_worst.json (optional),
               each checked against engine.record.schema; anything unreadable is one HieruiError line
    section    section(data, number): the dict hierui/report/page.py's sections have (id SECTION_ID): a table per
               spec (llama.cpp's figures, the bootstrap interval, the flips), the pairs of specs, the worst
               tokens, readings decided from the numbers (which specs differ, silent failures, lower bounds
               from a top-K base file) and two charts (hierui.report.charts): the mean KLD per decile of the
               dense top-1 probability and the hidden-state 1 − cos per layer
    page       render_html(data): the page with this section alone, for a folder with no batch output

Numbers print through hierui.format, text read from the files through hierui.tokentext.escape (and Jinja's
autoescape): the page is the same, byte for byte, for the same files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from engine.errors import HieruiError
from engine.results.paired import SIGNIFICANT, SILENT_KL, is_silent, silent_limit
from engine.results.runs import layer_sparsity
from hierui.format import MISSING, count, metric, num, pct, prob
from hierui.tokentext import escape

SECTION_ID = "corpus-kld"
SUMMARY, PAIRS, WORST = "kld_summary.parquet", "kld_pairs.parquet", "kld_worst.json"
WORST_SHOWN = 20  # the tokens with the highest KLD shown, over all specs
CONTEXT_CHARS = 60  # the tail of a worst token's context shown
WORST_KEYS = {"spec", "kl", "text", "context", "p_d", "p_p", "top_d", "top_p"}
REQUIRED = {
    SUMMARY: ("spec", "tokens", "kl_mean", "same_top", "conf_count", "conf_kl_mean"),
    PAIRS: ("spec_a", "spec_b", "kl_diff", "same_top_diff"),
}


@dataclass
class KldData:
    """What a `hierui kld --out` folder holds, as rows (engine.record.schema.KLD_SUMMARY, KLD_PAIRS; kld_worst.json)."""

    path: Path
    summary: list[dict]
    pairs: list[dict] = field(default_factory=list)
    worst: list[dict] = field(default_factory=list)

    @property
    def files(self) -> list[str]:
        return [SUMMARY] + ([PAIRS] if (self.path / PAIRS).is_file() else []) + ([WORST] if self.worst else [])

    @property
    def first(self) -> dict:
        return self.summary[0]


def has_kld(folder: str | Path) -> bool:
    """Whether `folder` holds a `hierui kld --out` output (its kld_summary.parquet)."""
    return (Path(folder) / SUMMARY).is_file()


def _read(file: Path, name: str) -> list[dict]:
    import pyarrow.parquet as pq

    from engine.record import schema

    try:
        table = pq.read_table(file)
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise HieruiError(f"{file} is unreadable ({type(e).__name__}); rerun hierui kld to rewrite it") from None
    missing = [c for c in REQUIRED[file.name] if c not in table.column_names]
    if missing:
        raise HieruiError(
            f"{file} is not a hierui {name} table (no column {', '.join(repr(c) for c in missing)}); "
            "rerun hierui kld to rewrite it"
        )
    declared = schema.TABLES[name]
    for column in table.schema:
        kind = declared.get(column.name)
        if kind is not None and column.type != schema.arrow_type(kind) and str(column.type) != "null":
            raise HieruiError(
                f"{file}: column '{column.name}' is {column.type}, expected {schema.arrow_type(kind)} "
                "(engine/record/schema.py); rerun hierui kld to rewrite it"
            )
    return table.to_pylist()


def load_kld(folder: str | Path) -> KldData:
    """Read a `hierui kld --out` folder: one HieruiError line for a missing summary or an unreadable file."""
    path = Path(folder)
    if not has_kld(path):
        raise HieruiError(f"{path} is not a hierui kld output (no {SUMMARY}): run hierui kld --out {path} first")
    summary = _read(path / SUMMARY, "kld_summary")
    if not summary:
        raise HieruiError(f"{path / SUMMARY} holds no spec; rerun hierui kld to rewrite it")
    pairs = _read(path / PAIRS, "kld_pairs") if (path / PAIRS).is_file() else []
    worst: list[dict] = []
    if (path / WORST).is_file():
        try:
            worst = list(json.loads((path / WORST).read_text(encoding="utf-8"))["worst"])
            if not all(isinstance(w, dict) and WORST_KEYS <= w.keys() for w in worst):
                raise KeyError("an entry without a field the report reads")
            if not all(isinstance(w["kl"], (int, float)) for w in worst):
                raise TypeError("a KLD that is not a number")
        except (OSError, ValueError, KeyError, TypeError, RecursionError):
            raise HieruiError(f"{path / WORST} is unreadable; rerun hierui kld to rewrite it") from None
    return KldData(path, summary, pairs, worst)


# ------------------------------------------------------------------ readings


def _names(specs: list[str]) -> str:
    return ", ".join(specs[:-1]) + f" and {specs[-1]}" if len(specs) > 1 else specs[0]


def _interval_differs(lo, hi) -> bool | None:
    """hierui.views.kld.pair_lines' verdict on a 95% interval: it differs when the interval excludes 0."""
    return None if lo is None or hi is None else (lo > 0 or hi < 0)


def pair_verdict(row: dict) -> tuple[list[str], bool | None]:
    """What differs between the two specs of a kld_pairs row, as hierui.views.kld.pair_lines decides (an interval
    that excludes 0, McNemar's p < 0.05): (the measures that differ, whether any does; None: none judged)."""
    tests = {
        "mean KLD": _interval_differs(row.get("kl_diff_lo"), row.get("kl_diff_hi")),
        "same top": _interval_differs(row.get("same_top_diff_lo"), row.get("same_top_diff_hi")),
        "top-1 correctness": None if row.get("mcnemar_p") is None else row["mcnemar_p"] < SIGNIFICANT,
    }
    differs = [name for name, d in tests.items() if d]
    judged = [d for d in tests.values() if d is not None]
    return differs, (bool(differs) if judged else None)


def pair_reading(pairs: list[dict]) -> dict | None:
    """Which pairs of specs differ significantly on the corpus tokens; None without pairs."""
    if not pairs:
        return None
    found, same = [], []
    for r in pairs:
        differs, any_ = pair_verdict(r)
        name = f"{escape(r['spec_a'])} vs {escape(r['spec_b'])}"
        if any_:
            found.append(f"{name} ({', '.join(differs)})")
        elif any_ is False:
            same.append(name)
    parts = []
    if found:
        parts.append("Pairs of specs that differ significantly on the same tokens: " + "; ".join(found) + ".")
    if same:
        parts.append("No significant difference: " + "; ".join(same) + ".")
    if not parts:
        parts.append("No pair of specs could be judged (too few tokens or windows).")
    return {"verdict": " ".join(parts), "details": "", "holds": None}


def _silent(row: dict) -> bool:
    if row.get("silent") is not None:
        return bool(row["silent"])
    return is_silent(row.get("kl_mean"), row.get("mcnemar_p"), row.get("noise_floor_kl"))


def silent_reading(rows: list[dict]) -> dict | None:
    """hierui.report.readings.silent_failures' reading for corpus tokens: specs whose mean KLD per token is below the
    noise floor's (or SILENT_KL) while their flips of top-1 correctness are significant."""
    if not rows:
        return None
    floor = next((r["noise_floor_kl"] for r in rows if r.get("noise_floor_kl") is not None), None)
    limit = silent_limit(floor)
    source = "the noise floor's" if floor is not None and floor >= SILENT_KL else "a threshold of"
    found = [r for r in rows if _silent(r)]
    if not found:
        return {
            "verdict": f"Silent failures: none found (no spec with a mean KLD per corpus token below {source} "
            f"{metric('kl', limit)} nats whose flips of top-1 correctness are significant, McNemar p < "
            f"{SIGNIFICANT}).",
            "details": "",
            "holds": None,
        }
    return {
        "verdict": f"Silent failures: {_names([escape(r['spec']) for r in found])} — a mean KLD per corpus token "
        f"below {source} {metric('kl', limit)} nats, yet significant flips of top-1 correctness against the "
        f"actual next token (McNemar p < {SIGNIFICANT}).",
        "details": "; ".join(
            f"{escape(r['spec'])}: KLD {metric('kl', r['kl_mean'])}, {count(r.get('right_to_wrong'))} right → wrong "
            f"and {count(r.get('wrong_to_right'))} wrong → right, p = {metric('mcnemar_p', r.get('mcnemar_p'))}"
            for r in found
        )
        + ".",
        "holds": False,
    }


def base_reading(rows: list[dict]) -> dict | None:
    """Against a top-K base file, KLD and reverse KLD are lower bounds: say so (None otherwise)."""
    row = rows[0]
    if row.get("base") is None or row.get("base_k") is None:
        return None
    return {
        "verdict": f"Compared against a top-{row['base_k']} base file ({escape(row['base'])}), not the dense model: "
        "every KLD and reverse KLD here is a lower bound (the dense probabilities outside its top "
        f"{row['base_k']} are known only as one tail mass), and the hidden-state cosines are unavailable.",
        "details": "",
        "holds": None,
    }


# ------------------------------------------------------------------ tables


def _plus_minus(name: str, value, unc) -> str:
    if value is None:
        return MISSING
    return metric(name, value) + ("" if unc is None else f" ± {num(unc, 2)}")


def _pct_pm(value, unc) -> str:
    if value is None:
        return MISSING
    return pct(value) + ("" if unc is None else f" ± {pct(unc)}")


def _ci(name: str, value, lo, hi, fmt=None) -> str:
    fmt = fmt or (lambda v: metric(name, v))
    if value is None:
        return MISSING
    return fmt(value) + ("" if lo is None or hi is None else f" [{fmt(lo)}, {fmt(hi)}]")


def _table(columns: list[str], rows: list[list[str]]) -> dict:
    return {"head": columns, "rows": rows}


def spec_table(rows: list[dict]) -> dict:
    """Per spec: llama.cpp's figures with their uncertainty, the bootstrap interval, the flips."""
    return _table(
        [
            "spec",
            "tokens",
            "PPL(Q)/PPL(base)",
            "mean KLD [95% CI]",
            "KLD p99",
            "KLD max",
            "same top p",
            "RMS Δp",
            "right → wrong",
            "wrong → right",
            "McNemar p",
            "silent failure",
        ],
        [
            [
                escape(r["spec"]),
                count(r.get("tokens")),
                _plus_minus("ppl_ratio", r.get("ppl_ratio"), r.get("ppl_ratio_unc")),
                _ci("kl", r.get("kl_mean"), r.get("kl_mean_lo"), r.get("kl_mean_hi")),
                metric("kl", r.get("kl_p99")),
                metric("kl", r.get("kl_max")),
                _pct_pm(r.get("same_top"), r.get("same_top_unc")),
                MISSING if r.get("dp_rms") is None else pct(r["dp_rms"]),
                count(r.get("right_to_wrong")),
                count(r.get("wrong_to_right")),
                metric("mcnemar_p", r.get("mcnemar_p")),
                "yes" if _silent(r) else "no",
            ]
            for r in rows
        ],
    )


def size_table(sized: list[dict]) -> dict:
    """The GGUF candidates smallest first (engine.results.sizes.candidates_by_size): what each file holds, its KLD,
    its paired difference from the next smaller one, and whether it is on the Pareto front."""
    from engine.models.gguf_info import types_label

    def versus(v: dict | None) -> str:
        if v is None:
            return MISSING
        return f"{metric('kl', v['diff'])} [{metric('kl', v['lo'])} … {metric('kl', v['hi'])}] {_verdict(v)}"

    return _table(
        [
            "candidate",
            "MiB",
            "bits per weight",
            "types (share of weights)",
            "mean KLD",
            "KLD p99.9",
            "same top p",
            "vs the next smaller (KLD this − that)",
            "Pareto front",
        ],  # fmt: skip
        [
            [
                escape(r["name"]),
                f"{r['file_size'] / 2**20:.1f}",
                num(r.get("bits_per_weight")),
                escape(types_label(r["types"])),
                metric("kl", r.get("kl_mean")),
                metric("kl", r.get("kl_p99_9")),
                MISSING if r.get("same_top") is None else pct(r["same_top"]),
                versus(r["versus"]),
                "yes" if r["front"] else "no",
            ]
            for r in sized
        ],
    )


def _verdict(v: dict) -> str:
    return "differs" if v["lo"] > 0 or v["hi"] < 0 else "no significant difference"


def pair_table(pairs: list[dict]) -> dict:
    """Per pair of specs (a before b): the paired differences a − b and the verdict."""

    def verdict(r: dict) -> str:
        differs, any_ = pair_verdict(r)
        return "n/a" if any_ is None else ("differs: " + ", ".join(differs) if any_ else "no significant difference")

    return _table(
        [
            "spec a vs spec b",
            "tokens",
            "Δ mean KLD a − b [95% CI]",
            "Δ same top a − b [95% CI]",
            "top-1 right: a only, b only",
            "McNemar p",
            "verdict",
        ],
        [
            [
                f"{escape(r['spec_a'])} vs {escape(r['spec_b'])}",
                count(r.get("tokens")),
                _ci("kl", r.get("kl_diff"), r.get("kl_diff_lo"), r.get("kl_diff_hi")),
                _ci("same_top", r.get("same_top_diff"), r.get("same_top_diff_lo"), r.get("same_top_diff_hi"), pct),
                f"{count(r.get('a_only'))}, {count(r.get('b_only'))}",
                metric("mcnemar_p", r.get("mcnemar_p")),
                verdict(r),
            ]
            for r in pairs
        ],
    )


def worst_tokens(worst: list[dict], n: int = WORST_SHOWN) -> list[dict]:
    """The `n` tokens with the highest KLD over all specs (ties: the order of the file)."""
    return sorted(worst, key=lambda w: -float(w["kl"]))[:n]


def _quoted(text) -> str:
    return f"“{escape(text)}”"


def _tail(context: str) -> str:
    return ("…" if len(context) > CONTEXT_CHARS else "") + escape(context[-CONTEXT_CHARS:])


def worst_table(worst: list[dict]) -> dict:
    return _table(
        ["spec", "KLD", "token", "context (its tail)", "p_d", "p_p", "top-1 dense", "top-1 perturbed"],
        [
            [
                escape(w["spec"]),
                metric("kl", w["kl"]),
                _quoted(w["text"]),
                _tail(str(w["context"])),
                prob(w["p_d"]),
                prob(w["p_p"]),
                _quoted(w["top_d"]),
                _quoted(w["top_p"]),
            ]
            for w in worst
        ],
    )


# ------------------------------------------------------------------ the section and its page


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' * (n != 1)}"


def meta(data: KldData) -> list[str]:
    """The page's meta line for a kld folder: the corpus and its windows, from the summary rows."""
    r = data.first
    parts = [
        f"corpus {escape(r.get('corpus') or MISSING)}",
        f"ctx {count(r.get('ctx'))}, stride {count(r.get('stride'))}",
        _plural(int(r.get("windows") or 0), "window"),
        f"{count(r.get('tokens'))} scored tokens",
        _plural(len(data.summary), "spec"),
    ]
    if r.get("base") is not None:
        kind = "exact" if r.get("base_k") is None else f"top-{r['base_k']}, KLD lower bounds"
        if r.get("base_kind") == "llama.cpp":
            kind = "llama.cpp, 16-bit log-probabilities"
        of = f" of {escape(r['base_model'])}" if r.get("base_model") else ""
        parts.append(f"against base file {escape(r['base'])}{of} ({kind})")
    return parts


def section(data: KldData, number: int | None = None) -> dict:
    """The report section of a kld folder, in the shape of hierui/report/page.py's (id SECTION_ID)."""
    from markupsafe import Markup

    from hierui.report import charts as C

    def svg(text: str | None):
        return Markup(text) if text else None

    rows = data.summary
    r = data.first
    where = (
        f"{escape(r.get('model') or MISSING)} on {escape(r.get('corpus') or MISSING)}: "
        f"{_plural(int(r.get('windows') or 0), 'window')} of {count(r.get('ctx'))} tokens, stride "
        f"{count(r.get('stride'))}, {count(r.get('tokens'))} scored tokens"
    )
    s = {
        "id": SECTION_ID,
        "title": (f"{number}. " if number is not None else "") + "Corpus KLD: the perturbed model on a whole text",
        "guide": f"hierui kld ({where}): the dense and the perturbed model read the same text teacher-forced, the "
        "second half of each window scored (as llama.cpp's perplexity --kl-divergence). Per spec: the "
        "perplexity ratio, the mean KL(P_d ‖ P_p) per token and its tail, how often the top-1 token stays the "
        "same, and how often the top-1's correctness against the actual next token flips. The charts: the mean "
        "KLD by how confident the dense model was, and (below the tables) the hidden states' 1 − cos layer by "
        "layer.",
        "readings": [],
    }
    s["readings"] = [x for x in (pair_reading(data.pairs), silent_reading(rows), base_reading(rows)) if x is not None]
    s["note"] = (
        "±: llama.cpp's uncertainty of a mean, sqrt(var/(n − 1)) (binomial for same top). Brackets: 95% "
        "percentile bootstrap intervals, whole windows resampled (2000 times, seed 0), since the tokens of a "
        "window share their context. right → wrong: tokens whose actual next token is the dense model's top-1 "
        "but not the perturbed one's (wrong → right: the reverse); McNemar p: the exact two-sided test that both "
        "directions are equally likely. RMS Δp: the root mean square of P_p − P_d of the actual next token. "
        f"Silent failure: a mean KLD below max(noise floor, {SILENT_KL}) nats with McNemar p < {SIGNIFICANT}. "
        "Below the chart: pairs of specs compared on the same tokens (a − b, differs: a 95% interval excludes 0 "
        f"or McNemar p < {SIGNIFICANT}), then the {WORST_SHOWN} tokens with the highest KLD over all specs."
    )
    s["table"] = spec_table(rows)
    s["tables"] = []
    if data.pairs:
        s["tables"].append(pair_table(data.pairs))
    if data.worst:
        s["tables"].append(worst_table(worst_tokens(data.worst)))
    shown = [{**r, "spec": escape(r["spec"])} for r in rows]  # names in the charts' legends, as in the tables
    s["chart"] = svg(C.chart_kld_confidence(shown))
    s["chart2"] = svg(C.chart_kld_hidden(shown))
    from engine.results.sizes import candidates_by_size

    sized = candidates_by_size(rows, data.pairs)
    if sized:  # GGUF candidates: the quant-choosing table and KLD against size
        s["tables"].insert(0, size_table(sized))
        s["figures"] = [x for x in (svg(C.chart_kld_size(sized)),) if x]
        s["note"] += (
            " The candidates by size: GGUF files, what each holds read from its tensor table; the chart marks the "
            "Pareto front (no other candidate is smaller with a lower mean KLD)."
        )
    layers = svg(C.chart_layer_sparsity([{**r, "layer_sparsity": layer_sparsity([r])} for r in shown]))
    if layers:  # a layer allocation: where each spec's zeros are
        s["figures"] = [*s.get("figures", []), layers]
        s["note"] += " Last chart: the zero weights per decoder layer of each spec (a layer allocation's mix)."
    return {
        "note": None,
        "table": None,
        "tables": [],
        "chart": None,
        "chart2": None,
        "figures": [],
        "nodata": None,
        **s,
    }


def render_html(data: KldData, stamp: str | None = None) -> str:
    """The page of a kld folder alone (no batch output beside it): this section, no claim block; and the
    sensitivity section after it when a `hierui sensitivity --out` went into the same folder."""
    from hierui.report import sensitivity as report_sensitivity
    from hierui.report.render import environment

    r = data.first
    sections, files = [section(data)], list(data.files)
    if report_sensitivity.has_sensitivity(data.path):
        rows, manifest = report_sensitivity.load(data.path)
        sections = [section(data, 1), report_sensitivity.section(rows, manifest, 2)]
        files.append(report_sensitivity.TABLE)
    corpus = Path(str(r.get("corpus") or MISSING)).name
    return (
        environment()
        .get_template("report.html.j2")
        .render(
            title=f"hierui report — kld: {escape(r.get('model') or MISSING)} on {escape(corpus)}",
            model=escape(r.get("model") or MISSING),
            meta=meta(data),
            description=None,
            claim=False,
            sections=sections,
            summary=[],
            source=str(data.path),
            stamp=stamp,
            files=files,
        )
    )
