"""Streamed layers (engine.streaming): the decoder layers' weights on disk, each brought in for its turn.

Pruning a streamed model and stepping the streamed pair must give exactly what the in-memory path gives: the
same masks and weights, the same step metrics; the dense model's files stay dense; `--gpu-mem` below the
pair's peak streams it (simulated on a CPU), below even the streamed peak it is one line and exit 2.
"""

import pytest
import torch

from engine import streaming
from engine.models import load
from engine.perturb import perturb
from engine.perturb.linears import decoder_layers, weight_views
from engine.stepper import Stepper, StepSettings

PROMPT = "The quick brown fox"
METRICS = ("kl", "js", "tv", "logit_cos", "prob_cos", "dp", "nll_d", "nll_p", "cum_kl", "cum_nll_gap")
EXACT = ("token_d", "token_p", "top1_agree", "rank_shift", "same_token", "first_divergence")


def _matrices(model) -> list[torch.Tensor]:
    """Every prunable matrix of `model`, copied out (a streamed layer's weights brought in to read them)."""
    out = []
    for index, layer in enumerate(decoder_layers(model)):
        with streaming.resident(layer):
            out += [v.matrix().detach().clone() for v in weight_views(layer, index)]
    return out


def _same_weights(a, b) -> None:
    ma, mb = _matrices(a), _matrices(b)
    assert len(ma) == len(mb)
    for x, y in zip(ma, mb):
        assert torch.equal(x == 0, y == 0)  # the same mask
        assert torch.equal(x, y)  # and the same kept (SparseGPT: updated) weights


def _same_records(ra: list[dict], rb: list[dict]) -> None:
    assert len(ra) == len(rb)
    for a, b in zip(ra, rb):
        for key in EXACT:
            assert a.get(key) == b.get(key), key
        for key in METRICS:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
        assert a["emb_cos"] == pytest.approx(b["emb_cos"], rel=1e-5, abs=1e-6)


@pytest.fixture(scope="module", autouse=True)
def _keep_the_allocator():
    """Streaming sets glibc's mmap threshold for the whole process (engine.streaming._return_freed_memory): not
    in the test process, whose other tests would then run with it."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(streaming, "_return_freed_memory", lambda: None)
        yield


@pytest.fixture(scope="module")
def tiny_streamed():
    return load("tiny-random", device="cpu", streamed=True)


@pytest.fixture(scope="module")
def wanda_pairs(tiny, tiny_streamed, tiny_calib):
    """wanda:0.5 on tiny-random, in memory and streamed."""
    return tuple(perturb(m, "wanda:0.5", calibration=tiny_calib, use_cache=False) for m in (tiny, tiny_streamed))


def _fixed_calibration(samples: int, length: int):
    """Seeded random token ids as the calibration: no sampling from the model (that takes a while)."""
    from engine.calibration import Calibration

    ids = torch.randint(0, 1000, (samples, length), generator=torch.Generator().manual_seed(0))
    return Calibration(ids, "test", samples, length, 0, f"test-{samples}x{length}")


def test_streamed_layers_hold_no_weights_and_compute_alike(tiny, tiny_streamed):
    layers = decoder_layers(tiny_streamed.model)
    assert all(p.device.type == "meta" for layer in layers for p in layer.parameters())
    assert tiny_streamed.model.get_input_embeddings().weight.device.type == "cpu"  # resident
    ids = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = tiny.model(input_ids=ids).logits
        got = tiny_streamed.model(input_ids=ids).logits
    assert torch.equal(expected, got)
    assert all(p.device.type == "meta" for layer in layers for p in layer.parameters())  # released after


@pytest.mark.parametrize("spec", ["magnitude:0.5", "wanda:0.5", "sparsegpt:0.5", "wanda:2:4"])
def test_streamed_pruning_gives_the_same_weights(tiny, tiny_streamed, tiny_calib, wanda_pairs, spec):
    if spec == "wanda:0.5":
        memory, streamed = wanda_pairs
    else:
        memory = perturb(tiny, spec, calibration=tiny_calib, use_cache=False)
        streamed = perturb(tiny_streamed, spec, calibration=tiny_calib, use_cache=False)
    assert streaming.is_streamed(streamed.perturbed)
    _same_weights(memory.perturbed, streamed.perturbed)
    assert streamed.report.measured_sparsity == memory.report.measured_sparsity
    assert streamed.report.by_type == memory.report.by_type
    # the dense model's files stay dense: its layers read back exactly the unpruned weights
    _same_weights(tiny.model, streamed.dense)
    for layer in decoder_layers(streamed.dense):
        hook = streaming.layer_hook(layer)
        assert hook.folder is None and isinstance(hook.weights_map, streaming.FileStore)


@pytest.mark.parametrize("mode", ["shared", "free"])
def test_streamed_stepping_gives_the_same_metrics(wanda_pairs, mode):
    settings = StepSettings(mode=mode, max_new_tokens=6, raw=True)
    _same_records(*(Stepper(pair, PROMPT, settings).run() for pair in wanda_pairs))


def test_streamed_pruning_cache_round_trip(tiny_streamed, tiny_calib, fresh_home):
    first = perturb(tiny_streamed, "wanda:0.5", calibration=tiny_calib)
    again = perturb(tiny_streamed, "wanda:0.5", calibration=tiny_calib)
    assert not first.report.from_cache and again.report.from_cache
    _same_weights(first.perturbed, again.perturbed)


def test_streamed_spec_that_cannot_stream_is_refused(tiny_streamed):
    from engine.errors import HieruiError

    with pytest.raises(HieruiError, match="cannot run with streamed layers"):
        perturb(tiny_streamed, "int8", use_cache=False)


def _budgets(model: str, calib: tuple[int, int], **options) -> tuple[int, int]:
    """(the in-memory peak on the device, the streamed need): a --gpu-mem between them streams the pair."""
    from engine.plan import STAGES, estimate, stage_total

    plan = estimate(model, ["wanda:0.5"], device="cpu", calib=calib, **options)
    memory = max(stage_total(plan.items, s, device_only=True) for s in STAGES)
    streamed = estimate(model, ["wanda:0.5"], device="cpu", calib=calib, gpu_mem=memory - 1, **options)
    assert streamed.placement == "streamed" and streamed.implemented
    return memory, streamed.streamed_device


def test_cli_streams_below_the_budget_and_refuses_below_the_streamed_peak(cli):
    base = ("prune", "--model", "tiny-random", "--device", "cpu", "--no-cache", "--tokens", "4")
    base += ("--calib-samples", "8", "--calib-len", "32")
    memory, need = _budgets("tiny-random", (8, 32), max_new_tokens=4, lens=False, perplexity=512)
    run = cli(*base, "--gpu-mem", f"{(memory + need) // 2}B")
    assert run.returncode == 0, (run.stdout, run.stderr)
    assert "placement: streamed" in run.stdout and "perplexity" in run.stdout
    small = cli(*base, "--gpu-mem", f"{need // 2}B")
    assert small.returncode == 2, (small.stdout, small.stderr)
    assert "Traceback" not in small.stderr and len(small.stderr.strip().splitlines()) == 1, small.stderr
    assert "cannot fit even streamed" in small.stderr
    refused = cli(*base[:-4], "--prune", "int8", "--gpu-mem", f"{(memory + need) // 2}B")
    assert refused.returncode == 2 and "cannot run with streamed layers" in refused.stderr, refused.stderr


@pytest.mark.slow
@pytest.mark.embedded
def test_embedded_streamed_pruning_and_stepping_match_in_memory(embedded):
    """SmolLM2-135M: its layers streamed from its own safetensors file (never loaded whole); Wanda on a small
    calibration gives the same weights, and three shared-mode steps the same metrics, as the in-memory pair."""
    streamed = load("smollm2-135m", device="cpu", streamed=True)
    store = streaming.layer_hook(decoder_layers(streamed.model)[0]).weights_map
    assert all(path.endswith("model.safetensors") for path, _key in store.entries.values())
    calib = _fixed_calibration(2, 16)
    memory = perturb(embedded, "wanda:0.5", calibration=calib, use_cache=False)
    pair = perturb(streamed, "wanda:0.5", calibration=calib, use_cache=False)
    _same_weights(memory.perturbed, pair.perturbed)
    assert pair.report.measured_sparsity == memory.report.measured_sparsity
    settings = StepSettings(mode="shared", max_new_tokens=3, raw=True, lens=False, tie_margin=0.01)
    _same_records(Stepper(memory, PROMPT, settings).run(), Stepper(pair, PROMPT, settings).run())
