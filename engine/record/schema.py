"""The columns of the batch tables, each with one fixed type, and rows turned into pyarrow tables of exactly those.

A table's columns are always all present, in the order declared here, with their declared type, whatever a
sweep's runs hold: a value a run lacks (the `sub_*` fields of a prompt without choices, `first_divergence`
in shared mode) is null. A field that is not declared is an error (SchemaError), so the tables cannot drift
from the step records (engine.run.stepper), the summaries (engine.record.summary) or the multiple-choice rows
(engine.run.choice) without a test failing. The names are the contract of docs/design.md and engine.run.metrics.

Kinds: "string", "int64", "float64", "bool", "list<int64>", "list<float64>", "list<bool>", and "json": any JSON value,
stored as its compact JSON text (the top-k lists, the choices). Integral floats are accepted for int64
columns and 0/1 for bool columns: engine.run.metrics.to_host moves every metric as a float64
(`rank_shift` is a count, `top1_agree`/`sub_agree` are yes/no). pyarrow is imported only to build a table.
"""

from __future__ import annotations

import json
import math

from engine.errors import HieruiError
from engine.record.summary import PERCENTILES

STRING, INT, FLOAT, BOOL, JSON = "string", "int64", "float64", "bool", "json"
INTS, FLOATS, BOOLS = "list<int64>", "list<float64>", "list<bool>"

# ------------------------------------------------------------------ the columns

# which run a row belongs to: the first columns of steps.parquet and summary.parquet
RUN_COLUMNS = {"run_id": STRING, "spec": STRING, "mode": STRING, "prompt_id": STRING}

# every field of a step record (engine.run.stepper), in the order of the design's table. In free mode, after one
# model has ended (`end_d`/`end_p` below), its token is null, its text "", its entry of `fed`, its top-k,
# nll and sub_p null, and every field comparing the two models is null (not computed).
STEP_FIELDS = {
    "step": INT,
    "token_d": INT,
    "token_p": INT,
    "text_d": STRING,
    "text_p": STRING,
    "fed": INTS,
    # hidden states, per layer ℓ = 0 (embeddings) … L (final normed state)
    "emb_cos": FLOATS,
    "emb_rel": FLOATS,
    "emb_perp": FLOATS,
    "emb_cos_est": FLOATS,  # null where the estimate leaves [−1, 1] …
    "emb_cos_est_oor": BOOLS,  # … and true here
    # logits
    "logit_cos": FLOAT,
    "logit_rel": FLOAT,
    # probabilities
    "kl": FLOAT,
    "kl_est": FLOAT,
    "prob_cos": FLOAT,
    "prob_cos_est": FLOAT,  # null where the estimate leaves [−1, 1] …
    "prob_cos_est_oor": BOOL,  # … and true here
    "js": FLOAT,
    "tv": FLOAT,
    "top1_agree": BOOL,
    "topk_overlap": FLOAT,
    "dp": FLOAT,
    "rank_shift": INT,
    "margin_d": FLOAT,  # the dense top-1 minus top-2 probability
    "near_tie": BOOL,  # a flip (top-1 differs) at a margin_d below the noise threshold (header: tie_margin)
    "amp": FLOAT,
    "nll_d": FLOAT,
    "nll_p": FLOAT,
    # accumulated over the run
    "cum_kl": FLOAT,
    "cum_nll_gap": FLOAT,
    "same_token": BOOL,
    "first_divergence": INT,  # free mode only
    # the step at which each model emitted end-of-sequence, from that step on (null before, and if it never
    # did); the perturbed model never ends in shared mode (it is fed the dense text)
    "end_d": INT,
    "end_p": INT,
    # the categorical subspace (prompts with choices only)
    "sub_p_d": FLOATS,
    "sub_p_p": FLOATS,
    "sub_kl": FLOAT,
    "sub_cos": FLOAT,
    "sub_agree": BOOL,
    # the logit lens, per layer ℓ = 1..L (engine.run.lens); null with the lens off, at the steps a sampled lens
    # skips, and until the explorer's lens computed behind the stepping arrives
    "lens_kl": FLOATS,
    "lens_top1_agree": BOOLS,
    "lens_dense_final_kl": FLOATS,
    # top-k lists [[token id, text, probability], …]
    "topk_d": JSON,
    "topk_p": JSON,
}
# the logit lens's fields of a step (engine.run.lens): a session's lens line carries these (engine.record.session)
LENS_FIELDS = ("lens_kl", "lens_top1_agree", "lens_dense_final_kl")

# engine.record.summary.summarize's keys
SUMMARY_FIELDS = {
    "steps": INT,
    **{f"{name}_{stat}": FLOAT for name in ("kl", "tv") for stat in ("mean", *(f"p{q}" for q in PERCENTILES))},
    "kl_est_mean": FLOAT,
    "same_top1_rate": FLOAT,
    "compared_steps": INT,  # steps that compare both models (in free mode, not those after one model ended)
    "flips": INT,  # compared steps whose top-1 tokens differ
    "near_tie_flips": INT,  # … of which near ties (margin_d below the noise threshold)
    "emb_cos_final_mean": FLOAT,
    **{f"{name}_mean": FLOAT for name in ("logit_cos", "prob_cos", "prob_cos_est", "js", "amp")},
    "prob_cos_est_oor_rate": FLOAT,  # fraction of the compared steps whose estimate left [−1, 1]
    "emb_cos_est_oor_rate": FLOAT,  # fraction of the compared steps with a layer whose estimate left [−1, 1]
    "cum_kl": FLOAT,
    "cum_nll_gap": FLOAT,
    "ln_ppl_ratio": FLOAT,
    "ppl_ratio": FLOAT,
    "first_divergence": INT,
    "same_token_rate": FLOAT,  # free mode only
    "end_d": INT,  # the step of each model's end-of-sequence, null if it ran to the token limit
    "end_p": INT,
    "sub_kl_mean": FLOAT,
    "sub_agree_rate": FLOAT,  # prompts with choices only
    # free mode with counterfactual on (engine.run.branch): the branch at the first divergence, null without one
    "recovered": BOOL,
    "recovery_steps": INT,
    "branch_divergence": INT,
    "branch_kl_mean": FLOAT,
}

# engine.run.choice.score_item's keys: one multiple-choice item scored under one spec
CHOICE_FIELDS = {
    "item_id": STRING,
    "topic": STRING,
    "prompt": STRING,
    "choices": JSON,
    "answer": INT,
    "score_d": FLOATS,
    "score_p": FLOATS,
    "sub_p_d": FLOATS,
    "sub_p_p": FLOATS,
    "pred_d": INT,
    "pred_p": INT,
    "correct_d": BOOL,
    "correct_p": BOOL,
    "agree": BOOL,
    "sub_kl": FLOAT,
    "sub_cos": FLOAT,
    "kl": FLOAT,
    "tv": FLOAT,
    "logit_cos": FLOAT,
    "prob_cos": FLOAT,
    "emb_cos_final": FLOAT,
}

# engine.run.choice.summarize_items's keys
CHOICE_SUMMARY_FIELDS = {
    "items": INT,
    "acc_d": FLOAT,
    "acc_p": FLOAT,
    "agree_rate": FLOAT,
    "sub_kl_mean": FLOAT,
    "kl_mean": FLOAT,
    "tv_mean": FLOAT,
}

# engine.run.attribution.Attribution.rows()'s keys: one unit patched at one step (docs/design.md, "Where it breaks")
ATTRIBUTION_FIELDS = {
    "unit": STRING,  # block.ℓ, attn.ℓ, mlp.ℓ
    "kind": STRING,  # block, attn, mlp
    "layer": INT,
    "kl": FLOAT,  # the step's KL(P_d ‖ P_p) at T, unpatched
    "kl_patched": FLOAT,
    "restored_kl": FLOAT,  # (kl − kl_patched) / kl; null where kl is 0
    "restores_top1": BOOL,
    "rank": INT,  # 1 = removes the most KL, among the sublayers (attn and mlp together) or among the blocks
    "in_minimal_set": BOOL,  # in the step's greedy smallest set of units restoring the dense top-1
    "top1_d": INT,
    "top1_p": INT,
    "minimal_restores": BOOL,  # whether that set restores it
}

# the tables: OUT/steps.parquet, OUT/summary.parquet (and .csv), OUT/mc.parquet, OUT/mc_summary.parquet (and .csv)
STEPS = {**RUN_COLUMNS, **STEP_FIELDS}
SUMMARY = {
    **RUN_COLUMNS,
    "prompt": STRING,
    "choices": JSON,
    "model": STRING,
    "measured_sparsity": FLOAT,
    "layer_sparsity": JSON,  # the zero weights' fraction per decoder layer, [s_0, …] (null: not measured)
    **SUMMARY_FIELDS,
}
CHOICES = {"spec": STRING, **CHOICE_FIELDS}
CHOICE_SUMMARY = {"spec": STRING, **CHOICE_SUMMARY_FIELDS}
# engine.results.paired.choice_spec_rows's keys: OUT/mc_paired.parquet (and .csv), a row per spec. *_lo/*_hi: the 95%
# percentile bootstrap interval (items resampled, seed 0); acc_diff = acc_p − acc_d, acc_diff_p its bootstrap p
MC_PAIRED = {
    "spec": STRING,
    "items": INT,
    "right_to_wrong": INT,  # dense right, perturbed wrong
    "wrong_to_right": INT,
    "both_right": INT,
    "both_wrong": INT,
    "mcnemar_p": FLOAT,  # McNemar's exact two-sided p on right_to_wrong vs wrong_to_right
    **{f"{name}{end}": FLOAT for name in ("acc_d", "acc_p", "acc_diff") for end in ("", "_lo", "_hi")},
    "acc_diff_p": FLOAT,
    **{f"{name}{end}": FLOAT for name in ("kl", "sub_kl", "agree") for end in ("", "_lo", "_hi")},
}
# engine.results.paired.choice_pair_rows's keys: OUT/mc_pairs.parquet (and .csv), a row per pair of specs (a before b in
# sweep order) on their common items: perturbed accuracy and full KL at the answer, differences a − b
MC_PAIRS = {
    "spec_a": STRING,
    "spec_b": STRING,
    "items": INT,
    "acc_a": FLOAT,
    "acc_b": FLOAT,
    "a_only": INT,  # items a gets right and b wrong
    "b_only": INT,
    "mcnemar_p": FLOAT,  # McNemar's exact two-sided p on a_only vs b_only
    **{f"acc_diff{end}": FLOAT for end in ("", "_lo", "_hi", "_p")},
    "kl_a": FLOAT,
    "kl_b": FLOAT,
    **{f"kl_diff{end}": FLOAT for end in ("", "_lo", "_hi", "_p")},
}
# OUT/attribution.parquet (hierui batch --attribute flips): a row per run × attributed step × unit
ATTRIBUTION = {**RUN_COLUMNS, "step": INT, **ATTRIBUTION_FIELDS}
TABLES = {
    "steps": STEPS,
    "summary": SUMMARY,
    "mc": CHOICES,
    "mc_summary": CHOICE_SUMMARY,
    "mc_paired": MC_PAIRED,
    "mc_pairs": MC_PAIRS,
    "attribution": ATTRIBUTION,
}

# hierui kld (engine.kld.corpus): OUT/kld_tokens.parquet, a row per scored token per spec, in corpus order
KLD_TOKENS = {
    "spec": STRING,
    "window": INT,
    "pos": INT,  # the token's index in the tokenized corpus
    "token": INT,  # the actual next token
    "kl": FLOAT,  # KL(P_d ‖ P_p); with a base file a lower bound (engine.kld.base)
    "kl_rev": FLOAT,  # KL(P_p ‖ P_d); likewise
    "same_top": BOOL,
    "dp": FLOAT,  # P_p(token) − P_d(token)
    "nll_d": FLOAT,
    "nll_p": FLOAT,
    "conf_d": FLOAT,  # the dense top-1 probability
    "top_d": INT,
    "top_p": INT,
}
# OUT/kld_summary.parquet (and .csv, without the list columns): a row per spec, llama.cpp's statistics
_KLD_PCT = ("max", "p99_9", "p99", "p95", "p90", "median", "p10", "p5", "p1", "p0_1", "min")
_DP_PCT = ("max", "p99_9", "p99", "p95", "p90", "p75", "median", "p25", "p10", "p5", "p1", "p0_1", "min")
KLD_SUMMARY = {
    "spec": STRING,
    "model": STRING,
    "corpus": STRING,
    "corpus_sha256": STRING,
    "ctx": INT,
    "stride": INT,
    "windows": INT,
    "base": STRING,  # the base file compared against (null: the dense model ran)
    "base_k": INT,
    "base_kind": STRING,  # exact, topk or llama.cpp (null: the dense model ran)
    "base_model": STRING,  # the dense model the base file was made from, as it names it (null: none named)
    "measured_sparsity": FLOAT,
    "layer_sparsity": JSON,  # the zero weights' fraction per decoder layer, [s_0, …] (null: not measured)
    # a GGUF candidate (checkpoint:FILE.gguf), read from the file (engine.models.gguf_info); null otherwise
    "file_size": INT,
    "bits_per_weight": FLOAT,
    "quant_types": JSON,  # {type: weights of that type}
    "tokens": INT,
    **{name: FLOAT for name in ("ppl_d", "ppl_d_unc", "ppl_p", "ppl_p_unc", "ln_ppl_ratio", "ln_ppl_ratio_unc")},
    **{name: FLOAT for name in ("ppl_ratio", "ppl_ratio_unc", "ln_ppl_cor")},
    **{f"{d}_{s}": FLOAT for d in ("kl", "kl_rev") for s in ("mean", "mean_unc", *_KLD_PCT)},
    "kl_mean_lo": FLOAT,  # engine.results.paired's bootstrap interval of kl_mean, windows resampled
    "kl_mean_hi": FLOAT,
    **{f"dp_{s}": FLOAT for s in ("mean", "mean_unc", *_DP_PCT, "rms", "rms_unc")},
    "same_top": FLOAT,
    "same_top_unc": FLOAT,
    # top-1 correctness (argmax == the actual next token) dense → perturbed, engine.results.paired.flips
    "right_to_wrong": INT,  # dense right, perturbed wrong
    "wrong_to_right": INT,
    "mcnemar_p": FLOAT,  # McNemar's exact two-sided p on right_to_wrong vs wrong_to_right
    "noise_floor_kl": FLOAT,  # the dense model's noise floor (hierui noise, its device and dtype); null: unmeasured
    "silent": BOOL,  # mean KL below max(noise floor, 0.01) yet the flips significant (engine.results.paired.is_silent)
    "conf_count": INTS,  # tokens per decile of the dense top-1 probability [0, 0.1) … [0.9, 1]
    "conf_kl_mean": FLOATS,  # mean KL per decile (null: none there)
    "hidden_cos": FLOATS,  # mean hidden-state cosine per layer 0 … L (null with a base file)
}
# OUT/kld_pairs.parquet (and .csv): a row per pair of specs (a before b in the order given; empty with one spec),
# on the same tokens; differences a − b with the 95% paired bootstrap interval (windows resampled, seed 0) and p
KLD_PAIRS = {
    "spec_a": STRING,
    "spec_b": STRING,
    "tokens": INT,
    "windows": INT,
    "kl_a": FLOAT,  # mean KL of each spec
    "kl_b": FLOAT,
    **{f"kl_diff{end}": FLOAT for end in ("", "_lo", "_hi", "_p")},
    "same_top_a": FLOAT,
    "same_top_b": FLOAT,
    **{f"same_top_diff{end}": FLOAT for end in ("", "_lo", "_hi", "_p")},
    "a_only": INT,  # tokens a's perturbed top-1 gets right and b's wrong
    "b_only": INT,
    "mcnemar_p": FLOAT,  # McNemar's exact two-sided p on a_only vs b_only
}
TABLES.update({"kld_tokens": KLD_TOKENS, "kld_summary": KLD_SUMMARY, "kld_pairs": KLD_PAIRS})
# OUT/sensitivity.parquet (and .csv), hierui sensitivity: a row per (unit, level), the unit perturbed alone
SENSITIVITY = {
    "unit": STRING,  # layers.3, layers.3.attention, layers.3.self_attn.q_proj
    "layer": INT,
    "sublayer": STRING,  # attention or mlp; null for a whole layer
    "matrix": STRING,  # the matrix's path inside its layer with --unit matrix; else null
    "level": STRING,  # the spec it was perturbed with (wanda:0.5)
    "sparsity": FLOAT,  # that spec's target sparsity (null for int8, nf4)
    "weights": INT,  # weights in the unit's matrices
    "tokens": INT,
    **{name: FLOAT for name in ("kl_mean", "kl_mean_unc", "kl_mean_lo", "kl_mean_hi", "kl_median", "kl_p99")},
    **{name: FLOAT for name in ("kl_max", "same_top", "ppl_d", "ppl_p", "ppl_delta", "ln_ppl_ratio", "ppl_ratio")},
    "seconds": FLOAT,  # the unit's forward passes, and an equal share of its layer's scoring
}
TABLES["sensitivity"] = SENSITIVITY


class SchemaError(HieruiError):
    """A row holds a field its table does not declare, or a value of the wrong kind."""

    def __init__(self, message: str):
        super().__init__(message, exit_code=1)


# ------------------------------------------------------------------ pyarrow


def arrow_type(kind: str):
    import pyarrow as pa

    return {
        STRING: pa.string(),
        INT: pa.int64(),
        FLOAT: pa.float64(),
        BOOL: pa.bool_(),
        INTS: pa.list_(pa.int64()),
        FLOATS: pa.list_(pa.float64()),
        BOOLS: pa.list_(pa.bool_()),
        JSON: pa.string(),
    }[kind]


def arrow_schema(columns: dict[str, str]):
    """The pyarrow schema of a table declared here (STEPS, SUMMARY, CHOICES, CHOICE_SUMMARY)."""
    import pyarrow as pa

    return pa.schema([pa.field(name, arrow_type(kind)) for name, kind in columns.items()])


def _bad(name: str, kind: str, value) -> SchemaError:
    return SchemaError(f"column '{name}' ({kind}) cannot hold {type(value).__name__} {value!r}")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _scalar(name: str, kind: str, value):
    if value is None:
        return None
    if kind == STRING and isinstance(value, str):
        return value
    if kind == FLOAT and _is_number(value):
        return float(value)
    if kind == INT and _is_number(value) and (isinstance(value, int) or (math.isfinite(value) and value.is_integer())):
        return int(value)
    if kind == BOOL and (isinstance(value, bool) or (_is_number(value) and value in (0, 1))):
        return bool(value)
    raise _bad(name, kind, value)


def cell(name: str, kind: str, value):
    """`value` as the Python value pyarrow stores in a column of `kind`; SchemaError if it cannot be one."""
    if value is None:
        return None
    if kind == JSON:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    if kind in (INTS, FLOATS, BOOLS):
        if not isinstance(value, (list, tuple)):
            raise _bad(name, kind, value)
        item = {INTS: INT, FLOATS: FLOAT, BOOLS: BOOL}[kind]
        return [_scalar(name, item, v) for v in value]
    return _scalar(name, kind, value)


def to_table(rows: list[dict], columns: dict[str, str], what: str = "table"):
    """A pyarrow table of exactly `columns` (in their order, with their types) from `rows`: a field a row
    lacks is null; a field not in `columns` is a SchemaError naming it (and `what`, the table)."""
    import pyarrow as pa

    for row in rows:
        unknown = [name for name in row if name not in columns]
        if unknown:
            raise SchemaError(
                f"{what}: field{'s' * (len(unknown) > 1)} {', '.join(map(repr, unknown))} "
                f"not declared in engine/record/schema.py"
            )
    arrays = [
        pa.array([cell(name, kind, row.get(name)) for row in rows], arrow_type(kind)) for name, kind in columns.items()
    ]
    return pa.Table.from_arrays(arrays, schema=arrow_schema(columns))
