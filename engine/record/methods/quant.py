"""int8, nf4: bitsandbytes quantization of the decoder linears, made on the fly (engine.perturb.quant)."""

from __future__ import annotations

from engine.record.methods.declaration import Memory, Method
from engine.record.methods.grammar import NOTHING


def describe_quantization(details: dict) -> str:
    """How many linears were quantized to how many bits, by which backend, and what was kept or skipped."""
    if "quantized_linears" not in details:
        return ""
    counts = details.get("quantized") or {}
    kinds = ", ".join(f"{n} {kind.replace('_', ' ')}" for kind, n in counts.items() if n)
    kept = ", ".join(details.get("full_precision") or [])
    skipped = len(details.get("skipped") or [])
    return (
        f"quantized {kinds or str(details['quantized_linears']) + ' linears'} to {details['bits']} bits "
        f"({details['backend']})"
        + (f"; routers kept in full precision ({kept})" if kept else "")
        + (f"; {skipped} skipped (see the session's details)" if skipped else "")
    )


# a weight's copy (in the model's dtype and as bytes) while it is quantized
_WORKSPACE = {"per_weight": 1, "per_weight_dtype": 1, "note": "one weight's copy while it is quantized"}

METHODS = (
    Method(
        name="int8",
        family="quant",
        grammar=NOTHING,
        summary="bitsandbytes LLM.int8() linears (Linear8bitLt)",
        examples=("int8",),
        apply="engine.perturb.quant:build",
        changes="quantized",
        streams=False,
        describe=describe_quantization,
        memory=Memory(bits=8, copy_note="weights × 1 B + a float32 scale per row", **_WORKSPACE),
        self_check=("int8",),
        # bitsandbytes quantizes the activations per token in float16: a last-bit difference upstream can move
        # an activation by one int8 step, 1/127 of its row's largest value
        min_tolerance=4 / 127,
        tolerance_note=" (int8 quantizes activations: a last-bit difference upstream can flip int8 levels)",
        params={"bits": 8},
    ),
    Method(
        name="nf4",
        family="quant",
        grammar=NOTHING,
        summary="bitsandbytes 4-bit NormalFloat linears (Linear4bit, blocks of 64)",
        examples=("nf4",),
        apply="engine.perturb.quant:build",
        changes="quantized",
        streams=False,
        describe=describe_quantization,
        memory=Memory(bits=4, scale_every=64, copy_note="weights × ½ B + a float32 absmax per 64", **_WORKSPACE),
        self_check=("nf4",),
        params={"bits": 4},
    ),
)
