"""engine.models.ggml_activations: ggml's activation quantization, against blocks worked out by hand."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.errors import HieruiError
from engine.models.ggml_activations import VEC_DOT_TYPE, activation_type, q8_1_sums, round_trip

GGML_CPU = Path("/work/llamacpp/llama_cpp_python-0.3.36/vendor/llama.cpp/ggml/src/ggml-cpu/ggml-cpu.c")


def block(values, n):
    x = torch.zeros(n, dtype=torch.float32)
    x[: len(values)] = torch.tensor(values, dtype=torch.float32)
    return x


def test_q8_0_ties_round_half_to_even_with_unit_scale():
    # amax 127: d = 1 (exact in fp16), id = 1, so the values are the rounded inputs
    x = block([127.0, 0.5, 1.5, 2.5, -0.5, -2.5, 3.25, -126.6], 32)
    want = block([127.0, 0.0, 2.0, 2.0, 0.0, -2.0, 3.0, -127.0], 32)
    for kind in ("Q8_0", "Q8_1"):
        assert torch.equal(round_trip(x, kind), want)


def test_q8_0_reference_rounds_half_away_from_zero():
    x = block([127.0, 0.5, 1.5, 2.5, -0.5, -2.5], 32)
    want = block([127.0, 1.0, 2.0, 3.0, -1.0, -3.0], 32)
    assert torch.equal(round_trip(x, "Q8_0", reference=True), want)


def test_q8_0_scale_is_stored_in_fp16():
    # amax = 127·(1 + 2^-12): d = 1 + 2^-12 rounds to 1.0 in fp16, so the largest value comes back as 127
    amax = 127.0 * (1 + 2.0**-12)
    x = block([amax, -3.0], 32)
    assert torch.equal(round_trip(x, "Q8_0"), block([127.0, -3.0], 32))
    # amax 254: d = 2, id = 0.5; 3 → 1.5 → 2 → 4 and 5 → 2.5 → 2 → 4 (half to even)
    x = block([254.0, 3.0, 5.0, -7.0], 32)
    assert torch.equal(round_trip(x, "Q8_0"), block([254.0, 4.0, 4.0, -8.0], 32))


def test_zero_blocks_stay_zero():
    for kind, n in (("Q8_0", 32), ("Q8_1", 32), ("Q8_K", 256), ("F16", 8), ("BF16", 8), ("F32", 8)):
        x = torch.zeros(2, n)
        x[1, 0] = 1.0  # one zero block beside a non-zero one
        out = round_trip(x, kind)
        assert torch.equal(out[0], torch.zeros(n)), kind
        assert out[1, 0].item() == pytest.approx(1.0, rel=1e-2), kind


def test_q8_k_negative_max_unit_scale():
    # max = −127 (first of the two equal |x|): iscale = 1, d = 1; nearest_int rounds half to even
    x = block([-127.0, 127.0, 0.5, 1.5, 2.5, -3.5, -0.5], 256)
    want = block([-127.0, 127.0, 0.0, 2.0, 2.0, -4.0, 0.0], 256)
    assert torch.equal(round_trip(x, "Q8_K"), want)


def test_q8_k_scale_is_float32_and_signed():
    for sign in (-1.0, 1.0):
        x = block([sign * 3.0, 1.0, -2.0], 256)
        iscale = np.float32(-127.0) / np.float32(sign * 3.0)
        d = np.float32(1.0) / iscale
        q = [np.rint(iscale * np.float32(v)) for v in (sign * 3.0, 1.0, -2.0)]
        want = block([float(d * np.float32(v)) for v in q], 256)
        assert torch.equal(round_trip(x, "Q8_K"), want)
    # blocks of 256 along the last dimension: the second block's scale does not see the first's values
    x = torch.cat([block([100.0, 1.0], 256), block([1.0, 0.3], 256)])
    out = round_trip(x, "Q8_K")
    assert out[256].item() == pytest.approx(1.0, rel=1e-6)
    assert out[1].item() != pytest.approx(1.0, rel=1e-3)  # 1.0 on a grid of 100/127


def test_f16_bf16_f32():
    x = torch.tensor([1 + 2.0**-12, 1 + 2.0**-11, 1 + 3 * 2.0**-11, 3.0], dtype=torch.float32)
    assert torch.equal(round_trip(x, "F16"), torch.tensor([1.0, 1.0, 1 + 2.0**-9, 3.0]))
    assert torch.equal(round_trip(x, "BF16"), torch.tensor([1.0, 1.0, 1.0, 3.0]))
    assert round_trip(x, "F32") is x


def test_shapes_are_kept_and_rows_are_independent():
    torch.manual_seed(0)
    for kind, n in (("Q8_0", 64), ("Q8_1", 96), ("Q8_K", 512)):
        x = torch.randn(2, 3, n)
        out = round_trip(x, kind)
        assert out.shape == x.shape and out.dtype == torch.float32
        assert torch.equal(out[1, 2], round_trip(x[1, 2], kind))
        assert (out - x).abs().max() < x.abs().max() / 127


def test_q8_1_sums():
    x = torch.cat([block([127.0, 1.5, 2.5, 0.25], 32), block([254.0, 3.0, 5.0], 32)])
    s, exact = q8_1_sums(x)
    assert torch.equal(exact, torch.tensor([127.0 + 2 + 2, 254.0 + 4 + 4]))
    assert torch.equal(s, exact.to(torch.float16).to(torch.float32))
    big = block([100.0] * 32, 32) + torch.linspace(0, 0.5, 32)
    s, exact = q8_1_sums(big)
    assert s.item() == float(np.float16(exact.item())) or abs(s.item() - exact.item()) < exact.item() * 2.0**-10


def test_refusals():
    with pytest.raises(HieruiError, match="multiple of 32"):
        round_trip(torch.zeros(3, 48), "Q8_0")
    with pytest.raises(HieruiError, match="multiple of 256"):
        round_trip(torch.zeros(576), "Q8_K")
    with pytest.raises(HieruiError, match="unknown ggml activation type"):
        round_trip(torch.zeros(32), "Q9_0")
    with pytest.raises(HieruiError, match="no known activation type"):
        activation_type("Q7_K")
    assert activation_type("q4_k") == "Q8_K"
    assert activation_type("Q5_0") == "Q8_0" and activation_type("Q4_1") == "Q8_1"


@pytest.mark.skipif(not GGML_CPU.is_file(), reason="the vendored llama.cpp sources are not here")
def test_vec_dot_types_match_the_vendored_ggml_table():
    text = GGML_CPU.read_text()
    table = text[text.index("type_traits_cpu[GGML_TYPE_COUNT]") :]
    table = table[: table.index("};")]
    found = {}
    for entry in re.split(r"\[GGML_TYPE_", table)[1:]:
        name = entry.split("]", 1)[0]
        pair = re.search(r"\.vec_dot_type\s*=\s*GGML_TYPE_(\w+)", entry)
        if pair:
            found[name] = pair.group(1)
    assert found == VEC_DOT_TYPE
