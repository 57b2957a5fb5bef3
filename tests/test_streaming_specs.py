"""Streamed layers (engine.place.streaming) for checkpoints and drops: checkpoint:DIR, attndrop, mlpdrop, blockdrop.

Each must give with streamed layers what it gives in memory: the same step records and report figures (sparsity,
dropped units, structure), the dense model's store left dense and no layer's weights left resident. A checkpoint
compared with a streamed dense model streams its own layers from its files: it is never loaded whole.
"""

import pytest
import torch
from test_streaming import _same_records, _same_weights

from engine.anatomy.linears import decoder_layers
from engine.perturb import perturb
from engine.perturb.export import save_checkpoint
from engine.place import streaming
from engine.run.stepper import Stepper, StepSettings

PROMPT = "The quick brown fox"
DROPS = ("attndrop:1", "mlpdrop:1", "blockdrop:1")
# the pruned or dropped models saved as checkpoints: one of the dense depth, one a block short
SAVED = ("magnitude:0.5", "blockdrop:1")
CHECKPOINTS = tuple(f"checkpoint of {spec}" for spec in SAVED)


pytestmark = pytest.mark.usefixtures("keep_the_allocator")  # tests/conftest.py


@pytest.fixture(scope="module")
def saved(tiny, tiny_calib, tmp_path_factory):
    """{source spec: a checkpoint directory written by `hierui prune --save` of tiny-random with that spec}."""
    out = {}
    for spec in SAVED:
        directory = tmp_path_factory.mktemp("ckpt") / spec.replace(":", "-")
        save_checkpoint(perturb(tiny, spec, calibration=tiny_calib, use_cache=False), directory)
        out[spec] = directory
    return out


def _spec(name: str, saved: dict) -> str:
    """The spec a test case names: "checkpoint of S" is the checkpoint saved from spec S."""
    source = name.removeprefix("checkpoint of ")
    return f"checkpoint:{saved[source]}" if source != name else name


def _all_meta(model) -> bool:
    """Every decoder-layer parameter of `model` is a meta tensor: no streamed layer's weights are resident."""
    return all(p.device.type == "meta" for layer in decoder_layers(model) for p in layer.parameters())


def _dense_store_untouched(tiny, pair) -> None:
    for layer in decoder_layers(pair.dense):
        hook = streaming.layer_hook(layer)
        assert hook.folder is None and isinstance(hook.weights_map, streaming.FileStore)
    _same_weights(tiny.model, pair.dense)


@pytest.mark.parametrize("name", CHECKPOINTS + DROPS)
def test_streamed_pair_steps_and_reports_as_in_memory(tiny, tiny_streamed, tiny_calib, saved, name):
    spec = _spec(name, saved)
    memory = perturb(tiny, spec, calibration=tiny_calib, use_cache=False)
    pair = perturb(tiny_streamed, spec, calibration=tiny_calib, use_cache=False)
    assert streaming.is_streamed(pair.perturbed)
    assert pair.report.measured_sparsity == memory.report.measured_sparsity
    assert pair.report.dense_sparsity == memory.report.dense_sparsity
    assert pair.report.by_type == memory.report.by_type
    assert pair.hidden_map == memory.hidden_map
    if name in DROPS:
        assert pair.report.details["dropped"] == memory.report.details["dropped"]
        assert pair.report.details["kind"] == memory.report.details["kind"]
        assert pair.report.details["similarity"] == pytest.approx(memory.report.details["similarity"], rel=1e-6)
        assert len(decoder_layers(pair.perturbed)) == len(decoder_layers(memory.perturbed))
    else:
        assert pair.report.details["structure"] == memory.report.details["structure"]
        assert "not shared" in pair.report.details["streamed_layers"]
    settings = StepSettings(mode="free", max_new_tokens=4, raw=True)
    _same_records(Stepper(memory, PROMPT, settings).run(), Stepper(pair, PROMPT, settings).run())
    assert _all_meta(pair.dense) and _all_meta(pair.perturbed)  # stepping released every layer
    _dense_store_untouched(tiny, pair)


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_streamed_checkpoint_is_never_loaded_whole(tiny_streamed, saved, monkeypatch, name):
    import transformers

    def whole(*_args, **_kwargs):
        raise AssertionError("the checkpoint was loaded whole")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", whole)
    pair = perturb(tiny_streamed, _spec(name, saved), use_cache=False)
    ckpt = pair.perturbed
    assert _all_meta(ckpt)
    for layer in decoder_layers(ckpt):
        hook = streaming.layer_hook(layer)
        assert hook is not None and isinstance(hook.weights_map, streaming.FileStore)
        # read from the checkpoint's own files, never written anywhere else first
        assert {path for path, _key in hook.weights_map.entries.values()} <= {
            str(f) for f in saved[name.removeprefix("checkpoint of ")].glob("*.safetensors")
        }
    # only resident tensors (embeddings, final norm; the head is tied) are shared with the dense model
    assert pair.report.details["shared_tensors"] == 2
    assert ckpt.get_input_embeddings().weight is pair.dense.get_input_embeddings().weight


@pytest.mark.parametrize("name", DROPS)
def test_streamed_drop_names_only_what_its_layers_have(tiny_streamed, tiny_calib, name):
    pair = perturb(tiny_streamed, name, calibration=tiny_calib, use_cache=False)
    for index, layer in enumerate(decoder_layers(pair.perturbed)):
        hook = streaming.layer_hook(layer)
        assert hook.index == index  # blockdrop renumbers the kept layers
        assert set(hook.weights_map) == {n for n, _ in layer.named_parameters()}
        with streaming.resident(layer):  # a dropped sublayer's tensors are not brought in (nor asked for)
            assert all(p.device.type == "cpu" for p in layer.parameters())
    assert _all_meta(pair.perturbed)


def test_similarity_pass_leaves_no_weights_resident(tiny_streamed, tiny_calib, monkeypatch):
    from engine.perturb import drop

    scores = drop.similarity_scores(tiny_streamed.model, tiny_calib.ids)
    assert len(scores["block"]) == len(decoder_layers(tiny_streamed.model))
    assert _all_meta(tiny_streamed.model)

    def broken(_output):  # an error inside a layer's forward, before its hook releases the weights
        raise RuntimeError("stop")

    monkeypatch.setattr(drop, "_out", broken)
    with pytest.raises(RuntimeError, match="stop"):
        drop.similarity_scores(tiny_streamed.model, tiny_calib.ids)
    assert _all_meta(tiny_streamed.model)


def test_drop_scores_cached_by_either_path(tiny, tiny_streamed, tiny_calib, fresh_home, monkeypatch):
    from engine.perturb import drop

    calls = []
    score = drop.similarity_scores
    monkeypatch.setattr(drop, "similarity_scores", lambda *a, **k: calls.append(1) or score(*a, **k))
    streamed = perturb(tiny_streamed, "blockdrop:1", calibration=tiny_calib)
    memory = perturb(tiny, "blockdrop:1", calibration=tiny_calib)
    assert len(calls) == 1  # the streamed pass stored the scores; the in-memory path read them
    assert streamed.report.details == memory.report.details


@pytest.mark.parametrize("name", ["attndrop:1", "blockdrop:1"])
def test_streamed_drop_saves_the_in_memory_checkpoint(tiny, tiny_streamed, tiny_calib, tmp_path, name):
    """`prune --save` of a streamed drop (its zeroed output projections written to the copy's own store, one
    layer at a time) is the checkpoint the in-memory path saves, tensor for tensor."""
    from safetensors import safe_open

    def tensors(directory):
        out = {}
        for file in directory.glob("*.safetensors"):
            with safe_open(str(file), framework="pt") as f:
                out.update({k: f.get_tensor(k) for k in f.keys()})
        return out

    for model, folder in ((tiny, "memory"), (tiny_streamed, "streamed")):
        save_checkpoint(perturb(model, name, calibration=tiny_calib, use_cache=False), tmp_path / folder)
    memory, streamed = tensors(tmp_path / "memory"), tensors(tmp_path / "streamed")
    assert set(memory) == set(streamed)
    assert all(torch.equal(memory[k], streamed[k]) for k in memory)


def _streaming_budget(spec: str) -> int:
    """A --gpu-mem (bytes) between the streamed need of tiny-random with `spec` and its in-memory peak."""
    from engine.run.plan import STAGES, estimate, stage_total

    options = {"device": "cpu", "calib": (8, 32), "max_new_tokens": 4, "lens": False, "perplexity": 512}
    plan = estimate("tiny-random", [spec], **options)
    memory = max(stage_total(plan.items, s, device_only=True) for s in STAGES)
    streamed = estimate("tiny-random", [spec], gpu_mem=memory - 1, **options)
    assert streamed.placement == "streamed" and streamed.streamed_device < memory
    return (memory + streamed.streamed_device) // 2


def test_cli_runs_drops_and_checkpoints_streamed_and_refuses_quantization(cli, saved, tmp_path):
    text = tmp_path / "calibration.txt"  # a text calibration: sampling one from the model takes a while
    text.write_text("The quick brown fox jumps over the lazy dog, and the dog sleeps on. " * 40)
    base = ("prune", "--model", "tiny-random", "--device", "cpu", "--no-cache", "--tokens", "4")
    calib = ("--calib", str(text), "--calib-samples", "8", "--calib-len", "32")  # only where a spec calibrates
    for spec, given in (("blockdrop:1", calib), (f"checkpoint:{saved['magnitude:0.5']}", ())):
        run = cli(*base, *given, "-p", spec, "--gpu-mem", f"{_streaming_budget(spec)}B")
        assert run.returncode == 0, (run.stdout, run.stderr)
        assert "placement: streamed" in run.stdout and "perplexity" in run.stdout
    refused = cli(*base, "-p", "int8", "--gpu-mem", f"{_streaming_budget('blockdrop:1')}B")
    assert refused.returncode == 2, (refused.stdout, refused.stderr)
    assert "Traceback" not in refused.stderr and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert "cannot run with streamed layers" in refused.stderr and "blockdrop" in refused.stderr


def test_streamed_per_layer_shape_checkpoint_is_one_line(tiny, tiny_streamed, tmp_path):
    """A checkpoint whose layer 1 has half the MLP neurons its config says (LLM-Pruner style) is refused when
    streamed, before anything of it is loaded."""
    from safetensors.torch import save_file

    from engine.errors import HieruiError

    tensors = {k: v.detach().clone().contiguous() for k, v in tiny.model.state_dict().items()}
    mlp = "model.layers.1.mlp."
    for name in ("gate_proj.weight", "up_proj.weight"):
        tensors[mlp + name] = tensors[mlp + name][::2].contiguous()
    tensors[mlp + "down_proj.weight"] = tensors[mlp + "down_proj.weight"][:, ::2].contiguous()
    save_file(tensors, str(tmp_path / "model.safetensors"))
    tiny.model.config.save_pretrained(tmp_path)
    tiny.tokenizer.save_pretrained(tmp_path)
    with pytest.raises(HieruiError, match="cannot stream") as caught:
        perturb(tiny_streamed, f"checkpoint:{tmp_path}", use_cache=False)
    assert "\n" not in str(caught.value)
