"""What the estimate needs of a model, read from its config alone: the model built on torch's `meta` device.

The meta build (shapes, no memory, no weights) gives every parameter's exact shape for any family (tied
embeddings, GQA, fused projections, experts), and `engine.anatomy.linears.weight_views` of that meta model says
which matrices a perturbation replaces. A `random:` shape gets the tokenizer's vocabulary, as
engine.models.random_shapes builds it.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.errors import HieruiError, one_line


@dataclass(frozen=True)
class Geometry:
    """What the estimate needs of a model, from its meta-device build: byte counts in its dtype."""

    name: str
    dtype: str
    itemsize: int
    weight_bytes: int  # every parameter and buffer once
    params: int
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    intermediate: int  # the widest decoder linear's input (the MLP's down projection on most families)
    layer_bytes: int  # the largest decoder layer's parameters
    outside_bytes: int  # embeddings, final norm, head: what is not in a decoder layer
    matrices: tuple  # per WeightView of the largest layer: (out, in, expert)
    changed: int  # weights replaced by pruning over all layers (3-D expert parameters once)
    changed_plain: int  # of which in plain 2-D matrices (linears, Conv1Ds)
    changed_experts: int  # of which in 3-D expert parameters
    context: int | None


def config_object(name: str, fetch: bool = False):
    """The transformers config of a --model name, without weights (None where it is not known before loading;
    `fetch`: a hub model's config is fetched, without its weights, when it is not in the local hub cache)."""
    from engine.models.configs import config_from_file, read_config
    from engine.models.hub import fetch_light
    from engine.models.names import resolve

    ref = resolve(name)
    if ref.kind == "tiny":
        from engine.models.tiny import tiny_config

        return tiny_config()
    if ref.kind == "zoo":
        from engine.models.zoo import check_family

        return check_family(ref.source).config()
    if ref.kind == "random":
        from engine.models.random_shapes import parse_random, random_tokenizer, transformers_config

        return transformers_config(parse_random(ref.name), random_tokenizer())
    config = read_config(name)
    if config is None and ref.kind == "hub" and fetch:
        light = fetch_light(name)
        config = config_from_file(light / "config.json") if light is not None else None
    if config is None:
        return None
    from transformers import AutoConfig

    values = {k: v for k, v in config.items() if not k.startswith("_") and k not in _NOT_CONFIG}
    model_type = values.pop("model_type", None)
    if not isinstance(model_type, str):
        raise HieruiError(f"the config of {name} has no model_type: it is not a transformers config.json")
    from engine.models.configs import check_model_type

    check_model_type(model_type, name)  # one short line, not transformers' list of every type
    try:
        return AutoConfig.for_model(model_type, **values)
    except Exception as e:
        raise HieruiError(f"cannot read the config of {name}: {one_line(e)}") from None


_NOT_CONFIG = ("auto_map", "quantization_config", "dtype", "torch_dtype", "transformers_version", "text_config")


def meta_model(name: str, config, dtype):
    """The model of `config` built on torch's meta device: every tensor's shape, no memory."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, dtype=dtype)
    except Exception as e:  # a value the model class refuses
        raise HieruiError(f"cannot build the shape of {name}: {one_line(e)}") from None


def geometry(name: str, dtype, fetch: bool = False) -> Geometry | None:
    """The Geometry of `name` in `dtype` (a torch dtype), built on the meta device; None when the config is
    not known before loading (`fetch`: see config_object)."""
    import torch

    from engine.anatomy.linears import decoder_layers, weight_views

    config = config_object(name, fetch)
    if config is None:
        return None
    model = meta_model(name, config, dtype)
    tensors = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    weight_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    layers = list(decoder_layers(model))
    inside: set[int] = set()
    layer_bytes, largest, changed_plain, changed_experts = 0, (), 0, 0
    for index, layer in enumerate(layers):
        own = {id(p): p for p in layer.parameters()}
        inside |= set(own)
        size = sum(p.numel() * p.element_size() for p in own.values())
        views = weight_views(layer, index)
        stacks = {id(v.parameter): v.parameter for v in views if v.expert is not None}
        changed_plain += sum(v.out_features * v.in_features for v in views if v.expert is None)
        changed_experts += sum(p.numel() for p in stacks.values())
        if size >= layer_bytes:
            layer_bytes = size
            largest = tuple((v.out_features, v.in_features, v.expert is not None) for v in views)
    outside = sum(t.numel() * t.element_size() for i, t in tensors.items() if i not in inside)
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    hidden = int(getattr(text, "hidden_size", 0) or getattr(text, "n_embd", 0) or 0)
    heads = int(getattr(text, "num_attention_heads", 0) or getattr(text, "n_head", 0) or 1)
    kv_heads = int(getattr(text, "num_key_value_heads", 0) or heads)
    head_dim = int(getattr(text, "head_dim", 0) or (hidden // heads if heads else 0))
    head = model.get_output_embeddings()
    vocab = int(head.weight.shape[0]) if head is not None else int(getattr(text, "vocab_size", 0) or 0)
    widest = max((m[1] for m in largest), default=hidden)
    context = getattr(text, "max_position_embeddings", None)
    return Geometry(
        name=name,
        dtype=str(dtype).removeprefix("torch."),
        itemsize=torch.empty((), dtype=dtype).element_size(),
        weight_bytes=weight_bytes,
        params=params,
        layers=len(layers),
        hidden=hidden,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        vocab=vocab,
        intermediate=widest,
        layer_bytes=layer_bytes,
        outside_bytes=outside,
        matrices=largest,
        changed=changed_plain + changed_experts,
        changed_plain=changed_plain,
        changed_experts=changed_experts,
        context=context if isinstance(context, int) else None,
    )
