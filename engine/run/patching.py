"""The patching machinery of engine.run.attribution: the dense values of every unit at a context's last position,
and batched perturbed forwards with chosen sets of units patched in.

How it runs (both sides at the last position only, T the temperature):
  - dense: the context minus its last token through the dense model into a KV cache, then the last token
    with forward hooks that copy each unit's output (block input and output, sublayer outputs);
  - perturbed: the context minus its last token into the perturbed model's KV cache once; that cache is
    repeated to R rows and the last token run as one batched forward, row r patching its own set of units
    (forward hooks reading an (R, units) bool mask; the dense values broadcast). Rows are chunked so that the
    repeated cache and the logits stay under MEMORY_BOUND bytes. A context of one token needs no cache.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from engine.anatomy.sublayers import anatomy, get
from engine.errors import HieruiError

MEMORY_BOUND = 512 * 2**20  # bytes of repeated KV cache and logits per batched forward


@dataclass(frozen=True)
class Unit:
    name: str  # block.ℓ, attn.ℓ, mlp.ℓ
    kind: str  # "block" | "attn" | "mlp"
    layer: int  # the dense decoder layer ℓ


def _first(output):
    return output[0] if isinstance(output, (tuple, list)) else output


def _with_first(output, value):
    if isinstance(output, (tuple, list)):
        return type(output)((value, *output[1:])) if isinstance(output, tuple) else [value, *output[1:]]
    return value


def _last(x, rows: int):
    """The last position of each row of `x`: (rows, H) from (rows, T, H) or OPT's flattened (rows·T, H)."""
    return x.reshape(rows, -1, x.shape[-1])[:, -1, :]


def _replace_last(x, rows: int, new_last):
    y = x.reshape(rows, -1, x.shape[-1]).clone()
    y[:, -1, :] = new_last.to(y.dtype)
    return y.view(x.shape)


class Patcher:
    """The dense values of every unit at a context's last position, and batched patched perturbed forwards."""

    def __init__(self, pair, context_ids: list[int], temperature: float):
        import torch

        if not context_ids:
            raise HieruiError("attribution needs a context of at least one token")
        self.torch = torch
        self.pair = pair
        self.temperature = float(temperature)
        dense, perturbed = pair.dense, pair.perturbed
        self.parts = parts = anatomy(dense)
        cfg = dense.config.get_text_config(decoder=True)
        n = getattr(cfg, "num_hidden_layers", None)
        self.d_layers = list(parts.layer_list(dense))[: n if isinstance(n, int) else None]
        try:
            p_list = list(parts.layer_list(perturbed))
        except AttributeError:
            raise HieruiError("the perturbed model has no decoder layers where the dense one has them") from None
        self.layer_map = self._layer_map(len(self.d_layers), p_list)  # dense ℓ → perturbed index, None: dropped
        self.p_layers = p_list
        self.units, self.skipped, self.modules = self._units(p_list)
        self.device = dense.get_input_embeddings().weight.device
        self.ids = torch.tensor([context_ids], dtype=torch.long, device=self.device)
        self._dense_values()
        self._prefix_perturbed()

    # ---------------------------------------------------------- units

    def _layer_map(self, n_dense: int, p_layers) -> list[int | None]:
        if len(p_layers) == n_dense:
            return list(range(n_dense))
        details = (self.pair.report.details if self.pair.report is not None else None) or {}
        if details.get("kind") == "block" and "dropped" in details:
            dropped, k, out = set(details["dropped"]), 0, []
            for i in range(n_dense):
                out.append(None if i in dropped else k)
                k += i not in dropped
            if k == len(p_layers):
                return out
        raise HieruiError(
            f"the perturbed model has {len(p_layers)} decoder layers and the dense one {n_dense}: "
            f"hierui cannot tell which layers correspond, so it cannot attribute"
        )

    def _units(self, p_layers):
        """(units, skipped unit names, {unit index: (dense module, perturbed module or None)})."""
        parts = self.parts
        units, skipped, modules = [], [], {}
        sublayers = not parts.norm_after_residual
        for i, d_layer in enumerate(self.d_layers):
            k = self.layer_map[i]
            if sublayers:
                for kind, path in (("attn", parts.attention_out()), ("mlp", parts.mlp_out())):
                    name = f"{kind}.{i}"
                    p_module = None
                    if k is not None:
                        try:
                            p_module = get(p_layers[k], path)
                        except AttributeError:
                            p_module = None
                    if p_module is None:
                        skipped.append(name)
                        continue
                    modules[len(units)] = (get(d_layer, path), p_module)
                    units.append(Unit(name, kind, i))
            modules[len(units)] = (d_layer, p_layers[k] if k is not None else None)
            units.append(Unit(f"block.{i}", "block", i))
        return units, skipped, modules

    # ---------------------------------------------------------- the two sides

    def _new_cache(self, model):
        from transformers import DynamicCache

        return DynamicCache(config=model.config)

    def _prefix(self, model):
        """A KV cache of the context minus its last token (None for a one-token context)."""
        if self.ids.shape[1] == 1:
            return None
        cache = self._new_cache(model)
        with self.torch.no_grad():
            model(input_ids=self.ids[:, :-1], cache=cache, use_cache=True, logits_to_keep=1)
        return cache

    def _dense_values(self) -> None:
        torch = self.torch
        model = self.pair.dense
        cache = self._prefix(model)
        got: dict = {}
        hooks = []
        for u, unit in enumerate(self.units):
            d_module = self.modules[u][0]
            if unit.kind == "block":

                def pre(_m, args, kwargs, u=u):
                    got[("in", u)] = _last(args[0] if args else kwargs["hidden_states"], 1)[0].clone()

                hooks.append(d_module.register_forward_pre_hook(pre, with_kwargs=True))

            def post(_m, _args, output, u=u):
                got[("out", u)] = _last(_first(output), 1)[0].clone()

            hooks.append(d_module.register_forward_hook(post))
        try:
            with torch.no_grad():
                out = model(
                    input_ids=self.ids[:, -1:],
                    cache=cache if cache is not None else self._new_cache(model),
                    use_cache=True,
                    logits_to_keep=1,
                )
        finally:
            for h in hooks:
                h.remove()
        self.logits_d = out.logits[:, -1, :]
        # per unit what is put in: a sublayer's output, a block's increment out_d − in_d
        # a block's input as the model passed it is still on the previous layer's device (several GPUs)
        self.values = [
            got[("out", u)] - got[("in", u)].to(got[("out", u)].device) if unit.kind == "block" else got[("out", u)]
            for u, unit in enumerate(self.units)
        ]
        self.logp_d = self._logp(self.logits_d)
        self.top1_d = int(self.logits_d.argmax(-1))

    def _logp(self, z):
        z = z.to(self.torch.promote_types(z.dtype, self.torch.float32))
        return self.torch.log_softmax(z / self.temperature, dim=-1)

    def _prefix_perturbed(self) -> None:
        self.cache_p = self._prefix(self.pair.perturbed)
        per_row = 0
        if self.cache_p is not None:
            for layer in getattr(self.cache_p, "layers", []):
                for name in ("keys", "values"):
                    t = getattr(layer, name, None)
                    if t is not None and hasattr(t, "nbytes"):
                        per_row += t.nbytes * (1 + 1 / max(1, self.ids.shape[1] - 1))  # and the new token
        vocab = self.logits_d.shape[-1]
        per_row += vocab * 4 * 3  # logits and their log-softmax in float32
        self.rows_per_chunk = max(1, int(MEMORY_BOUND // max(1, per_row)))

    # ---------------------------------------------------------- patched forwards

    def _hooks(self, mask):
        """Register the patching hooks for a forward of mask.shape[0] rows; returns the handles."""
        torch = self.torch
        rows = mask.shape[0]
        handles = []
        block_of: dict[int, int] = {}  # perturbed layer index → its block unit
        dropped_after: dict[int, list[int]] = {}  # perturbed layer index → dropped block units right after it
        dropped_before: list[int] = []  # dropped block units before the first kept layer
        last_kept = None
        for u, unit in enumerate(self.units):
            if unit.kind != "block":
                continue
            k = self.layer_map[unit.layer]
            if k is not None:
                block_of[k] = u
                last_kept = k
            elif last_kept is None:
                dropped_before.append(u)
            else:
                dropped_after.setdefault(last_kept, []).append(u)
        # each value stays where its unit ran; every hook brings what it uses to the tensor it patches (on
        # several GPUs a layer's, which the dense and perturbed models hold on the same device)
        values = self.values

        def sel(u, like):
            return mask[:, u].view(rows, 1).to(like.device)

        def value(u, like):
            return values[u].to(device=like.device, dtype=like.dtype)

        def add_dropped(h_last, units):
            for u in units:
                h_last = h_last + sel(u, h_last).to(h_last.dtype) * value(u, h_last)
            return h_last

        for u, unit in enumerate(self.units):
            if unit.kind == "block" or not bool(mask[:, u].any()):
                continue

            def patch(_m, _args, output, u=u):
                x = _first(output)
                new = torch.where(sel(u, x), value(u, x), _last(x, rows))
                return _with_first(output, _replace_last(x, rows, new))

            handles.append(self.modules[u][1].register_forward_hook(patch))
        inputs: dict[int, object] = {}
        first_kept = min(block_of) if block_of else None
        for k, layer in enumerate(self.p_layers):
            own = block_of.get(k)
            after = dropped_after.get(k, [])
            before = dropped_before if k == first_kept else []
            if own is None and not after and not before:
                continue

            def pre(_m, args, kwargs, k=k, before=before):
                h = args[0] if args else kwargs["hidden_states"]
                if before and bool(mask[:, before].any()):
                    h = _replace_last(h, rows, add_dropped(_last(h, rows), before))
                    if args:
                        args = (h, *args[1:])
                    else:
                        kwargs = {**kwargs, "hidden_states": h}
                inputs[k] = _last(h, rows)
                return args, kwargs

            def post(_m, _args, output, k=k, own=own, after=after):
                x = _first(output)
                last = _last(x, rows)
                if own is not None:
                    last = torch.where(sel(own, x), inputs[k].to(x.device) + value(own, x), last)
                last = add_dropped(last, after)
                return _with_first(output, _replace_last(x, rows, last))

            handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(layer.register_forward_hook(post))
        return handles

    def run(self, sets: list[list[int]]):
        """For each set of unit indices, the perturbed logits' KL from the dense at T and the argmax; as two
        host lists. Rows in chunks of `rows_per_chunk`, one batched forward each."""
        torch = self.torch
        kls, tops = [], []
        model = self.pair.perturbed
        for start in range(0, len(sets), self.rows_per_chunk):
            chunk = sets[start : start + self.rows_per_chunk]
            rows = len(chunk)
            mask = torch.zeros((rows, len(self.units)), dtype=torch.bool, device=self.device)
            for r, units in enumerate(chunk):
                if units:
                    mask[r, list(units)] = True
            if self.cache_p is not None:
                cache = copy.deepcopy(self.cache_p)
                if rows > 1:
                    cache.batch_repeat_interleave(rows)
            else:
                cache = self._new_cache(model)
            handles = self._hooks(mask)
            try:
                with torch.no_grad():
                    out = model(
                        input_ids=self.ids[:, -1:].expand(rows, 1),
                        cache=cache,
                        use_cache=True,
                        logits_to_keep=1,
                    )
            finally:
                for h in handles:
                    h.remove()
            z = out.logits[:, -1, :]
            logp = self._logp(z)
            kl = (self.logp_d.exp() * (self.logp_d - logp.to(self.logp_d.device))).sum(-1)
            kls += kl.tolist()
            tops += z.argmax(-1).tolist()
            del cache, out
        return kls, tops

    def logits(self, sets: list[list[int]]):
        """The perturbed logits (rows, V) of each set (tests: compare with the dense ones)."""
        captured = []
        original = self._logp

        def keep(z):
            captured.append(z)
            return original(z)

        self._logp = keep
        try:
            self.run(sets)
        finally:
            self._logp = original
        return self.torch.cat(captured, dim=0)
