"""checkpoint:PATH: an already-perturbed model from elsewhere, compared against the dense --model.

The checkpoint is loaded on the dense model's device and dtype, checked for compatibility (the same output
vocabulary: the probability spaces must be the same), and then every parameter that is bit-identical to the
dense parameter of the same name is replaced by the dense model's own tensor, so untouched embeddings, norms
and LM head are held once. Tied weights stay tied: a parameter object reached under several names is
replaced everywhere it is used.

Structurally different checkpoints (pruned layers, heads or MLP neurons):

- A checkpoint whose config itself says what changed (fewer layers, a smaller `intermediate_size`, fewer
  attention/KV heads, another hidden size, uniformly over its layers) is an ordinary model of its config and
  loads for every family.
- A checkpoint whose tensors have shapes other than its config implies, per layer (LLM-Pruner / Minitron style:
  the config keeps the original sizes, each layer's q/k/v/o and gate/up/down tensors have their own), is
  loaded for Llama-style models (model_type llama, mistral, qwen2, qwen3: q/k/v/o + gate/up/down
  projections): the model is built from its config, each projection whose tensor differs (shapes read from the
  safetensors headers) is given a linear of that tensor's shape, and the attention's `num_key_value_groups`
  is set per layer (the attention forward infers the head count from q_proj's output, with the config's
  head_dim, and repeats K/V by that many groups). Every shape is checked first: whole heads of the config's
  head_dim, K and V with the same heads, query heads a multiple of KV heads, at least one of each, MLP widths
  agreeing between gate, up and down, every projection reading/writing the hidden size. On other
  architectures such a checkpoint is one HieruiError line naming the tensors that differ.

What is compared is recorded in `report.details["structure"]`: the layer counts and hidden sizes
(dense, checkpoint), which hidden states are compared ("hidden_metrics") and `hidden_map` (for each dense
hidden-state index ℓ = 0..L the checkpoint's index, −1 where there is none, see engine.perturb.pair), the attention
heads, KV heads and MLP widths where they differ (per layer), and whether per-layer shapes were loaded. The
hidden states are compared at every layer when the layer counts and hidden sizes match; with another number
of layers, through the mapping of a `hierui-perturbation.json` written by `hierui prune --save` of a blockdrop
when the checkpoint has one, else at the embeddings (ℓ = 0) and the final normed state (ℓ = L) only; with
another hidden size, not at all (hidden-state metrics null; logits and probabilities are still compared).

With a streamed dense model (engine.place.streaming: `--gpu-mem` below the pair's peak) the checkpoint is streamed too:
its decoder layers are read from its own safetensors files, one layer at a time where the pair runs, and it is
never loaded whole. Only its resident tensors (embeddings, final norm, head) are compared with the dense model's
and shared; comparing the layers' would read both models from disk (report.details["streamed_layers"] says so).
The compatibility checks and the structure read shapes and configs only; the measured sparsity reads the layers
one at a time. Per-layer-shape checkpoints are refused when streamed (one line).
"""

from __future__ import annotations

import json
import logging
import re
from contextlib import contextmanager
from pathlib import Path

from engine.errors import HieruiError, one_line
from engine.record.methods import find

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
LLAMA_STYLE = ("llama", "mistral", "qwen2", "qwen3")
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
_PROJECTION = re.compile(
    r"^model\.layers\.(\d+)\.(?:self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj))\."
    r"(weight|bias)$"
)


def build(job):
    """The checkpoint's model sharing what it has in common with the dense one (engine.perturb.job.Job); its
    hidden_map when its layers do not correspond one to one."""
    model = load_checkpoint(job.loaded, job.spec, progress=lambda m: job.say(m, 0, 0), report=job.report)
    if str(job.spec.path).lower().endswith(".gguf"):  # the quant table's columns (engine.models.gguf_info)
        from engine.models.gguf_info import describe_gguf

        job.report.details["gguf"] = describe_gguf(Path(job.spec.path).expanduser())
    structure = job.report.details.get("structure", {})
    if "hidden_map" in structure:
        job.hidden_map = list(structure["hidden_map"])  # -1: no counterpart (engine.perturb.pair)
    return model


def load_checkpoint(loaded, spec, progress=None, report=None):
    """The model at `spec.path`, sharing with `loaded.model` every tensor the two have in common.

    With `report` (a PerturbReport), `report.details["structure"]` says what the pair compares.
    """
    from engine.models.loading import load
    from engine.models.names import resolve
    from engine.place.streaming import is_streamed

    say = progress or (lambda _msg: None)
    path = spec.path
    try:
        ref = resolve(path)
    except HieruiError:
        if not Path(path).expanduser().exists():
            raise HieruiError(f"checkpoint not found: {path}") from None
        raise
    dense = loaded.model
    dense_map = getattr(dense, "hf_device_map", None) or {}
    device_map = None
    if len(set(dense_map.values())) > 1:  # several devices: layer ℓ of both where the dense model has it
        from engine.anatomy.linears import decoder_layers
        from engine.models.configs import config_int, read_config

        depth = config_int(read_config(path), "num_hidden_layers")
        device_map = dict(dense_map) if depth == len(decoder_layers(dense)) else "auto"  # another depth: accelerate's
    directory = Path(ref.source) if ref.kind == "local" else None
    differing = _shapes_off_config(directory) if directory is not None else {}
    streamed = is_streamed(dense)
    if streamed and differing:
        raise HieruiError(
            f"checkpoint {path}: its layers have shapes of their own (pruned heads or MLP neurons), which hierui "
            "cannot stream from disk; raise --gpu-mem so that the pair is held in memory, or use a smaller model"
        )
    say(f"loading checkpoint {path}" + (" (layers streamed from its files)" if streamed else ""))
    try:
        if streamed:
            ckpt = _load_streamed(path, ref, loaded, say)
        elif differing:
            ckpt = _load_per_layer_shapes(directory, differing, loaded, device_map, path)
        else:
            ckpt = load(
                path,
                device=str(loaded.device),
                dtype=str(loaded.dtype).removeprefix("torch."),
                device_map=device_map,
                progress=say,
            ).model
    except HieruiError:
        raise
    except Exception as e:  # a broken or foreign directory: one line, with the likely cause
        hint = ""
        if Path(path).is_dir() and not any((Path(path) / f).is_file() for f in TOKENIZER_FILES):
            hint = " (it has no tokenizer files: save the tokenizer there too)"
        raise HieruiError(f"could not load checkpoint {path}{hint}: {one_line(e)}") from None
    _check_compatible(dense, ckpt, path)
    shared = share_identical(dense, ckpt)  # streamed: the resident tensors only (the layers' are on disk)
    ckpt.eval()
    ckpt.requires_grad_(False)
    if report is not None:
        report.details["structure"] = describe_structure(dense, ckpt, directory, per_layer=bool(differing))
        report.details["shared_tensors"] = shared
        if streamed:
            report.details["streamed_layers"] = STREAMED_NOTE
    return ckpt


# report.details["streamed_layers"] of a checkpoint compared with a streamed dense model
STREAMED_NOTE = (
    "the decoder layers are streamed from the checkpoint's own files, not shared with the dense model: "
    "shared_tensors counts the resident tensors (embeddings, final norm, head) only"
)


def _load_streamed(path: str, ref, loaded, say):
    """The checkpoint with its decoder layers streamed from its own safetensors files, running where the dense
    model's run (engine.place.streaming): only what stays resident (embeddings, final norm, head) is read now. A local
    directory whose tensor names do not map one to one onto its layers is refused rather than loaded whole (the
    point of streaming is a model that does not fit); a hub name or GGUF file is brought to a local directory
    first, as `--model` would be (engine.models.loading.load)."""
    from engine.models.loading import from_pretrained_streamed, load
    from engine.place.streaming import STREAM_ATTR

    device = getattr(loaded.model, STREAM_ATTR).execution_device
    if ref.kind != "local":
        dtype = str(loaded.dtype).removeprefix("torch.")
        return load(path, device=str(device), dtype=dtype, progress=say, streamed=True).model
    found = from_pretrained_streamed(Path(ref.source), device, loaded.dtype)
    if found is None:
        raise HieruiError(
            f"checkpoint {ref.source}: its safetensors tensors do not match the layers of its config name by name, "
            "so its layers cannot be streamed from its files; raise --gpu-mem so that the pair is held in memory"
        )
    return found[0]


def _dims(model) -> dict:
    return {"output vocabulary": model.get_output_embeddings().weight.shape[0]}


def _check_compatible(dense, ckpt, path: str) -> None:
    d, c = _dims(dense), _dims(ckpt)
    diff = [f"{k} {c[k]} vs {d[k]}" for k in d if d[k] != c[k]]
    if diff:
        raise HieruiError(f"checkpoint {path} does not match the dense model: {', '.join(diff)} (checkpoint vs dense)")


def share_identical(dense, ckpt) -> int:
    """Point every parameter of `ckpt` that equals the dense one of the same name at the dense tensor.

    Returns how many parameter objects were replaced. Names are taken with duplicates, so a tied
    parameter (LM head = embeddings) is decided once and replaced under every name it has.
    """
    import torch

    dense_params = dict(dense.named_parameters(remove_duplicate=False))
    swap: dict[int, object] = {}
    for name, p in ckpt.named_parameters(remove_duplicate=False):
        d = dense_params.get(name)
        if id(p) in swap or d is None or d is p:
            continue
        if p.device.type == "meta" or d.device.type == "meta":  # a streamed layer's: comparing would read the files
            continue
        if d.shape == p.shape and d.dtype == p.dtype and d.device == p.device and torch.equal(d.detach(), p.detach()):
            swap[id(p)] = d
    for module in ckpt.modules():
        for attr, p in list(module._parameters.items()):
            if p is not None and id(p) in swap:
                module._parameters[attr] = swap[id(p)]
    return len(swap)


# ------------------------------------------------------------------ tensors whose shapes the config does not imply


def safetensors_files(directory: Path) -> dict[str, Path]:
    """{tensor name: the .safetensors file holding it} of a checkpoint directory; empty without safetensors."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map") or {}
        return {name: directory / file for name, file in weight_map.items()}
    single = directory / "model.safetensors"
    if not single.is_file():
        return {}
    from safetensors import safe_open

    with safe_open(str(single), framework="pt") as f:
        return dict.fromkeys(f.keys(), single)


def safetensors_shapes(directory: Path) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} from the safetensors headers of a checkpoint directory (no tensor is read)."""
    from safetensors import safe_open

    by_file: dict[Path, list[str]] = {}
    for name, file in safetensors_files(directory).items():
        by_file.setdefault(file, []).append(name)
    shapes = {}
    for file, names in by_file.items():
        with safe_open(str(file), framework="pt") as f:
            for name in names:
                shapes[name] = tuple(f.get_slice(name).get_shape())
    return shapes


def _shapes_off_config(directory: Path) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """{name: (tensor shape, shape the config implies)} for every safetensors tensor whose shape is not the one
    the model built from the checkpoint's config gives it. Names the model does not have (a layout transformers
    converts on loading) are not compared; a checkpoint that cannot be inspected gives {} (loaded as usual)."""
    try:
        shapes = safetensors_shapes(directory)
        if not shapes:
            return {}
        expected = _config_shapes(directory)
    except Exception:
        return {}  # not ours to judge: the ordinary loader reports what is wrong
    return {n: (s, expected[n]) for n, s in shapes.items() if n in expected and tuple(expected[n]) != s}


def _config_shapes(directory: Path) -> dict[str, tuple[int, ...]]:
    """{state-dict name: shape} of the model the checkpoint's config describes, built on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(directory))
    with torch.device("meta"), _quiet_transformers():
        model = AutoModelForCausalLM.from_config(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def _load_per_layer_shapes(directory: Path, differing: dict, loaded, device_map, path: str):
    """A Llama-style checkpoint whose projections have per-layer shapes: built from its config, each differing
    projection replaced by a linear of its tensor's shape holding that tensor, num_key_value_groups per layer."""
    import torch.nn as nn
    from transformers import AutoConfig, AutoModelForCausalLM

    from engine.anatomy.linears import decoder_layers
    from engine.models.devices import placement_kwargs

    config = AutoConfig.from_pretrained(str(directory))
    model_type = getattr(config, "model_type", "?")
    listed = ", ".join(f"{n} {list(s)} (config: {list(e)})" for n, (s, e) in list(differing.items())[:3])
    more = f" and {len(differing) - 3} more" if len(differing) > 3 else ""
    if model_type not in LLAMA_STYLE:
        raise HieruiError(
            f"checkpoint {path}: tensors have shapes its config does not imply: {listed}{more}; per-layer shapes "
            f"(pruned heads or MLP neurons) load only for Llama-style models ({', '.join(LLAMA_STYLE)}), "
            f"not {model_type}"
        )
    foreign = [n for n in differing if not _PROJECTION.match(n)]
    if foreign:
        shown = ", ".join(f"{n} {list(differing[n][0])} (config: {list(differing[n][1])})" for n in foreign[:3])
        raise HieruiError(
            f"checkpoint {path}: tensors other than the attention/MLP projections have shapes its config does "
            f"not imply: {shown}"
        )
    shapes = safetensors_shapes(directory)
    files = safetensors_files(directory)
    placement = placement_kwargs(loaded.device, device_map)
    with _quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(
            str(directory), dtype=loaded.dtype, ignore_mismatched_sizes=True, **placement
        )
    if not placement:
        model = model.to(loaded.device)
    layers = decoder_layers(model)
    touched = sorted({int(_PROJECTION.match(n).group(1)) for n in differing})
    for index in touched:
        if index >= len(layers):
            raise HieruiError(f"checkpoint {path}: layer {index} is beyond the {len(layers)} layers of its config")
        layer = layers[index]
        attn, mlp = layer.self_attn, layer.mlp
        prefix = f"model.layers.{index}."
        names = {p: f"{prefix}self_attn.{p}" for p in ATTENTION} | {p: f"{prefix}mlp.{p}" for p in MLP}
        dims = {p: shapes.get(f"{n}.weight") for p, n in names.items()}
        missing = [p for p, d in dims.items() if d is None]
        if missing:
            raise HieruiError(f"checkpoint {path}: layer {index} has no {', '.join(missing)} weight")
        hidden = config.hidden_size
        q_heads, kv_heads = _check_layer(index, dims, attn.head_dim, hidden, path)
        for proj, name in names.items():
            owner = attn if proj in ATTENTION else mlp
            old = getattr(owner, proj)
            out_features, in_features = dims[proj]
            if tuple(old.weight.shape) == (out_features, in_features):
                continue
            bias_name = f"{name}.bias"
            if (old.bias is not None) != (bias_name in shapes):
                raise HieruiError(f"checkpoint {path}: layer {index} {proj} bias does not match its config")
            new = nn.Linear(in_features, out_features, bias=old.bias is not None)
            new.weight = nn.Parameter(_read(files, f"{name}.weight", old.weight), requires_grad=False)
            if old.bias is not None:
                if shapes[bias_name] != (out_features,):
                    raise HieruiError(
                        f"checkpoint {path}: layer {index} {proj} bias has shape {list(shapes[bias_name])}, "
                        f"its weight {out_features} outputs"
                    )
                new.bias = nn.Parameter(_read(files, bias_name, old.bias), requires_grad=False)
            setattr(owner, proj, new)
        attn.num_key_value_groups = q_heads // kv_heads
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = dims["gate_proj"][0]
    return model


def _check_layer(index: int, dims: dict, head_dim: int, hidden: int, path: str) -> tuple[int, int]:
    """(query heads, KV heads) of one layer from its projections' shapes; a shape the attention and MLP cannot
    run, or that does not read and write the hidden size, is one HieruiError line."""

    def fail(what: str):
        raise HieruiError(f"checkpoint {path}: layer {index}: {what}")

    q, k, v, o = (dims[p] for p in ATTENTION)
    gate, up, down = (dims[p] for p in MLP)
    for proj in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"):
        if dims[proj][1] != hidden:
            fail(f"{proj} reads {dims[proj][1]} features, the hidden size is {hidden}")
    for proj in ("o_proj", "down_proj"):
        if dims[proj][0] != hidden:
            fail(f"{proj} writes {dims[proj][0]} features, the hidden size is {hidden}")
    if q[0] % head_dim or k[0] % head_dim:
        fail(f"q_proj {q[0]} / k_proj {k[0]} outputs are not whole heads of head_dim {head_dim}")
    if v[0] != k[0]:
        fail(f"k_proj has {k[0]} outputs, v_proj {v[0]}")
    if o[1] != q[0]:
        fail(f"o_proj reads {o[1]} features, q_proj gives {q[0]}")
    q_heads, kv_heads = q[0] // head_dim, k[0] // head_dim
    if q_heads == 0 or kv_heads == 0:
        fail("no attention heads left (drop the layer's attention as a whole instead)")
    if q_heads % kv_heads:
        fail(f"{q_heads} query heads do not share {kv_heads} KV heads evenly")
    if gate[0] != up[0] or down[1] != gate[0]:
        fail(f"MLP widths differ: gate_proj {gate[0]}, up_proj {up[0]}, down_proj reads {down[1]}")
    return q_heads, kv_heads


def _read(files: dict, name: str, like):
    """The tensor `name` from the checkpoint, on the device and in the dtype of `like`."""
    from safetensors import safe_open

    with safe_open(str(files[name]), framework="pt") as f:
        return f.get_tensor(name).to(device=like.device, dtype=like.dtype)


@contextmanager
def _quiet_transformers():
    """transformers' loading notices (the tensors whose shapes differ from the config are replaced right after
    loading, so its 'newly initialized' warning does not apply) stay off stderr."""
    log = logging.getLogger("transformers")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


# ------------------------------------------------------------------ what the pair compares


def layer_shapes(model) -> list[dict]:
    """Per decoder layer: attention heads, KV heads, MLP width, read from Llama-style projections where the
    layer has them, else from the config (uniform)."""
    from engine.anatomy.linears import decoder_layers

    config = model.config
    heads = getattr(config, "num_attention_heads", None)
    kv = getattr(config, "num_key_value_heads", None) or heads
    width = next(
        (getattr(config, k) for k in ("intermediate_size", "ffn_dim", "n_inner") if getattr(config, k, None)), None
    )
    rows = []
    for layer in decoder_layers(model):
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        head_dim = getattr(attn, "head_dim", None)
        q, k = getattr(attn, "q_proj", None), getattr(attn, "k_proj", None)
        gate = getattr(mlp, "gate_proj", None)
        row = {"attention_heads": heads, "kv_heads": kv, "mlp_width": width}
        if isinstance(head_dim, int) and head_dim and q is not None and k is not None:
            row["attention_heads"] = q.weight.shape[0] // head_dim
            row["kv_heads"] = k.weight.shape[0] // head_dim
        if gate is not None and getattr(gate, "weight", None) is not None:
            row["mlp_width"] = gate.weight.shape[0]
        rows.append(row)
    return rows


def _compact(values: list):
    """A per-layer list as one value when every layer has it."""
    return values[0] if values and all(v == values[0] for v in values) else values


def hidden_map_for(dense, ckpt, directory: Path | None) -> tuple[list[int], str]:
    """(hidden_map, what it compares): see the module docstring."""
    n_d, n_c = dense.config.num_hidden_layers, ckpt.config.num_hidden_layers
    h_d = dense.get_input_embeddings().weight.shape[1]
    h_c = ckpt.get_input_embeddings().weight.shape[1]
    if h_d != h_c:
        return [-1] * (n_d + 1), "none: hidden sizes differ"
    if n_d == n_c:
        return list(range(n_d + 1)), "all layers"
    dropped = _blockdrop_hint(directory, n_d, n_c)
    if dropped is not None:
        from engine.perturb.drop import hidden_map_after_block_drop

        return (
            hidden_map_after_block_drop(n_d, dropped),
            f"all layers, through the dropped blocks {dropped} of its hierui-perturbation.json",
        )
    return [0] + [-1] * (n_d - 1) + [n_c], "embeddings and final only"


def _blockdrop_hint(directory: Path | None, n_dense: int, n_ckpt: int) -> list[int] | None:
    """The blocks a `hierui prune --save` of blockdrop removed, from its hierui-perturbation.json, when they
    account for the difference in layers; else None."""
    if directory is None:
        return None
    try:
        info = json.loads((directory / "hierui-perturbation.json").read_text(encoding="utf-8"))
        details = info.get("details") or {}
        dropped = details.get("dropped")
        made_by = find(str(info.get("spec", "")).partition(":")[0])  # the method that wrote it (engine.record.methods)
        if made_by is None or made_by.params.get("kind") != "block" or details.get("kind") != "block":
            return None
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(dropped, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in dropped):
        return None
    if len(set(dropped)) != len(dropped) or any(not 0 <= i < n_dense for i in dropped):
        return None
    return sorted(dropped) if n_dense - len(dropped) == n_ckpt else None


def structure_note(details: dict | None) -> str | None:
    """One line for the explorer and `hierui show` when a checkpoint's hidden states are compared only in part
    (details["structure"] of a checkpoint spec), else None."""
    structure = (details or {}).get("structure") if isinstance(details, dict) else None
    if not isinstance(structure, dict):
        return None
    compared = structure.get("hidden_metrics")
    if not isinstance(compared, str) or compared == "all layers":
        return None
    return f"structurally different checkpoint: hidden-state metrics {compared} (the others are not computed)"


def describe_structure(dense, ckpt, directory: Path | None, per_layer: bool = False) -> dict:
    """report.details["structure"]: what differs between the two models and what the pair compares."""
    hidden_map, compared = hidden_map_for(dense, ckpt, directory)
    out = {
        "layers": [dense.config.num_hidden_layers, ckpt.config.num_hidden_layers],
        "hidden_size": [dense.get_input_embeddings().weight.shape[1], ckpt.get_input_embeddings().weight.shape[1]],
        "hidden_metrics": compared,
        "hidden_map": hidden_map,
        "per_layer_shapes": per_layer,
    }
    rows_d, rows_c = layer_shapes(dense), layer_shapes(ckpt)
    for key in ("attention_heads", "kv_heads", "mlp_width"):
        d, c = _compact([r[key] for r in rows_d]), _compact([r[key] for r in rows_c])
        if d != c:
            out[key] = {"dense": d, "checkpoint": c}  # one value when uniform, else one per layer
    return out
