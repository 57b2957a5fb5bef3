"""Streamed layers (engine.place.streaming): the decoder layers' weights on disk, each brought in for its turn.

Pruning a streamed model and stepping the streamed pair must give exactly what the in-memory path gives: the
same masks and weights, the same step metrics; the dense model's files stay dense; `--gpu-mem` below the
pair's peak streams it (simulated on a CPU), below even the streamed peak it is one line and exit 2.
"""

import weakref

import pytest
import torch

from engine.anatomy.linears import decoder_layers, weight_views
from engine.models.loading import load
from engine.perturb import perturb
from engine.place import streaming
from engine.run.stepper import Stepper, StepSettings

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


pytestmark = pytest.mark.usefixtures("keep_the_allocator")  # tests/conftest.py


@pytest.fixture(scope="module")
def wanda_pairs(tiny, tiny_streamed, tiny_calib):
    """wanda:0.5 on tiny-random, in memory and streamed."""
    return tuple(perturb(m, "wanda:0.5", calibration=tiny_calib, use_cache=False) for m in (tiny, tiny_streamed))


def _fixed_calibration(samples: int, length: int):
    """Seeded random token ids as the calibration: no sampling from the model (that takes a while)."""
    from engine.perturb.calibration import Calibration

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
    from engine.run.plan import STAGES, estimate, stage_total

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


# ------------------------------------------------------------------ the pruned-weight cache and --save, streamed


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("writer", ["streamed", "in memory"])
def test_streamed_cache_entry_is_the_in_memory_pruning(
    tiny, tiny_streamed, tiny_calib, wanda_pairs, fresh_home, writer
):
    """A pruning stored in the cache (by the streamed path, or the in-memory one) loads back in both paths bit
    for bit as the in-memory pruning: weights and logits. The streamed clone keeps a link of the file of its
    own, so clearing the cache under it changes nothing."""
    from engine.perturb.spec import parse_spec
    from engine.perturb.stored import _prune_key

    memory = wanda_pairs[0]
    expected = _logits(memory.perturbed, IDS)
    stored = perturb(tiny_streamed if writer == "streamed" else tiny, "wanda:0.5", calibration=tiny_calib)
    assert not stored.report.from_cache
    entry = _prune_key(tiny_streamed, parse_spec("wanda:0.5"), tiny_calib).path
    assert entry == _prune_key(tiny, parse_spec("wanda:0.5"), tiny_calib).path and entry.is_file()
    pairs = [perturb(m, "wanda:0.5", calibration=tiny_calib) for m in (tiny_streamed, tiny)]
    for pair in pairs:
        assert pair.report.from_cache and pair.report.details == stored.report.details
        _same_weights(memory.perturbed, pair.perturbed)
        assert torch.equal(_logits(pair.perturbed, IDS), expected)
    assert streaming.is_streamed(pairs[0].perturbed)
    entry.unlink()  # hierui cache clear while the streamed pair is in use
    assert torch.equal(_logits(pairs[0].perturbed, IDS), expected)


class _Reads:
    """Every tensor read from a streamed model's files (FileStore), by decoder layer, and at each read which
    layers still had a tensor alive in memory (its storage not freed): `most` is the largest such count."""

    def __init__(self, *models):
        self.layer: dict[tuple[str, str], int] = {}  # (file, key) → decoder layer
        for model in models:
            for index, layer in enumerate(decoder_layers(model)):
                store = streaming.layer_hook(layer).weights_map
                for part in (store.own, store.base) if isinstance(store, streaming.Overlay) else (store,):
                    self.layer.update(dict.fromkeys(part.entries.values(), index))
        self.alive: list[tuple[int, weakref.ref]] = []
        self.count = self.most = 0

    def __enter__(self):
        read = streaming.FileStore.__getitem__

        def tracked(store, name):
            tensor = read(store, name)
            self.alive = [(layer, ref) for layer, ref in self.alive if ref() is not None]
            self.alive.append((self.layer[store.entries[name]], weakref.ref(tensor.untyped_storage())))
            self.most = max(self.most, len({layer for layer, _ in self.alive}))
            self.count += 1
            return tensor

        self._patch = pytest.MonkeyPatch()
        self._patch.setattr(streaming.FileStore, "__getitem__", tracked)
        return self

    def __exit__(self, *exc):
        self._patch.undo()


def test_streamed_cache_store_and_load_hold_one_layer_at_a_time(
    tiny, tiny_streamed, tiny_calib, fresh_home, monkeypatch
):
    """Storing a streamed pruning in the cache reads each pruned tensor once, never with another layer's still
    in memory; loading it reads nothing (the clone's store points into the file) and never the whole file."""
    from engine.perturb.spec import parse_spec
    from engine.perturb.stored import _load_pruned, _prune_key, _store_pruned

    pair = perturb(tiny_streamed, "wanda:0.5", calibration=tiny_calib, use_cache=False)
    entry = _prune_key(tiny_streamed, parse_spec("wanda:0.5"), tiny_calib)
    with _Reads(pair.perturbed) as reads:
        _store_pruned(pair.dense, pair.perturbed, entry, pair.report.details)
    assert reads.count == len(streaming.own_entries(pair.perturbed)) == 4 * 7  # every pruned matrix, once
    assert reads.most == 1

    def whole_file(*_a, **_k):
        raise AssertionError("the cache entry was read whole")

    monkeypatch.setattr("safetensors.torch.load_file", whole_file)
    with _Reads(pair.perturbed) as reads:
        loaded = _load_pruned(tiny_streamed.model, entry)
    assert loaded is not None and reads.count == 0
    _same_weights(pair.perturbed, loaded[0])


def _state(directory):
    """The state dict `from_pretrained(directory)` loads, and the model."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(directory))
    return model.state_dict(), model


def _same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_streamed_save_is_save_pretrained_one_layer_at_a_time(wanda_pairs, tmp_path):
    """--save of a streamed pair: a sharded checkpoint, the resident tensors (the tied head once) and then one
    shard per decoder layer, written reading one layer at a time; from_pretrained loads the in-memory pruned
    model's weights from it, and its logits."""
    import json

    from safetensors.torch import load_file

    from engine.perturb.export import save_checkpoint

    memory, streamed = wanda_pairs
    with _Reads(streamed.perturbed) as reads:
        save_checkpoint(streamed, tmp_path / "streamed")
    assert reads.most == 1 and reads.count == 4 * 9  # every parameter of every layer, once
    save_checkpoint(memory, tmp_path / "memory")
    index = json.loads((tmp_path / "streamed" / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [f"model-{i:05d}-of-00005.safetensors" for i in range(1, 6)]
    whole = load_file(str(tmp_path / "memory" / "model.safetensors"))  # what save_pretrained wrote
    assert index["weight_map"].keys() == whole.keys()  # lm_head.weight (tied) left out as there
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in whole.values())
    for name in ("config.json", "generation_config.json", "tokenizer.json", "hierui-perturbation.json"):
        assert (tmp_path / "streamed" / name).is_file(), name
    saved, model = _state(tmp_path / "streamed")
    _same_state(saved, _state(tmp_path / "memory")[0])
    assert torch.equal(_logits(model, IDS), _logits(memory.perturbed, IDS))


def test_cli_save_of_a_streamed_pair_is_the_in_memory_save(cli, tmp_path):
    """`hierui prune --gpu-mem SMALL --save DIR` (streamed) writes what `--save` of the in-memory pair writes, and
    `--prune checkpoint:DIR` compares it."""
    base = ("prune", "--model", "tiny-random", "--device", "cpu", "--no-cache", "--tokens", "4", "--prune", "wanda:0.5")
    base += ("--calib-samples", "8", "--calib-len", "32")
    memory, need = _budgets("tiny-random", (8, 32), max_new_tokens=4, lens=False, perplexity=512)
    run = cli(*base, "--gpu-mem", f"{(memory + need) // 2}B", "--save", tmp_path / "streamed")
    assert run.returncode == 0, (run.stdout, run.stderr)
    assert "placement: streamed" in run.stdout and "saved to" in run.stdout
    run = cli(*base, "--save", tmp_path / "memory")
    assert run.returncode == 0 and "placement: streamed" not in run.stdout, (run.stdout, run.stderr)
    _same_state(_state(tmp_path / "streamed")[0], _state(tmp_path / "memory")[0])
    spec = f"checkpoint:{tmp_path / 'streamed'}"
    run = cli("prune", "--model", "tiny-random", "--device", "cpu", "--tokens", "4", "--prune", spec)
    assert run.returncode == 0, (run.stdout, run.stderr)
    assert "50.00%" in run.stdout  # the pruned layers' zeros, measured on the loaded checkpoint


PEAK_SCRIPT = """
import gc, json, sys, tempfile
import torch
from engine.place import streaming
from engine.perturb.calibration import Calibration
from engine.models.loading import load
from engine.perturb import perturb
from engine.perturb.stored import _load_pruned, _prune_key, _store_pruned
from engine.perturb.export import save_checkpoint
from engine.perturb.spec import parse_spec

def status(field):
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(field))

def peak(fn):
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the high-water mark back to the resident set now
    before = status("VmRSS")
    fn()
    return status("VmHWM") - before

ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
calib = Calibration(ids, "test", 2, 16, 0, "test-2x16")
loaded = load("smollm2-135m", device="cpu", streamed=True)
pair = perturb(loaded, "wanda:0.5", calibration=calib, use_cache=False)
with torch.no_grad():
    pair.perturbed(input_ids=ids[:, :4])  # the resident embeddings and head paged in, as by any run
entry = _prune_key(loaded, parse_spec("wanda:0.5"), calib)
print(json.dumps({
    "store": peak(lambda: _store_pruned(loaded.model, pair.perturbed, entry, {})),
    "load": peak(lambda: _load_pruned(loaded.model, entry)),
    "save": peak(lambda: save_checkpoint(pair, sys.argv[1])),
    "pruned": sum(t.numel() * t.element_size() for t in streaming.own_tensors(pair.perturbed).values()),
}))
"""


@pytest.mark.slow
@pytest.mark.embedded
def test_embedded_streamed_cache_and_save_peak_at_one_layer(embedded, tmp_path):
    """SmolLM2-135M streamed (30 layers, 405 MiB of pruned matrices): storing the pruning in the cache, loading it
    back and --save each raise the process's peak memory by about one layer (13.5 MiB), not by the model
    (gathering every pruned layer, as the cache once did, raised it by 416 MiB and 405 MiB)."""
    import json
    import os
    import subprocess
    import sys

    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak")
    env = {**os.environ, "HIERUI_HOME": str(tmp_path / "home")}
    run = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, str(tmp_path / "saved")], capture_output=True, text=True, env=env
    )
    assert run.returncode == 0, run.stderr
    measured = json.loads(run.stdout.strip().splitlines()[-1])
    layer = measured["pruned"] / 30
    for step in ("store", "load", "save"):
        assert measured[step] < 2 * layer, (step, measured)


@pytest.mark.parametrize("family", ["mixtral", "gpt2"])
def test_streamed_cache_and_save_of_other_families(family, fresh_home, tmp_path):
    """3-D expert tensors (Mixtral: fused on loading, split again by save_pretrained) and GPT-2's Conv1Ds and
    `transformer.h` layers: the streamed cache entry loads in the in-memory path as its pruning, and the streamed
    --save writes the in-memory --save's tensors under the same names."""
    from safetensors.torch import load_file

    from engine.perturb.export import save_checkpoint

    name = f"tiny-random:{family}"
    memory = perturb(load(name, device="cpu"), "magnitude:0.5", use_cache=False)
    streamed_model = load(name, device="cpu", streamed=True)
    streamed = perturb(streamed_model, "magnitude:0.5")  # stored in the cache
    assert streaming.is_streamed(streamed.perturbed) and not streamed.report.from_cache
    cached = perturb(load(name, device="cpu"), "magnitude:0.5")
    assert cached.report.from_cache
    _same_weights(memory.perturbed, cached.perturbed)
    assert torch.equal(_logits(streamed.perturbed, IDS), _logits(memory.perturbed, IDS))
    save_checkpoint(memory, tmp_path / "memory")
    save_checkpoint(streamed, tmp_path / "streamed")
    whole = load_file(str(tmp_path / "memory" / "model.safetensors"))
    shards = {}
    for shard in sorted((tmp_path / "streamed").glob("model-*.safetensors")):
        shards.update(load_file(str(shard)))
    _same_state(shards, whole)


def test_write_safetensors_is_read_by_safetensors(tmp_path):
    """The one-tensor-at-a-time writer gives a file safetensors reads back exactly: mixed dtypes (each aligned),
    an empty tensor, the metadata; and a tensor read with another shape than announced is an error."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    tensors = {
        "a": torch.arange(3, dtype=torch.int8),
        "b": torch.randn(2, 3).to(torch.bfloat16),
        "c": torch.zeros(0, 4),
        "d": torch.tensor([True, False]),
        "e": torch.randn(5, dtype=torch.float64),
        "f": torch.randn(4, 3).t(),  # not contiguous
    }
    streaming.write_safetensors(tmp_path / "x.safetensors", streaming.in_memory(tensors), {"details": "{}"})
    _same_state(load_file(str(tmp_path / "x.safetensors")), tensors)
    with safe_open(str(tmp_path / "x.safetensors"), framework="pt") as f:
        assert f.metadata() == {"details": "{}"}
    wrong = streaming.Pending("g", torch.float32, (2, 2), lambda: torch.zeros(4))
    with pytest.raises(RuntimeError, match="announced"):
        streaming.write_safetensors(tmp_path / "y.safetensors", [wrong])
