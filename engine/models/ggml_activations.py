"""What llama.cpp's CPU backend does to a matrix product's activations, emulated in float32.

ggml's CPU matrix product does not multiply a quantized weight by float activations: it first converts the
activations (src1) into the type the weight's dot product pairs with (`vec_dot_type` in ggml-cpu.c's
`type_traits_cpu`), then takes an integer (or F16) dot product. `VEC_DOT_TYPE` is that pairing, read from the
vendored sources (llama_cpp_python 0.3.36, ggml/src/ggml-cpu/ggml-cpu.c); `round_trip(x, act_type)` gives the
float values that dot product effectively multiplies the de-quantized weight by, so
dot(W_deq, round_trip(x)) reproduces ggml's result up to float summation order, with one exception noted below.

The activation types (ggml-quants.c's `quantize_row_*_ref` and, for the x86 build that ran llama.cpp here,
ggml-cpu/arch/x86/quants.c's AVX2 `quantize_row_q8_0` / `quantize_row_q8_1`):

    q8_0, q8_1  blocks of 32 along the row: amax = max |x|, d = amax / 127 (float32), stored as fp16;
                q = round(x · id) with id = 127 / amax (0 for an all-zero block). The x86 SIMD path
                rounds half to even (_mm256_round_ps, _MM_ROUND_NEAREST) and uses id = 127/amax; the
                reference C path uses id = 1/d and roundf (half away from zero): `reference=True`.
                The dot product sees fp16(d) · q.
    q8_K        blocks of 256 (QK_K): max = the element of largest |x| (its sign kept, the first one on a
                tie), iscale = −127 / max, q = min(127, nearest_int(iscale · x)) (nearest_int rounds half
                to even: the 1.5·2^23 trick), d = 1 / iscale kept in float32 (no fp16); an all-zero block
                is d = 0, q = 0. The x86 build calls the reference function. The dot product sees d · q.
    F16, BF16   the activations rounded to half / bfloat16 (round to nearest even).
    F32         unchanged.

Where ggml's dot product is not dot(W_deq, round_trip(x)): for Q4_1 / Q5_1 weights (w = d_w·q_w + m_w) the
q8_1 block carries s = fp16(d · Σq), and the min term is m_w · s, not m_w · Σ(d·q) (an fp16 rounding of the
block sum). `q8_1_sums` returns those s (and the exact d·Σq) per block, so a caller that knows each weight
block's min can add m_w · (s − d·Σq); round_trip alone leaves it out (its relative size is fp16's 2^-11 of
the min term). The K-quant dot products use the block sums (bsums) of q8_K as exact integers: no difference.
"""

from __future__ import annotations

import torch

from engine.errors import HieruiError

# GGUF weight type name -> the activation type ggml's CPU dot product pairs it with (type_traits_cpu)
VEC_DOT_TYPE: dict[str, str] = {
    "F32": "F32",
    "F16": "F16",
    "BF16": "BF16",
    "Q1_0": "Q8_0",
    "Q2_0": "Q8_0",
    "Q4_0": "Q8_0",
    "Q4_1": "Q8_1",
    "Q5_0": "Q8_0",
    "Q5_1": "Q8_1",
    "Q8_0": "Q8_0",
    "Q8_1": "Q8_1",
    "MXFP4": "Q8_0",
    "NVFP4": "Q8_0",
    "IQ4_NL": "Q8_0",
    "Q2_K": "Q8_K",
    "Q3_K": "Q8_K",
    "Q4_K": "Q8_K",
    "Q5_K": "Q8_K",
    "Q6_K": "Q8_K",
    "IQ2_XXS": "Q8_K",
    "IQ2_XS": "Q8_K",
    "IQ2_S": "Q8_K",
    "IQ3_XXS": "Q8_K",
    "IQ3_S": "Q8_K",
    "IQ1_S": "Q8_K",
    "IQ1_M": "Q8_K",
    "IQ4_XS": "Q8_K",
    "TQ1_0": "Q8_K",
    "TQ2_0": "Q8_K",
}

BLOCK = {"Q8_0": 32, "Q8_1": 32, "Q8_K": 256, "F16": 1, "BF16": 1, "F32": 1}


def activation_type(weight_type: str) -> str:
    """The activation type ggml pairs with a GGUF weight type (its name, e.g. 'Q4_K')."""
    key = weight_type.upper()
    if key not in VEC_DOT_TYPE:
        raise HieruiError(f"no known activation type for GGUF weight type '{weight_type}'")
    return VEC_DOT_TYPE[key]


def _blocks(x: torch.Tensor, act_type: str) -> tuple[torch.Tensor, int]:
    block = BLOCK[act_type]
    n = x.shape[-1] if x.dim() else 0
    if n == 0 or n % block:
        raise HieruiError(f"{act_type} activations need a last dimension that is a multiple of {block}, not {n}")
    return x.reshape(*x.shape[:-1], n // block, block), block


def _div(c: float, t: torch.Tensor) -> torch.Tensor:
    """c / t correctly rounded in float32 (torch's `scalar / tensor` multiplies by the reciprocal, which is
    not C's float division)."""
    return torch.full_like(t, c) / t


def _round_away(y: torch.Tensor) -> torch.Tensor:
    """C's roundf: half away from zero."""
    return torch.sign(y) * torch.floor(y.abs() + 0.5)


def _q8_32(x: torch.Tensor, act_type: str, reference: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, d32) of a q8_0 / q8_1 quantization: the integer values and the fp16-rounded scale per block."""
    xb, _ = _blocks(x, act_type)
    amax = xb.abs().amax(dim=-1, keepdim=True)
    d = amax / torch.full_like(amax, 127.0)
    zero = amax == 0
    if reference:
        inv = torch.where(zero, torch.zeros_like(d), _div(1.0, torch.where(zero, torch.ones_like(d), d)))
        q = _round_away(xb * inv)
    else:
        inv = torch.where(zero, torch.zeros_like(amax), _div(127.0, torch.where(zero, torch.ones_like(amax), amax)))
        q = torch.round(xb * inv)  # half to even, as _MM_ROUND_NEAREST
    d16 = d.to(torch.float16).to(torch.float32)
    return q, d16


def _q8_k(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    xb, _ = _blocks(x, "Q8_K")
    index = xb.abs().argmax(dim=-1, keepdim=True)  # the first of equal maxima, as the strict `>` of the C loop
    signed_max = torch.gather(xb, -1, index)
    zero = signed_max == 0
    iscale = _div(-127.0, torch.where(zero, torch.ones_like(signed_max), signed_max))
    q = torch.clamp(torch.round(iscale * xb), max=127.0)  # nearest_int: half to even; MIN(127, v)
    d = torch.where(zero, torch.zeros_like(iscale), _div(1.0, iscale))
    q = torch.where(zero, torch.zeros_like(q), q)
    return q, d


def round_trip(x: torch.Tensor, act_type: str, reference: bool = False) -> torch.Tensor:
    """The float values ggml's dot product sees after quantizing `x` (…, n) along its last dimension into
    `act_type` ('Q8_0', 'Q8_1', 'Q8_K', 'F16', 'BF16' or 'F32'). float32 in, float32 out (other float dtypes are
    computed in float32 and returned in their own dtype). `reference`: q8_0 / q8_1 as ggml's reference C path
    (id = 1/d, half away from zero) instead of the x86 SIMD path (id = 127/amax, half to even)."""
    key = act_type.upper()
    if key not in BLOCK:
        raise HieruiError(f"unknown ggml activation type '{act_type}': use {', '.join(BLOCK)}")
    dtype = x.dtype
    xf = x.to(torch.float32)
    if key == "F32":
        _blocks(xf, key)
        return x
    if key in ("F16", "BF16"):
        _blocks(xf, key)
        half = torch.float16 if key == "F16" else torch.bfloat16
        return xf.to(half).to(torch.float32).to(dtype)
    if key == "Q8_K":
        q, d = _q8_k(xf)
    else:
        q, d = _q8_32(xf, key, reference)
    return (d * q).reshape(x.shape).to(dtype)


def q8_1_sums(x: torch.Tensor, reference: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per q8_1 block (…, n/32): s as ggml stores it (fp16(d · Σq), d the float32 scale before its fp16
    rounding) and the exact d16 · Σq that round_trip's values sum to. A Q4_1 / Q5_1 dot product adds
    m_w · s per block, so its difference from dot(W_deq, round_trip(x)) is Σ_blocks m_w · (s − d16·Σq)."""
    xf = x.to(torch.float32)
    xb, _ = _blocks(xf, "Q8_1")
    amax = xb.abs().amax(dim=-1)
    q, d16 = _q8_32(xf, "Q8_1", reference)
    total = q.sum(dim=-1)
    s = (total * (amax / torch.full_like(amax, 127.0))).to(torch.float16).to(torch.float32)
    return s, d16.squeeze(-1) * total
