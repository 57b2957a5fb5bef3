"""Attribution by patching: which units' damage flips the perturbed model's token at one generation step.

At a step, the perturbed model's forward over the last position is rerun with the dense model's output of one
*unit* restored, for each unit (shared/design.md, "Where it breaks"). Units, ℓ = 0..L−1 the dense decoder layer:

    attn.ℓ    what layer ℓ's attention adds to the residual stream (engine.anatomy.sublayers: Anatomy.attention_out,
              Gemma 2/3 and OLMo 2 after their output norm), replaced at the last position by the dense one's
    mlp.ℓ     the same for the MLP (OPT: fc2's output, flattened [tokens, hidden])
    block.ℓ   the whole layer's increment: out′ = in_p + (out_d − in_d) at the last position

Patching every block, or every attn and mlp unit, gives the dense final residual, hence the dense logits (to
float tolerance): the earlier positions' keys and values stay the perturbed model's, but nothing at the last
position reads them except through the patched outputs. A unit missing in the perturbed model is skipped: the
attention and MLP of a blockdrop'd layer (the layer is gone); its block unit is kept, and patching it adds the
dense increment to the residual stream where the layer was. A dropped attention or MLP (attndrop/mlpdrop) is a
stand-in module that adds zeros: its unit exists, and patching it restores what was dropped. Post-LN models
(Anatomy.norm_after_residual, OPT-350m) normalise after the residual add, so a sublayer's output is no additive
contribution: they get block units only (the block increment still telescopes to the dense output).

How it runs (both sides at the last position only, T the temperature):
  - dense: the context minus its last token through the dense model into a KV cache, then the last token
    with forward hooks that copy each unit's output (block input and output, sublayer outputs);
  - perturbed: the context minus its last token into the perturbed model's KV cache once; that cache is
    repeated to R rows and the last token run as one batched forward, row r patching its own set of units
    (forward hooks reading an (R, units) bool mask; the dense values broadcast). Rows are chunked so that the
    repeated cache and the logits stay under MEMORY_BOUND bytes. A context of one token needs no cache.

Per unit: `kl_patched` = KL(P_d ‖ P_p′) at T, `restored_kl` = (kl − kl_patched)/kl (the fraction of the step's KL
removed; None where kl is 0), `restores_top1` (the patched argmax is the dense top-1), and `rank` (1 = removes the
most KL) among the sublayer units (attn and mlp ranked together) or among the block units.

The greedy smallest set is over the sublayer units (with the block units of layers whose sublayers the perturbed
model lacks, blockdrop; over the block units for post-LN models): each round is one batched forward of S ∪ {u} for
every remaining u; it stops at the first round where a row restores the dense top-1 (taking that row with the
lowest KL), else adds the unit with the lowest KL. Where the top-1 already agrees there is nothing to restore: the
set is empty and `minimal_restores` true.

Which steps can be attributed: the perturbed model's context is used for both models, so only steps whose two
contexts are identical have a meaning here (`flip_steps`): every step in shared mode; in free mode the steps up to
the first divergence, since after it the two models were fed different tokens.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from engine.anatomy.sublayers import anatomy, get
from engine.errors import HieruiError

KINDS = ("attn", "mlp", "block")
MEMORY_BOUND = 512 * 2**20  # bytes of repeated KV cache and logits per batched forward


@dataclass(frozen=True)
class Unit:
    name: str  # block.ℓ, attn.ℓ, mlp.ℓ
    kind: str  # "block" | "attn" | "mlp"
    layer: int  # the dense decoder layer ℓ


@dataclass
class UnitResult:
    unit: str
    kind: str
    layer: int
    kl_patched: float
    restored_kl: float | None  # (kl − kl_patched) / kl; None where kl == 0
    restores_top1: bool
    rank: int = 0  # 1 = removes the most KL, among the sublayers (attn and mlp together) or among the blocks


@dataclass
class Attribution:
    """The attribution of one step: the unpatched KL and top-1s, one result per unit, the greedy smallest set."""

    kl: float  # KL(P_d ‖ P_p) at T, unpatched
    top1_d: int
    top1_p: int
    temperature: float
    units: list[UnitResult]
    minimal_set: list[str] | None  # greedy, in the order added; None when not computed
    minimal_restores: bool | None  # whether that set restores the dense top-1
    skipped: list[str] = field(default_factory=list)  # units the perturbed model lacks
    seconds: float = 0.0

    def ranked(self, kind: str | None = None) -> list[UnitResult]:
        """Units by KL removed, most first: of one kind ("attn", "mlp", "block"), "sublayer" (attn and mlp
        together), or None: the sublayers, then the blocks."""

        def order(units):
            return sorted(units, key=lambda u: (u.kl_patched, u.layer, u.kind))

        if kind is None:
            return self.ranked("sublayer") + self.ranked("block")
        if kind == "sublayer":
            return order([u for u in self.units if u.kind in ("attn", "mlp")])
        if kind not in KINDS:
            raise ValueError(f"unknown unit kind {kind!r}")
        return order([u for u in self.units if u.kind == kind])

    def rows(self, step: int | None = None) -> list[dict]:
        """One row per unit (engine.record.schema.ATTRIBUTION_FIELDS; with `step`, the step first)."""
        chosen = set(self.minimal_set or [])
        out = []
        for u in self.units:
            row = {} if step is None else {"step": step}
            row.update(
                unit=u.unit,
                kind=u.kind,
                layer=u.layer,
                kl=self.kl,
                kl_patched=u.kl_patched,
                restored_kl=u.restored_kl,
                restores_top1=u.restores_top1,
                rank=u.rank,
                in_minimal_set=(u.unit in chosen) if self.minimal_set is not None else None,
                top1_d=self.top1_d,
                top1_p=self.top1_p,
                minimal_restores=self.minimal_restores,
            )
            out.append(row)
        return out


# ------------------------------------------------------------------ the steps of a session


def context_at(session_header: dict, steps: list[dict], step: int) -> list[int]:
    """The perturbed model's context at `step`: the prompt ids and the tokens it was fed before that step."""
    ids = session_header.get("prompt_ids")
    if not isinstance(ids, list) or not ids:
        raise HieruiError("the session's header has no prompt_ids: it cannot be attributed")
    if not 0 <= step < len(steps):
        raise HieruiError(f"no step {step}: the session has steps 0..{len(steps) - 1}")
    fed = [record["fed"][1] for record in steps[:step]]
    if any(t is None for t in fed):
        raise HieruiError(f"step {step} comes after the perturbed model's end of sequence")
    return [int(t) for t in ids] + [int(t) for t in fed]


def same_context(steps: list[dict], step: int) -> bool:
    """Whether both models had the same context at `step` (every token fed before it the same)."""
    return all(record["fed"][0] == record["fed"][1] for record in steps[:step])


def flip_steps(steps: list[dict], mode: str = "shared") -> list[int]:
    """The steps whose top-1 differs and whose two contexts are identical: every such step in shared mode; in
    free mode only up to the first divergence (that step itself, under greedy decoding), because after it the
    models were fed different tokens and patching one into the other compares different contexts. `mode` is
    checked through the fed tokens themselves, so a sampled free run is handled the same way."""
    out = []
    for record in steps:
        i = record["step"]
        if record.get("top1_agree") is None or bool(record["top1_agree"]):
            continue
        if mode == "shared" or same_context(steps, i):
            out.append(i)
        else:
            break  # free mode: the contexts never agree again
    return out


# ------------------------------------------------------------------ the patching machinery


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


class _Patcher:
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


# ------------------------------------------------------------------ attribution


def attribute(pair, context_ids: list[int], temperature: float = 1.0, greedy: bool = True) -> Attribution:
    """Attribute the perturbed model's divergence at the step whose context (the perturbed model's: prompt ids
    and the tokens fed before the step) is `context_ids`: one patched rerun of the last position per unit, in
    batched forwards, and with `greedy` the smallest set of sublayer units that restores the dense top-1."""
    started = time.perf_counter()
    patcher = _Patcher(pair, list(context_ids), temperature)
    units = patcher.units
    sets = [[]] + [[u] for u in range(len(units))]
    kls, tops = patcher.run(sets)
    kl, top1_p = max(0.0, kls[0]), tops[0]
    results = []
    for u, unit in enumerate(units):
        k = max(0.0, kls[u + 1])
        results.append(
            UnitResult(
                unit=unit.name,
                kind=unit.kind,
                layer=unit.layer,
                kl_patched=k,
                restored_kl=(kl - k) / kl if kl > 0 else None,
                restores_top1=tops[u + 1] == patcher.top1_d,
            )
        )
    for group in (("attn", "mlp"), ("block",)):  # the sublayers ranked together, the blocks apart
        ordered = sorted((r for r in results if r.kind in group), key=lambda r: (r.kl_patched, r.layer, r.kind))
        for rank, r in enumerate(ordered, start=1):
            r.rank = rank
    minimal, restores = None, None
    if greedy:
        minimal, restores = _greedy(patcher, kls[1:], tops[1:], top1_p)
    return Attribution(
        kl=kl,
        top1_d=patcher.top1_d,
        top1_p=top1_p,
        temperature=float(temperature),
        units=results,
        minimal_set=minimal,
        minimal_restores=restores,
        skipped=patcher.skipped,
        seconds=time.perf_counter() - started,
    )


def _greedy(patcher: _Patcher, single_kl: list[float], single_top: list[int], top1_p: int):
    """The greedy smallest set of sublayer units restoring the dense top-1; a layer without sublayers in the
    perturbed model (blockdrop) takes part through its block unit, and a post-LN model through its blocks."""
    units = patcher.units
    if top1_p == patcher.top1_d:
        return [], True  # nothing to restore
    gone = {int(name.split(".")[1]) for name in patcher.skipped}  # layers whose sublayers the perturbed model lacks
    pool = [u for u, unit in enumerate(units) if unit.kind != "block" or unit.layer in gone]
    pool = pool or list(range(len(units)))  # post-LN: block units only
    chosen: list[int] = []
    kls, tops = [single_kl[u] for u in pool], [single_top[u] for u in pool]  # round 1: the single units
    candidates = list(pool)
    while candidates:
        restoring = [i for i, t in enumerate(tops) if t == patcher.top1_d]
        pick = min(restoring or range(len(candidates)), key=lambda i: kls[i])
        chosen.append(candidates.pop(pick))
        if restoring:
            return [units[u].name for u in chosen], True
        if not candidates:
            break
        kls, tops = patcher.run([chosen + [u] for u in candidates])
    return [units[u].name for u in chosen], False


# ------------------------------------------------------------------ in a sweep


def attribution_path(out: str | Path, run) -> Path:
    """OUT/attribution/<run_id>.jsonl: written whole once a run's attribution is complete."""
    return Path(out) / "attribution" / f"{run.run_id}.jsonl"


def attribution_complete(out: str | Path, run) -> bool:
    return attribution_path(out, run).is_file()


def attribute_run(pair, session, run, out: str | Path, temperature: float, hooks=None) -> list[dict]:
    """Attribute every flip step of a recorded run (engine.sweep.sweeps.Run) and write its rows
    (engine.record.schema.ATTRIBUTION) to attribution_path; returns them."""
    from engine.record.paths import atomic_write

    header, steps = session.header, session.steps
    todo = flip_steps(steps, header.get("mode") or run.mode)
    ident = {"run_id": run.run_id, "spec": str(run.spec), "mode": run.mode, "prompt_id": run.prompt.id}
    rows = []
    for n, step in enumerate(todo):
        if hooks is not None:
            hooks.stage(f"attributing {run.run_id}: step {n + 1}/{len(todo)}", n, len(todo))
        result = attribute(pair, context_at(header, steps, step), temperature)
        rows += [{**ident, **row} for row in result.rows(step)]
    if hooks is not None and todo:
        hooks.stage(f"attributing {run.run_id}: step {len(todo)}/{len(todo)}", len(todo), len(todo))
    text = "".join(json.dumps(r, ensure_ascii=False, separators=(",", ":")) + "\n" for r in rows)
    path = attribution_path(out, run)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, text)
    return rows


def read_run(out: str | Path, run) -> list[dict]:
    path = attribution_path(out, run)
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
