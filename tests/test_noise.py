"""The numerical noise floor (engine.run.noise, `hierui noise`): the dense model against itself under another dtype,
another batch shape and cached vs full passes; the tie margin it stores and `tie_margin()` reads back; the
margin/flip bookkeeping by hand; one-line errors."""

import json
import math
from pathlib import Path

import pytest
import torch

from engine.run import floor as F
from engine.run import noise as N

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "Hi",
]
STEPS = 4


@pytest.fixture(scope="module")
def floor(tiny):
    return N.measure_floor(tiny, PROMPTS, STEPS, ["float32", "bfloat16"])


def _by_kind(floor: dict) -> dict:
    return {(c["kind"], c["dtype"]): c for c in floor["comparisons"]}


def test_same_dtype_noise_is_tiny_in_float32_and_casting_moves_more(floor):
    rows = _by_kind(floor)
    assert set(rows) == {
        ("dtype", "bfloat16"),
        ("batch", "float32"),
        ("batch", "bfloat16"),
        ("cache", "float32"),
        ("cache", "bfloat16"),
    }
    for c in rows.values():
        assert c["steps"] == len(PROMPTS) * STEPS
        assert 0.0 <= c["kl_mean"] <= c["kl_max"] and 0.0 <= c["kl_p99"] <= c["kl_max"]
        assert c["flips"] == round(c["flip_rate"] * c["steps"])
    for kind in ("batch", "cache"):
        assert rows[kind, "float32"]["kl_max"] < 1e-8
    cast = rows["dtype", "bfloat16"]
    assert cast["kl_mean"] > max(rows[k, "float32"]["kl_max"] for k in ("batch", "cache"))
    assert floor["dtypes"] == ["float32", "bfloat16"] and floor["reference_dtype"] == "float32"


def test_tie_margin_is_the_largest_noise_move_or_flip_margin_of_the_same_dtype(floor):
    rows = _by_kind(floor)
    for dtype in ("float32", "bfloat16"):
        same = [rows[k, dtype] for k in ("batch", "cache")]
        expected = max(v for c in same for v in (c["dmargin_max"], c["flip_margin_max"]) if v is not None)
        assert floor["tie_margin"][dtype] == expected
    assert floor["tie_margin"]["float32"] < 1e-4 < floor["tie_margin"]["bfloat16"]


def test_the_floor_is_stored_and_read_back(floor, fresh_home):
    path = F.save_floor(floor)
    assert path == F.floor_path("tiny-random", "cpu") and path.parent == Path(fresh_home) / "noise"
    data = json.loads(path.read_text())
    for key in ("model", "device", "dtypes", "prompts_hash", "hierui", "created", "tie_margin", "comparisons"):
        assert key in data
    assert data["model"] == "tiny-random" and data["device"] == "cpu" and data["prompts"] == len(PROMPTS)
    assert F.load_floor("tiny-random", "cpu") == data
    value, source = F.tie_margin("tiny-random", "cpu", "bfloat16")
    assert value == floor["tie_margin"]["bfloat16"] and source.startswith("hierui noise")
    assert F.tie_margin("tiny-random", "cpu", "torch.float32")[0] == floor["tie_margin"]["float32"]
    # float16 was not measured; another device type has no floor
    assert F.tie_margin("tiny-random", "cpu", "float16") == (
        F.DEFAULT_TIE_MARGIN["float16"],
        "default (hierui noise did not measure float16 for this model)",
    )
    assert F.tie_margin("tiny-random", "mps", "float32") == (F.DEFAULT_TIE_MARGIN["float32"], F.DEFAULT_SOURCE)
    summary = F.floor_summary(data, "bfloat16")
    assert set(summary) == {"tie_margin", "flip_rate", "kl_mean", "kl_p99", "source"}
    same = [c for c in data["comparisons"] if c["dtype"] == "bfloat16" and c["kind"] != "dtype"]
    assert summary["tie_margin"] == floor["tie_margin"]["bfloat16"]
    assert summary["kl_mean"] == max(c["kl_mean"] for c in same)
    assert summary["flip_rate"] == max(c["flip_rate"] for c in same)


def test_measuring_one_dtype_keeps_the_stored_floor_of_the_others(tiny, floor, fresh_home):
    """Guards issue 25 class 6: `hierui noise --dtypes float32` rewrote the stored floor whole, deleting the
    bfloat16 tie margin an earlier run had measured; now only the dtypes measured are replaced."""
    F.save_floor(floor)
    again = N.measure_floor(tiny, PROMPTS[:2], 2, ["float32"])
    F.save_floor(again)
    stored = F.load_floor("tiny-random", "cpu")
    assert stored["tie_margin"] == {
        "float32": again["tie_margin"]["float32"],
        "bfloat16": floor["tie_margin"]["bfloat16"],
    }
    assert stored["dtypes"] == ["float32", "bfloat16"] and stored["prompts"] == 2
    rows = _by_kind(stored)
    assert rows["batch", "float32"] == _by_kind(again)["batch", "float32"]  # replaced
    assert rows["batch", "bfloat16"] == _by_kind(floor)["batch", "bfloat16"]  # kept, with the cast comparison
    assert ("dtype", "bfloat16") in rows
    assert F.tie_margin("tiny-random", "cpu", "bfloat16") == (
        floor["tie_margin"]["bfloat16"],
        "hierui noise, " + floor["created"][:10],
    )
    assert any("bfloat16: kept from the measurement" in note for note in stored["notes"])
    F.save_floor(floor)  # measuring every dtype again replaces everything
    assert F.load_floor("tiny-random", "cpu") == json.loads(json.dumps(floor))


def test_without_a_floor_the_default_and_its_source(fresh_home):
    for dtype in ("float32", "bfloat16", "float16", "torch.bfloat16", "bf16"):
        want = F.DEFAULT_TIE_MARGIN[F.dtype_name(dtype)]
        assert F.tie_margin("tiny-random", "cpu", dtype) == (want, F.DEFAULT_SOURCE)
    assert F.tie_margin("", "cpu", "float32") == (F.DEFAULT_TIE_MARGIN["float32"], F.DEFAULT_SOURCE)
    assert F.load_floor("tiny-random", "cpu") is None
    assert F.floor_summary(None, "float32") == {
        "tie_margin": F.DEFAULT_TIE_MARGIN["float32"],
        "flip_rate": None,
        "kl_mean": None,
        "kl_p99": None,
        "source": F.DEFAULT_SOURCE,
    }
    # a corrupt or foreign file is no floor
    path = F.floor_path("tiny-random", "cpu")
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    assert F.tie_margin("tiny-random", "cpu", "float32")[1] == F.DEFAULT_SOURCE


def test_margin_and_flip_bookkeeping_by_hand():
    # per step: the reference's distribution a and the other b, over three tokens
    a = [[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.40, 0.35, 0.25]]
    b = [[0.35, 0.45, 0.2], [0.1, 0.55, 0.35], [0.33, 0.28, 0.39]]
    out = N.compare(torch.tensor(a, dtype=torch.float64).log(), torch.tensor(b, dtype=torch.float64).log())
    # step 0: t1, t2 = 0, 1; b swaps them: a flip at margin 0.2, the gap moves 0.2 → −0.1
    # step 1: t1, t2 = 1, 2; no flip, margin 0.3, the gap moves 0.3 → 0.2
    # step 2: t1, t2 = 0, 1; b's top-1 is token 2: a flip at margin 0.05 whose t1/t2 gap did not move
    assert out["flip"].tolist() == [True, False, True]
    assert out["margin"].tolist() == pytest.approx([0.2, 0.3, 0.05])
    assert out["dmargin"].tolist() == pytest.approx([-0.3, -0.1, 0.0], abs=1e-12)
    kl = [sum(p * math.log(p / q) for p, q in zip(pa, pb)) for pa, pb in zip(a, b)]
    assert out["kl"].tolist() == pytest.approx(kl)
    figures = N.summarize({k: v.tolist() for k, v in out.items()})
    assert figures["steps"] == 3 and figures["flips"] == 2 and figures["flip_rate"] == pytest.approx(2 / 3)
    assert figures["flip_margin_max"] == pytest.approx(0.2)
    assert figures["dmargin_max"] == pytest.approx(0.3)
    assert figures["kl_mean"] == pytest.approx(sum(kl) / 3) and figures["kl_max"] == pytest.approx(max(kl))
    batch = {"kind": "batch", "dtype": "float32", **figures}
    assert N.threshold([batch], "float32") == pytest.approx(0.3)
    # the flip at a margin wider than any gap move sets the threshold: steps 1 and 2 alone
    later = N.summarize({k: v[1:].tolist() for k, v in out.items()})
    assert N.threshold([{"kind": "cache", "dtype": "float32", **later}], "float32") == pytest.approx(0.1)
    only_flip = N.summarize({k: v[2:].tolist() for k, v in out.items()})
    assert N.threshold([{"kind": "cache", "dtype": "float32", **only_flip}], "float32") == pytest.approx(0.05)
    # the dtype comparison is a reference, never the threshold
    assert N.threshold([{"kind": "dtype", "dtype": "float32", **figures}], "float32") is None


def test_identical_logits_are_exactly_no_noise():
    z = torch.randn(5, 50, generator=torch.Generator().manual_seed(0))
    figures = N.summarize({k: v.tolist() for k, v in N.compare(z, z.clone()).items()})
    assert figures["kl_max"] == 0.0 and figures["flips"] == 0 and figures["dmargin_max"] == 0.0
    assert figures["flip_margin_max"] is None


def test_a_dtype_that_cannot_be_loaded_is_said_and_the_rest_measured(tiny, monkeypatch):
    import engine.models.loading

    real = engine.models.loading.load

    def load(name, device="auto", dtype="auto", **kw):
        if dtype == "bfloat16":
            raise RuntimeError("bfloat16 is not supported here\nsecond line")
        return real(name, device=device, dtype=dtype, **kw)

    monkeypatch.setattr(engine.models.loading, "load", load)
    floor = N.measure_floor(tiny, PROMPTS[:2], 2, "float32,bf16")
    assert floor["dtypes"] == ["float32"] and list(floor["tie_margin"]) == ["float32"]
    assert {c["kind"] for c in floor["comparisons"]} == {"batch", "cache"}
    assert len(floor["notes"]) == 1 and "bfloat16" in floor["notes"][0] and "second line" not in floor["notes"][0]


def test_parse_dtypes():
    assert F.parse_dtypes("fp32, bf16,float32") == ["float32", "bfloat16"]
    assert F.parse_dtypes(["half"]) == ["float16"]
    for bad in ("float8", "", "float32,,int4"):
        with pytest.raises(F.HieruiError):
            F.parse_dtypes(bad)


# ------------------------------------------------------------------ the command


def _command_output(result, prompts: int) -> dict:
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "hierui noise" in out and f"{prompts} prompts × 4 steps" in out
    for name in ("float32 vs bfloat16", "batch (float32)", "batch (bfloat16)", "cache (float32)", "cache (bfloat16)"):
        assert name in out
    assert out.strip().splitlines()[-1].startswith("tie margins: float32 ")
    floor = F.load_floor("tiny-random", "cpu")
    assert floor is not None and floor["max_new_tokens"] == 4 and floor["prompts"] == prompts
    assert F.tie_margin("tiny-random", "cpu", "bfloat16")[0] == floor["tie_margin"]["bfloat16"]
    return floor


def test_noise_command_prints_the_table_and_saves_the_floor(cli, fresh_home, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    _command_output(cli("noise", "--model", "tiny-random", "--max-new-tokens", "4", "--prompts", prompts), 3)


@pytest.mark.slow
def test_noise_command_on_the_shipped_open_prompts(cli, fresh_home):
    # bfloat16 on a CPU pays a fixed cost per matrix product: 36 prompts of tiny-random take 10-50 s on 2 cores
    floor = _command_output(cli("noise", "--model", "tiny-random", "--max-new-tokens", "4"), 36)
    assert floor["batch_size"] == 8


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--model", "nope"], "unknown model 'nope'"),
        (["--model", "tiny-random", "--dtypes", "float8"], "unknown dtype 'float8'"),
        (["--model", "tiny-random", "--suite", "nope"], "unknown suite 'nope'"),
        (["--model", "tiny-random", "--device", "tpu"], "unknown device 'tpu'"),
    ],
)
def test_bad_input_is_one_line(cli, args, says):
    result = cli("noise", *args)
    assert result.returncode == 2, result.stdout + result.stderr
    assert says in result.stderr and "Traceback" not in result.stderr + result.stdout
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here")
def test_a_missing_gpu_is_one_line(cli):
    result = cli("noise", "--model", "tiny-random", "--device", "cuda")
    assert result.returncode == 2 and "no CUDA GPU" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_noise_floor_of_the_embedded_model(embedded, fresh_home):
    from engine.record.prompts import read_prompts
    from engine.sweep.recipe import SUITES

    items = read_prompts(SUITES / "open.jsonl")[:4]
    floor = N.measure_floor(embedded, items, 4, ["float32", "bfloat16"])
    rows = _by_kind(floor)
    for kind in ("batch", "cache"):
        assert rows[kind, "float32"]["kl_max"] < 1e-6
        assert rows[kind, "float32"]["kl_mean"] < rows[kind, "bfloat16"]["kl_mean"]
    assert rows["dtype", "bfloat16"]["kl_mean"] > rows["cache", "float32"]["kl_mean"]
    assert floor["tie_margin"]["float32"] < floor["tie_margin"]["bfloat16"]
    F.save_floor(floor)
    value, source = F.tie_margin("smollm2-135m", "cpu", "float32")
    assert value == floor["tie_margin"]["float32"] and source.startswith("hierui noise")
