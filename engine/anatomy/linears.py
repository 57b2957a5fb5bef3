"""Finding the decoder layers and their prunable weight matrices in a causal LM, and measuring their sparsity.

A prunable weight matrix is seen through one abstraction, `WeightView`: the matrix as [out, in], whatever
the model stores. Three storages exist in the families hierui prunes:

- `nn.Linear` (Llama, Mistral, Qwen, Gemma, Phi-3, OLMo 2, GPT-NeoX, OPT, ...): weight [out, in];
- GPT-2's `Conv1D`: weight stored transposed, [in, out] (attributes nf = out, nx = in); the view transposes;
- mixture-of-experts modules of transformers 5 (MixtralExperts, Qwen2MoeExperts, ...): one module per layer
  holding 3-D parameters `gate_up_proj` [E, 2I, H] and `down_proj` [E, H, I] ([E, in, out] where the class
  says `is_transposed`); each expert's slice is a view of its own (name 'mlp.experts.gate_up_proj[3]').

Fused projections (Phi-3 `qkv_proj` and `gate_up_proj`, GPT-NeoX `query_key_value`, GPT-2 `c_attn`) are one
matrix each, as stored. Routers are never pruned, nor counted: an MoE router (`mlp.gate`, a TopKRouter, or
any linear whose parent module holds the `experts`, such as Qwen2-MoE's `shared_expert_gate`) is tiny, and
its top-k choice is very sensitive to its weights. Embeddings, norms, biases and the LM head are never touched.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field


def decoder_layers(model):
    """The ModuleList of decoder blocks (model.model.layers on Llama-family models)."""
    for path in ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers"):
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if obj is not None:
            return obj
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__}")


def decoder_layers_prefix(model) -> str:
    """The module-name prefix of `model`'s decoder layers ('model.layers.'), as state dicts and device maps
    name them."""
    layers = decoder_layers(model)
    return next(name for name, module in model.named_modules() if module is layers) + "."


def is_linear(module) -> bool:
    """nn.Linear or anything shaped like one (weight [out, in] with in/out_features): bitsandbytes'
    Linear8bitLt / Linear4bit subclass nn.Linear. GPT-2's Conv1D is not one (see `is_conv1d`)."""
    import torch.nn as nn

    if isinstance(module, nn.Linear):
        return True
    return hasattr(module, "in_features") and hasattr(module, "out_features") and hasattr(module, "weight")


def is_conv1d(module) -> bool:
    """GPT-2's transformers.pytorch_utils.Conv1D: a linear whose weight is stored transposed, [in=nx, out=nf]."""
    w = getattr(module, "weight", None)
    nf, nx = getattr(module, "nf", None), getattr(module, "nx", None)
    return isinstance(nf, int) and isinstance(nx, int) and w is not None and w.dim() == 2 and tuple(w.shape) == (nx, nf)


def is_experts(module) -> bool:
    """A transformers-5 experts module: `num_experts` experts stored as 3-D parameters, one module per layer."""
    count = getattr(module, "num_experts", None)
    return isinstance(count, int) and bool(_expert_parameters(module))


def _expert_parameters(module) -> list[str]:
    count = getattr(module, "num_experts", None)
    return [
        name
        for name, p in module.named_parameters(recurse=False)
        if p.dim() == 3 and p.shape[0] == count and not name.endswith("_bias")
    ]


def _is_router(name: str, module, modules: dict) -> bool:
    """Routers are never pruned: a module called *Router, or a linear directly inside an MoE block (the
    module that also holds `experts`), such as Mixtral's `gate` or Qwen2-MoE's `shared_expert_gate`."""
    if type(module).__name__.endswith("Router"):
        return True
    parent = modules.get(name.rpartition(".")[0])
    return parent is not None and hasattr(parent, "experts") and parent.experts is not module


def layer_linears(layer) -> OrderedDict[str, object]:
    """nn.Linear-like modules of one decoder layer, keyed by their path inside it (e.g. 'self_attn.q_proj').

    Routers are left out. GPT-2's Conv1D and the 3-D expert tensors are not linears in this sense (no
    in_features, not a [out, in] weight): `weight_views` covers them.
    """
    modules = dict(layer.named_modules())
    found = OrderedDict()
    for name, module in modules.items():
        if name and is_linear(module) and not _is_router(name, module, modules):
            found[name] = module
    return found


def linear_type(name: str) -> str:
    """'self_attn.q_proj' -> 'q_proj'; 'mlp.experts.down_proj[3]' -> 'down_proj'."""
    return name.rsplit(".", 1)[-1].split("[", 1)[0]


# ------------------------------------------------------------------ weight views


class _StackedParameter:
    """The 3-D expert parameter behind a layer's expert views: the first `assign` of any of its experts
    replaces the module's Parameter by one new copy (the old tensor is the dense model's, never written);
    later assigns write their expert's slice into that copy, which only the perturbed model holds."""

    def __init__(self, module, attr: str):
        self.module = module
        self.attr = attr
        self.owned = None

    def write(self, expert: int, stored) -> None:
        import torch
        import torch.nn as nn

        current = getattr(self.module, self.attr)
        if self.owned is None or current is not self.owned:
            self.owned = nn.Parameter(current.detach().clone(), requires_grad=False)
            setattr(self.module, self.attr, self.owned)
        with torch.no_grad():
            self.owned.data[expert] = stored.to(device=self.owned.device, dtype=self.owned.dtype)


@dataclass(eq=False)
class WeightView:
    """One prunable weight matrix of a decoder layer, seen as [out, in] whatever its storage.

    `layer`: the decoder layer's index; `name`: its path inside the layer ('self_attn.q_proj', 'attn.c_attn',
    'mlp.experts.gate_up_proj[3]'); `type`: the linear type, the last attribute ('q_proj', 'c_attn',
    'gate_up_proj'), or the last two where the last alone is ambiguous in the layer ('attn.c_proj' and
    'mlp.c_proj' on GPT-2; 'experts.down_proj' and 'shared_expert.down_proj' on Qwen2-MoE); `expert`: the
    expert index for a slice of a 3-D expert tensor, else None; `module` / `attr`: where the tensor lives
    (`module.attr`); `transposed`: the tensor is stored [in, out] (GPT-2's Conv1D, transposed experts).
    """

    layer: int | None
    name: str
    type: str
    expert: int | None
    module: object = field(repr=False)
    attr: str = "weight"
    transposed: bool = False
    _stack: _StackedParameter | None = field(default=None, repr=False)

    @property
    def parameter(self):
        """The stored tensor (for an expert, the whole 3-D parameter)."""
        return getattr(self.module, self.attr)

    def matrix(self):
        """The weight as [out, in]: a view of the stored tensor (transposed for Conv1D), never a copy."""
        p = self.parameter
        m = p[self.expert] if self.expert is not None else p
        return m.t() if self.transposed else m

    @property
    def in_features(self) -> int:
        return int(self.matrix().shape[1])

    @property
    def out_features(self) -> int:
        return int(self.matrix().shape[0])

    @property
    def kind(self) -> str:
        """'linear', 'conv1d' or 'expert'."""
        return "expert" if self.expert is not None else ("conv1d" if self.transposed else "linear")

    def assign(self, new_out_in) -> None:
        """Give the matrix new values ([out, in]) as a NEW tensor: the old one may be the dense model's.

        Linear: a new weight Parameter; Conv1D: a new Parameter holding the transpose; expert: the layer's 3-D
        parameter is replaced by one copy at the first assign of any of its experts, later ones write their
        slice of that copy (see _StackedParameter).
        """
        import torch.nn as nn

        if tuple(new_out_in.shape) != (self.out_features, self.in_features):
            raise ValueError(
                f"{self.name}: new weight of shape {tuple(new_out_in.shape)}, expected "
                f"{(self.out_features, self.in_features)}"
            )
        stored = new_out_in.t() if self.transposed else new_out_in
        if self.expert is not None:
            self._stack.write(self.expert, stored)
            return
        old = self.parameter
        setattr(
            self.module,
            self.attr,
            nn.Parameter(stored.to(device=old.device, dtype=old.dtype).contiguous(), requires_grad=False),
        )


def weight_views(layer, index: int | None = None) -> list[WeightView]:
    """The prunable weight matrices of one decoder layer (`index`: its position, recorded in each view).

    nn.Linear-like modules (routers excepted), GPT-2 Conv1Ds, and each expert's slice of each 3-D expert
    parameter, in module order. Only floating-point weights are views: a quantized linear (int8 / nf4) has no
    float matrix to prune or count.
    """
    import torch

    modules = dict(layer.named_modules())
    views: list[WeightView] = []
    for name, module in modules.items():
        if not name:
            continue
        if is_experts(module):
            transposed = bool(getattr(module, "is_transposed", False))
            for attr in _expert_parameters(module):
                if not torch.is_floating_point(getattr(module, attr)):
                    continue
                stack = _StackedParameter(module, attr)
                for e in range(module.num_experts):
                    views.append(WeightView(index, f"{name}.{attr}[{e}]", attr, e, module, attr, transposed, stack))
            continue
        conv = is_conv1d(module)
        if not conv and not (is_linear(module) and not _is_router(name, module, modules)):
            continue
        w = getattr(module, "weight", None)
        if w is None or w.dim() != 2 or not torch.is_floating_point(w):
            continue
        views.append(WeightView(index, name, linear_type(name), None, module, "weight", conv))
    _qualify_types(views)
    return views


def _qualify_types(views: list[WeightView]) -> None:
    """Where one type name belongs to matrices at different paths of a layer (GPT-2's attn.c_proj and
    mlp.c_proj; Qwen2-MoE's experts.down_proj and shared_expert.down_proj), qualify it with the parent's name,
    so that by-type tables do not merge different roles."""
    paths: dict[str, set] = {}
    for v in views:
        paths.setdefault(v.type, set()).add(v.name.split("[", 1)[0])
    for v in views:
        if len(paths[v.type]) > 1:
            parts = v.name.split("[", 1)[0].split(".")
            v.type = ".".join(parts[-2:])


def model_weight_views(model) -> list[WeightView]:
    """`weight_views` of every decoder layer of `model`, layer after layer."""
    views: list[WeightView] = []
    for index, layer in enumerate(decoder_layers(model)):
        views.extend(weight_views(layer, index))
    return views
