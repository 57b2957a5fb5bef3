"""The terminal report of `hierui kld`: llama.cpp's perplexity/KLD report per spec, line for line, then
what hierui adds (reverse KLD, KLD by dense confidence, hidden-state cosine per layer, the worst tokens)."""

from __future__ import annotations

import math

from engine.kld.statistics import DP_PERCENTILES, KL_PERCENTILES
from engine.results.paired import SIGNIFICANT, SILENT_KL, silent_limit

_LABELS = {"p99_9": "99.9%", "p99": "99.0%", "p95": "95.0%", "p90": "90.0%", "p75": "75.0%", "median": "Median"}
_LABELS.update({"p25": "25.0%", "p10": "10.0%", "p5": " 5.0%", "p1": " 1.0%", "p0_1": " 0.1%"})


def _f(value, fmt: str) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)


def spec_lines(row: dict, bound: bool = False) -> list[str]:
    """llama.cpp's final report for one spec (Q = the perturbed model, base = the dense model)."""
    lines = [f"====== Perplexity statistics ({row['spec']}, {row['tokens']} tokens) ======"]
    lines.append(f"Mean PPL(Q)                   : {row['ppl_p']:10.6f} ± {row['ppl_p_unc']:10.6f}")
    lines.append(f"Mean PPL(base)                : {row['ppl_d']:10.6f} ± {row['ppl_d_unc']:10.6f}")
    cor = row.get("ln_ppl_cor")
    lines.append(f"Cor(ln(PPL(Q)), ln(PPL(base))): {_f(None if cor is None else 100 * cor, '6.2f')}%")
    lines.append(f"Mean ln(PPL(Q)/PPL(base))     : {row['ln_ppl_ratio']:10.6f} ± {row['ln_ppl_ratio_unc']:10.6f}")
    lines.append(f"Mean PPL(Q)/PPL(base)         : {row['ppl_ratio']:10.6f} ± {row['ppl_ratio_unc']:10.6f}")
    # llama.cpp's PPL difference: its covariance from the log-PPL covariance (cor · u_p · u_d)
    u_p = row["ppl_p_unc"] / row["ppl_p"] if row["ppl_p"] else 0.0
    u_d = row["ppl_d_unc"] / row["ppl_d"] if row["ppl_d"] else 0.0
    cov = (cor or 0.0) * u_p * u_d * row["ppl_p"] * row["ppl_d"]
    diff_unc = math.sqrt(max(row["ppl_p_unc"] ** 2 + row["ppl_d_unc"] ** 2 - 2 * cov, 0.0))
    lines.append(f"Mean PPL(Q)-PPL(base)         : {row['ppl_p'] - row['ppl_d']:10.6f} ± {diff_unc:10.6f}")
    lines.append("")
    for name, title in (("kl", "KL divergence"), ("kl_rev", "reverse KL divergence, KL(Q ‖ base)")):
        note = " (lower bounds: top-K base file)" if bound else ""
        lines.append(f"====== {title} statistics{note} ======")
        lines.append(f"Mean    KLD: {row[f'{name}_mean']:10.6f} ± {row[f'{name}_mean_unc']:10.6f}")
        if name == "kl" and row.get("kl_mean_lo") is not None:
            lines.append(
                f"  (bootstrap 95% interval, windows resampled: {row['kl_mean_lo']:.6f} … {row['kl_mean_hi']:.6f})"
            )
        lines.append(f"Maximum KLD: {row[f'{name}_max']:10.6f}")
        for key, _q in KL_PERCENTILES:
            lines.append(f"{_LABELS[key]:<7} KLD: {row[f'{name}_{key}']:10.6f}")
        lines.append(f"Minimum KLD: {row[f'{name}_min']:10.6f}")
        lines.append("")
    lines.append("====== Token probability statistics ======")
    lines.append(f"Mean    Δp: {100 * row['dp_mean']:6.3f} ± {100 * row['dp_mean_unc']:5.3f} %")
    lines.append(f"Maximum Δp: {100 * row['dp_max']:6.3f}%")
    for key, _q in DP_PERCENTILES:
        lines.append(f"{_LABELS[key]:<7} Δp: {100 * row[f'dp_{key}']:6.3f}%")
    lines.append(f"Minimum Δp: {100 * row['dp_min']:6.3f}%")
    lines.append(f"RMS Δp    : {100 * row['dp_rms']:6.3f} ± {100 * row['dp_rms_unc']:5.3f} %")
    lines.append(f"Same top p: {100 * row['same_top']:6.3f} ± {100 * row['same_top_unc']:5.3f} %")
    lines.append("")
    if row.get("right_to_wrong") is not None:
        lines.append("====== Flips (dense → Q) ======")
        lines.append(f"top-1 right → wrong: {row['right_to_wrong']:8d}")
        lines.append(f"top-1 wrong → right: {row['wrong_to_right']:8d}")
        lines.append(f"McNemar exact p    : {_f(row['mcnemar_p'], '.4g')}")
        lines.append(silent_line(row))
        lines.append("")
    return lines


def silent_line(row: dict) -> str:
    """Whether the spec is a "silent" failure: a mean KLD under the noise floor (or 0.01) with significant flips."""
    floor = row.get("noise_floor_kl")
    limit = silent_limit(floor)
    source = f"noise floor {limit:.6f}" if floor is not None and floor >= SILENT_KL else f"threshold {limit:.2f}"
    if row.get("silent"):
        return (
            f"Silent failure     : YES — mean KLD below the {source} yet the flips are significant (p < {SIGNIFICANT})"
        )
    below = row.get("kl_mean") is not None and row["kl_mean"] < limit
    why = "flips not significant" if below else f"mean KLD above the {source}"
    return f"Silent failure     : no ({why})"


def _p(value) -> str:
    """A bootstrap p (2000 resamples, engine.results.paired): 0 means below its resolution."""
    return "< 0.001" if value == 0 else _f(value, ".4g")


def _verdict(lo, hi) -> str:
    if lo is None or hi is None:
        return "n/a"
    return "differs" if lo > 0 or hi < 0 else "no significant difference"


def pair_lines(pairs: list[dict]) -> list[str]:
    """Per pair of specs (a before b): mean KLD and same-top differences a − b with the paired bootstrap
    interval (windows resampled) and McNemar's p on the tokens where exactly one top-1 is right."""
    if not pairs:
        return []
    lines = ["====== Pairwise comparison ======"]
    for r in pairs:
        lines.append(f"{r['spec_a']}  vs  {r['spec_b']}  ({r['tokens']} tokens, {r['windows']} windows resampled)")
        lines.append(
            f"  Mean KLD a − b   : {_f(r['kl_diff'], '10.6f')}  95% [{_f(r['kl_diff_lo'], '.6f')} … "
            f"{_f(r['kl_diff_hi'], '.6f')}]  p {_p(r['kl_diff_p'])}  → "
            f"{_verdict(r['kl_diff_lo'], r['kl_diff_hi'])}"
        )
        pct = {
            k: None if r[k] is None else 100 * r[k] for k in ("same_top_diff", "same_top_diff_lo", "same_top_diff_hi")
        }
        lines.append(
            f"  Same top a − b   : {_f(pct['same_top_diff'], '7.3f')} %  95% [{_f(pct['same_top_diff_lo'], '.3f')} … "
            f"{_f(pct['same_top_diff_hi'], '.3f')}] %  p {_p(r['same_top_diff_p'])}  → "
            f"{_verdict(r['same_top_diff_lo'], r['same_top_diff_hi'])}"
        )
        mc = r["mcnemar_p"]
        verdict = "n/a" if mc is None else ("differs" if mc < 0.05 else "no significant difference")
        lines.append(
            f"  top-1 right only : a {r['a_only']}, b {r['b_only']}  McNemar exact p {_f(mc, '.4g')}  → {verdict}"
        )
    lines.append("(differs: the 95% interval excludes 0, or McNemar p < 0.05)")
    lines.append("")
    return lines


def size_lines(rows: list[dict], pairs: list[dict] | None) -> list[str]:
    """The quant-choosing table (engine.results.sizes.candidates_by_size): the GGUF candidates smallest first, what
    each file holds, its KLD and its paired difference from the next smaller one. Empty without a GGUF candidate."""
    from engine.models.gguf_info import types_label
    from engine.results.sizes import candidates_by_size

    sized = candidates_by_size(rows, pairs)
    if not sized:
        return []
    lines = ["====== candidates by size (GGUF files; what each holds read from the file) ======"]
    lines.append(
        f"{'candidate':<28} {'MiB':>8} {'BPW':>6} {'mean KLD':>10} {'99.9% KLD':>10} {'same top':>9}  "
        "vs the next smaller (KLD this − that)"
    )
    for r in sized:
        v = r["versus"]
        versus = (
            "" if v is None else f"KLD {v['diff']:+.6f} [{v['lo']:+.6f} … {v['hi']:+.6f}] {_verdict(v['lo'], v['hi'])}"
        )
        same = None if r.get("same_top") is None else 100 * r["same_top"]
        name = ("◆ " if r["front"] else "  ") + r["name"]
        lines.append(
            f"{name:<28} {r['file_size'] / 2**20:8.1f} {_f(r.get('bits_per_weight'), '6.2f')} "
            f"{_f(r.get('kl_mean'), '10.6f')} {_f(r.get('kl_p99_9'), '10.6f')} {_f(same, '8.3f')}%  {versus}"
        )
        lines.append(f"{'':<28} {types_label(r['types'])}")
    lines.append("◆ on the Pareto front: no other candidate is smaller with a lower mean KLD")
    lines.append("")
    return lines


def extra_lines(row: dict, worst: list[dict]) -> list[str]:
    """What llama.cpp does not print: KLD by the dense top-1 probability, hidden-state cosines, worst tokens."""
    lines = [f"====== KLD by dense top-1 probability ({row['spec']}) ======"]
    for i, (count, mean) in enumerate(zip(row["conf_count"], row["conf_kl_mean"])):
        lines.append(f"p_top1 {i / 10:.1f}–{(i + 1) / 10:.1f}: {count:6d} tokens  mean KLD {_f(mean, '10.6f')}")
    lines.append("")
    lines.append("====== hidden-state cosine per layer (mean over scored tokens) ======")
    if row.get("hidden_cos") is None:
        lines.append("unavailable with --base (needs the dense model's hidden states)")
    else:
        for layer, cos in enumerate(row["hidden_cos"]):
            lines.append(f"layer {layer:3d}: {_f(cos, '.6f')}")
    lines.append("")
    lines.append(f"====== the {len(worst)} tokens with the highest KLD ======")
    for w in worst:
        ctx = w["context"][-60:].replace("\n", "⏎")
        lines.append(
            f"{w['rank']:3d}. KLD {w['kl']:9.4f}  pos {w['pos']:6d}  token {w['text']!r:<10} "
            f"p_d {w['p_d']:.3f} p_p {w['p_p']:.3f} · top-1 dense {w['top_d']!r} pert. {w['top_p']!r}  …{ctx}"
        )
    lines.append("")
    return lines


def print_report(console, run, rows: list[dict], worst: list[dict], out=None) -> None:
    from hierui.tokentext import escape

    bound = run.base is not None and run.base_k is not None
    head = f"{run.model} · {run.corpus} · ctx {run.ctx} stride {run.stride} · {run.windows} windows"
    if run.base is not None:
        kind = f"top-{run.base_k}, KL lower bounds" if bound else "exact"
        if getattr(run, "base_kind", None) == "llama.cpp":
            kind = "llama.cpp, 16-bit log-probabilities"
        of = f" of {run.base_model}" if run.base_model else ""
        head += f" · against base file {run.base}{of} ({kind})"
    console.print(head, highlight=False, markup=False)
    console.print("")
    for row in rows:
        spec_worst = [w for w in worst if w["spec"] == row["spec"]]
        for line in spec_lines(row, bound) + extra_lines(row, spec_worst):
            console.print(escape(line), highlight=False, markup=False, soft_wrap=True)
    if len(run.results) > 1:
        if run.pairs is None:
            from engine.kld.statistics import pair_rows

            run.pairs = pair_rows(run)
        for line in pair_lines(run.pairs):
            console.print(escape(line), highlight=False, markup=False, soft_wrap=True)
    for line in size_lines(rows, run.pairs):
        console.print(escape(line), highlight=False, markup=False, soft_wrap=True)
    if out is not None:
        console.print(
            f"tables in {out} (kld_tokens.parquet, kld_summary.parquet/.csv, kld_pairs.parquet/.csv, kld_worst.json)"
        )
