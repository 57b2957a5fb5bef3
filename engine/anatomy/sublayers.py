"""Where things are in a decoder-only causal LM: its decoder layers, its final norm, and in each layer the
attention, the MLP, and what each of them adds to the residual stream.

Detected from the module tree (transformers' own modeling code, no table of classes), with the names the
families hierui knows use:

- Llama, Mistral, Qwen2/3, Phi-3, Mixtral, Qwen2-MoE: layers `model.layers`, final norm `model.norm`,
  `self_attn` and `mlp`, whose outputs are added to the residual stream;
- Gemma 2/3, OLMo 2: the same, but what is added is the output of `post_attention_layernorm` (applied to
  the attention's output) and of `post_feedforward_layernorm` (to the MLP's);
- GPT-NeoX: `gpt_neox.layers`, `gpt_neox.final_layer_norm`, `attention` and `mlp`, parallel residual;
- OPT: `model.decoder.layers`, `model.decoder.final_layer_norm` (or `project_out` after it where the model
  has one), `self_attn`, and an MLP inline in the layer: `fc1` → `fc2`, whose output is added;
- GPT-2: `transformer.h`, `transformer.ln_f`, `attn` and `mlp`.

A layer is sequential (h_mid = h_in + a, h_out = h_mid + m) or, with `parallel`, reads h_in in both sublayers
(h_out = h_in + a + m). Gemma 2/3 and OLMo 2 normalise a sublayer's output before adding it: the norm that does
is the `*_norm_out` field, and its output is what that sublayer adds (note that in Llama-style layers a
module called `post_attention_layernorm` is the norm *before* the MLP: only a layer that also has a
`post_feedforward_layernorm` normalises outputs). `engine.perturb.drop` checks the decomposition on real
activations before scoring, so a family this description gets wrong fails loudly instead of scoring garbage.

Importing this module imports neither torch nor transformers.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.errors import HieruiError

ATTENTION_NAMES = ("self_attn", "attention", "attn")
MLP_NAMES = ("mlp", "feed_forward", "block_sparse_moe")
INLINE_MLP = ("fc1", "fc2")  # OPT: the MLP's two linears live in the decoder layer itself
FINAL_NAMES = ("norm", "final_layer_norm", "ln_f", "final_layernorm", "norm_f")
# pairs of norms that, when a layer has both, are applied to the attention's and the MLP's outputs
OUTPUT_NORMS = (
    ("post_attention_layernorm", "post_feedforward_layernorm"),  # Gemma 2/3, OLMo 2
    ("post_self_attn_layernorm", "post_mlp_layernorm"),  # GLM-4 (not in the zoo: untested)
)
# the output projection of each sublayer, by the last part of its name (a module, or an experts' 3-D parameter)
ATTENTION_OUT_NAMES = ("o_proj", "c_proj", "dense", "out_proj", "wo")
MLP_OUT_NAMES = ("down_proj", "c_proj", "dense_4h_to_h", "fc2", "w2")


@dataclass(frozen=True)
class Anatomy:
    """Paths (attribute names joined by '.') of a model's parts; `owner` and `final` from the model's root,
    the rest inside one decoder layer."""

    model_type: str
    owner: str  # the module holding the decoder layers ("" is the model itself)
    layers: str  # its attribute holding the ModuleList
    final: str | None  # the module whose output is the last hidden state (the final norm), None if none
    attention: str
    mlp: str | None  # the MLP module; None where the MLP is inline (`inline_mlp`)
    inline_mlp: tuple[str, str] | None  # (fc1, fc2) of a layer without an MLP module (OPT)
    attention_norm_out: str | None  # a norm applied to the attention's output before the residual add
    mlp_norm_out: str | None  # the same for the MLP
    parallel: bool  # both sublayers read the layer input: h_out = h_in + a + m
    norm_after_residual: bool = False  # post-LN (OPT-350m): the residual stream does not decompose

    # ---------------------------------------------------------- resolving in a model

    def layer_list(self, model):
        return getattr(get(model, self.owner), self.layers)

    def final_module(self, model):
        return get(model, self.final) if self.final else None

    # ---------------------------------------------------------- inside one layer

    def attention_out(self) -> str:
        """The module of a layer whose output (its first element) is what attention adds to the residual."""
        return self.attention_norm_out or self.attention

    def mlp_out(self) -> str:
        """The module whose output is what the MLP adds (OPT's fc2 gives it flattened to [tokens, hidden])."""
        return self.mlp_norm_out or self.mlp or self.inline_mlp[1]

    def output_parameters(self, layer, kind: str) -> list[str]:
        """Paths inside `layer` of the parameters of `kind`'s ('attention' or 'mlp') output projection(s):
        their weights and biases, an experts module's 3-D `down_proj`, Qwen2-MoE's shared expert's. Zeroing
        them all makes the sublayer add exactly nothing (a bias-free RMS output norm maps 0 to 0; a norm with
        a bias needs its bias zeroed too: `norm_bias`)."""
        if kind == "attention":
            root, names = self.attention, ATTENTION_OUT_NAMES
        elif self.mlp:
            root, names = self.mlp, MLP_OUT_NAMES
        else:
            return [f"{self.inline_mlp[1]}.{name}" for name, _ in get(layer, self.inline_mlp[1]).named_parameters()]
        found = []
        for name, _ in get(layer, root).named_parameters():
            parts = name.split(".")
            # 'o_proj.weight', 'c_proj.bias', 'experts.down_proj' (3-D), 'shared_expert.down_proj.weight'
            if parts[-1] in names or (len(parts) > 1 and parts[-2] in names):
                found.append(f"{root}.{name}")
        return found

    def norm_bias(self, layer, kind: str) -> str | None:
        """The bias of the output norm of `kind`, if it has one."""
        norm = self.attention_norm_out if kind == "attention" else self.mlp_norm_out
        if norm and getattr(get(layer, norm), "bias", None) is not None:
            return f"{norm}.bias"
        return None


def get(root, path: str | None):
    """`root.a.b` for the path 'a.b' ('' is root itself)."""
    obj = root
    for part in (path or "").split("."):
        if part:
            obj = getattr(obj, part)
    return obj


def _owner_of(model, layers) -> tuple[str, str] | None:
    for name, module in model.named_modules():
        for child_name, child in module.named_children():
            if child is layers:
                return name, child_name
    return None


def _first(obj, names) -> str | None:
    return next((n for n in names if getattr(obj, n, None) is not None), None)


def anatomy(model) -> Anatomy:
    """The anatomy of `model` (a transformers causal LM), or a HieruiError naming what was not found."""
    from engine.anatomy.linears import decoder_layers

    kind = type(model).__name__
    try:
        layers = decoder_layers(model)
    except ValueError:
        raise HieruiError(f"hierui does not know where {kind} keeps its decoder layers") from None
    where = _owner_of(model, layers)
    if where is None or len(layers) == 0:
        raise HieruiError(f"hierui does not know where {kind} keeps its decoder layers")
    owner_path, attr = where
    owner = get(model, owner_path)
    final_attr = "project_out" if getattr(owner, "project_out", None) is not None else _first(owner, FINAL_NAMES)
    layer = layers[0]
    attention = _first(layer, ATTENTION_NAMES)
    mlp = _first(layer, MLP_NAMES)
    inline = INLINE_MLP if mlp is None and all(getattr(layer, n, None) is not None for n in INLINE_MLP) else None
    if attention is None or (mlp is None and inline is None):
        raise HieruiError(f"hierui does not know the attention and MLP of {kind}'s decoder layers")
    norms = next((pair for pair in OUTPUT_NORMS if all(getattr(layer, n, None) is not None for n in pair)), None)
    config = getattr(model, "config", None)
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    return Anatomy(
        model_type=str(getattr(text, "model_type", "") or kind),
        owner=owner_path,
        layers=attr,
        final=(f"{owner_path}.{final_attr}" if owner_path else final_attr) if final_attr else None,
        attention=attention,
        mlp=mlp,
        inline_mlp=inline,
        attention_norm_out=norms[0] if norms else None,
        mlp_norm_out=norms[1] if norms else None,
        parallel=bool(getattr(layer, "use_parallel_residual", False) or getattr(layer, "parallel_attn", False)),
        norm_after_residual=getattr(layer, "do_layer_norm_before", True) is False,
    )


def find(model) -> Anatomy | None:
    """`anatomy(model)`, or None where it cannot be found."""
    try:
        return anatomy(model)
    except HieruiError:
        return None


def state_modules(model) -> tuple[list | None, object | None]:
    """The modules whose tensors are the hidden states ℓ = 0 … L (what output_hidden_states returns): the decoder
    layers the forward pass runs (the input of layer ℓ is state ℓ) and the module whose output is the final hidden
    state L (the final norm: model.norm, GPT-2's transformer.ln_f, OPT's decoder.final_layer_norm, NeoX's
    final_layer_norm), or (None, None) where not found. Hooks on them keep a few positions of each state without the
    model holding every layer's states for every position (engine.run.stepper, engine.kld.window)."""
    parts = find(model)
    final = parts.final_module(model) if parts is not None else None
    if final is None:
        return None, None
    layers = parts.layer_list(model)
    config = model.config.get_text_config(decoder=True)
    count = getattr(config, "num_hidden_layers", None)
    return list(layers)[: count if isinstance(count, int) else len(layers)], final


def logit_softcap(model) -> float | None:
    """The model's final logit soft-capping (Gemma: z = cap · tanh(z / cap)), or None where it has none: the one
    reading of it for every head applied by hand (engine.run.lens, engine.kld.window)."""
    config = model.config
    config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    cap = getattr(config, "final_logit_softcapping", None)
    return float(cap) if cap else None


def state_hooks(layers, final, on_state) -> list:
    """Hooks on the modules of state_modules that call `on_state(ℓ, h)` with each hidden state as the forward pass
    makes it, the whole tensor (batch, positions, H): ℓ = 0 … L−1 each decoder layer's input, L the final norm's
    output; the caller keeps what it needs of it (a few positions). The handles, to `remove()` after the pass."""

    def layer_input(index):
        def hook(_module, args, kwargs):
            on_state(index, args[0] if args else kwargs["hidden_states"])

        return hook

    def final_output(_module, _args, output):
        on_state(len(layers), output[0] if isinstance(output, tuple) else output)

    hooks = [layer.register_forward_pre_hook(layer_input(i), with_kwargs=True) for i, layer in enumerate(layers)]
    hooks.append(final.register_forward_hook(final_output))
    return hooks
