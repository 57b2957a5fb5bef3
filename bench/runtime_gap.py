"""How much of the gap between hierui's and llama.cpp's KLD for a GGUF quant comes from llama.cpp's runtime.

hierui de-quantizes a GGUF candidate to float32 and computes in float; llama.cpp's CPU backend also quantizes
each matrix product's activations into the weight type's `vec_dot_type` (engine.models.ggml_activations) and
keeps K and V in an F16 cache. This bench scores the corpus KLD (hierui's own scorer, engine.kld.corpus.score)
of one quant against the dense F32 GGUF in three settings:

    plain        hierui as it is (float32 everywhere)
    act          forward pre-hooks on the quant's Linear modules round their inputs through the activation type
                 ggml pairs with that tensor's GGUF type (read with gguf.GGUFReader)
    act+fa16     also, in both models, ggml's CPU flash attention with the F16 cache (fa16_attention: llama.cpp's
                 default on CPU, flash_attn auto): fp16 Q and K, an fp16 V accumulator
    act+f16attn  also, in both models (llama.cpp's dense run has the F16 cache too), Q, K and V rounded to fp16
                 and the softmax weights rounded to fp16 before ·V (ggml's non-flash attention: the K/V cache
                 is F16, so Q and the KQ weights are converted to F16 for their dot products)

and prints mean KLD, same top and PPL ratio beside llama.cpp's own (`llama-perplexity --kl-divergence`, parsed
from its log, or the values measured on 2026-12-08 with ctx 128 on the same text where no log is found).

    nice -n 10 .venv/bin/python bench/runtime_gap.py --quant /tmp/cc/Q8_0.gguf
    nice -n 10 .venv/bin/python bench/runtime_gap.py --quant /tmp/cc/Q4_K_M.gguf

Options: --dense (default /tmp/cc/f32.gguf), --text (default /tmp/cc/heldout.txt), --ctx (128), --log
(llama.cpp's log; default /root/.cache/hierui-llamacpp/work/lc_<TYPE>_lc.log),
--modes (plain,act,act+fa16; also act+f16attn, fa16, f16attn: the attention alone).
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# llama.cpp's numbers where no log is found: llama-perplexity --kl-divergence, ctx 128, /tmp/cc/heldout.txt,
# base: the dense F32 GGUF's own run (logs lc_Q8_0_lc.log, lc_Q4_K_M_lc.log of the comparison script)
LLAMACPP_MEASURED = {
    "Q8_0": {"kl_mean": 0.003975, "same_top": 0.95873, "ppl_ratio": 1.006665},
    "Q4_K_M": {"kl_mean": 0.054750, "same_top": 0.84889, "ppl_ratio": 1.080706},
}
LOG_DIR = Path("/root/.cache/hierui-llamacpp/work")

PROJECTIONS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def hf_module(gguf_name: str) -> str | None:
    """The HF Linear module a GGUF weight tensor feeds (None for norms, the embedding lookup and the rest)."""
    if gguf_name == "output.weight":
        return "lm_head"
    match = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", gguf_name)
    if match and match.group(2) in PROJECTIONS:
        return f"model.layers.{match.group(1)}.{PROJECTIONS[match.group(2)]}"
    return None


def module_types(path: str | Path) -> dict[str, str]:
    """{HF module name: GGUF type name} of a GGUF's matrix products; the head is token_embd's type when the file
    has no output.weight (tied)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    out = {hf_module(name): kind for name, kind in types.items() if hf_module(name)}
    if "lm_head" not in out and "token_embd.weight" in types:
        out["lm_head"] = types["token_embd.weight"]
    return out


def add_activation_hooks(model, types: dict[str, str]) -> list:
    import torch

    from engine.models.ggml_activations import activation_type, round_trip

    handles = []
    modules = dict(model.named_modules())
    missing = [name for name in types if name not in modules]
    if missing:
        raise SystemExit(f"modules not in the model: {missing[:3]}")
    for name, kind in types.items():
        module = modules[name]
        if not isinstance(module, torch.nn.Linear):
            raise SystemExit(f"{name} is a {type(module).__name__}, not a Linear")
        act = activation_type(kind)

        def hook(_module, args, act=act):
            return (round_trip(args[0], act), *args[1:])

        handles.append(module.register_forward_pre_hook(hook))
    return handles


def _allowed(attention_mask, q_len: int, k_len: int, device):
    """Which keys each query sees, as a bool tensor broadcastable to (b, h, q, k), from the mask transformers
    hands the attention function (None: causal; bool: True where allowed; float: additive)."""
    import torch

    if attention_mask is None:  # sdpa's is_causal case
        return torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(k_len - q_len)
    if attention_mask.dtype == torch.bool:
        return attention_mask[..., :k_len]
    return attention_mask[..., :k_len] > float("-inf")


def _f16(t):
    import torch

    return t.to(torch.float16).to(t.dtype)


def f16_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """ggml's attention without flash attention, F16 K/V cache: Q·K with Q and K in fp16 (sums in float32),
    softmax in float32, its weights rounded to fp16 for ·V."""
    import torch
    from transformers.models.llama.modeling_llama import repeat_kv

    key = repeat_kv(_f16(key), module.num_key_value_groups)
    value = repeat_kv(_f16(value), module.num_key_value_groups)
    weights = torch.matmul(_f16(query), key.transpose(2, 3)) * scaling
    allowed = _allowed(attention_mask, weights.shape[-2], weights.shape[-1], weights.device)
    weights = weights.masked_fill(~allowed, float("-inf"))
    weights = torch.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(_f16(weights), value).transpose(1, 2).contiguous()
    return out, weights


def fa16_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """ggml's CPU flash attention (ops.cpp, ggml_compute_forward_flash_attn_ext_f16) with an F16 K/V cache, as
    llama.cpp runs it by default on CPU (flash_attn auto): Q converted to fp16, each key's score in float32,
    an online softmax whose V accumulator is fp16 (rescaled by exp(M_old − M) on a new maximum, then
    acc += v · exp(s − M), each step rounded to fp16), the sum of weights in float32, acc / S at the end."""
    import torch
    from transformers.models.llama.modeling_llama import repeat_kv

    key = repeat_kv(_f16(key), module.num_key_value_groups)
    value = repeat_kv(_f16(value), module.num_key_value_groups)
    scores = torch.matmul(_f16(query), key.transpose(2, 3)) * scaling  # (b, h, q, k)
    allowed = _allowed(attention_mask, scores.shape[-2], scores.shape[-1], scores.device)
    allowed = allowed.expand_as(scores)
    shape = (*scores.shape[:-1], 1)
    big = torch.full(shape, float("-inf"), dtype=torch.float32, device=scores.device)
    total = torch.zeros(shape, dtype=torch.float32, device=scores.device)
    acc = torch.zeros((*scores.shape[:-1], value.shape[-1]), dtype=torch.float32, device=scores.device)
    one = torch.ones(shape, dtype=torch.float32, device=scores.device)
    for j in range(scores.shape[-1]):
        s = scores[..., j : j + 1]
        ok = allowed[..., j : j + 1]
        new = ok & (s > big)
        ms = torch.where(new, torch.exp(big - s), one)
        vs = torch.where(new, one, torch.where(ok, torch.exp(s - big), torch.zeros_like(s)))
        acc = torch.where(new, _f16(acc * ms), acc)
        acc = torch.where(ok, _f16(acc + value[..., j : j + 1, :] * vs), acc)
        total = torch.where(ok, total * ms + vs, total)
        big = torch.where(new, s, big)
    out = (acc / total).to(query.dtype).transpose(1, 2).contiguous()
    return out, None


@contextmanager
def f16_attention_on(models, flash: bool = False):
    """Every model's attention through f16_attention, or fa16_attention with `flash` (both the dense and the
    perturbed: llama.cpp's dense run keeps its K/V cache in F16 too)."""
    saved = [(m.config, m.config._attn_implementation) for m in models]
    from transformers import AttentionInterface

    AttentionInterface.register("ggml_f16", fa16_attention if flash else f16_attention)
    try:
        for m in models:
            m.config._attn_implementation = "ggml_f16"
            for sub in m.modules():
                if (
                    hasattr(sub, "config")
                    and sub.config is not m.config
                    and hasattr(sub.config, "_attn_implementation")
                ):
                    saved.append((sub.config, sub.config._attn_implementation))
                    sub.config._attn_implementation = "ggml_f16"
        yield
    finally:
        for config, impl in saved:
            config._attn_implementation = impl


def llamacpp_numbers(quant: str, log: str | None) -> tuple[dict, str]:
    path = Path(log) if log else LOG_DIR / f"lc_{quant}_lc.log"
    if path.is_file():
        text = path.read_text(errors="replace")
        kl = re.search(r"Mean\s+KLD:\s+([\d.]+)", text)
        top = re.search(r"Same top p:\s+([\d.]+)", text)
        ratio = re.search(r"Mean PPL\(Q\)/PPL\(base\)\s*:\s+([\d.]+)", text)
        if kl and top and ratio:
            return {
                "kl_mean": float(kl.group(1)),
                "same_top": float(top.group(1)) / 100,
                "ppl_ratio": float(ratio.group(1)),
            }, str(path)
    return LLAMACPP_MEASURED[quant], "constants in bench/runtime_gap.py (measured 2026-12-08)"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quant", required=True)
    parser.add_argument("--dense", default="/tmp/cc/f32.gguf")
    parser.add_argument("--text", default="/tmp/cc/heldout.txt")
    parser.add_argument("--ctx", type=int, default=128)
    parser.add_argument("--log", default=None)
    parser.add_argument("--modes", default="plain,act,act+fa16")
    args = parser.parse_args(argv)

    import torch

    from engine.kld.corpus import read_text, score
    from engine.kld.statistics import summarize
    from engine.models.loading import load
    from engine.perturb import perturb

    torch.set_num_threads(2)
    quant = Path(args.quant).stem
    text = read_text(args.text)
    loaded = load(args.dense, device="cpu")
    pair = perturb(loaded, f"checkpoint:{args.quant}")
    types = module_types(args.quant)
    counts: dict[str, int] = {}
    for kind in types.values():
        counts[kind] = counts.get(kind, 0) + 1
    print(f"{quant}: {len(types)} matrix products, types {counts}")

    rows = []
    for mode in args.modes.split(","):
        started = time.perf_counter()
        handles = add_activation_hooks(pair.perturbed, types) if mode.startswith("act") else []
        try:
            if mode.endswith(("f16attn", "fa16")):
                with f16_attention_on([pair.dense, pair.perturbed], flash=mode.endswith("fa16")):
                    run = score(loaded, [pair], text, args.text, ctx=args.ctx)
            else:
                run = score(loaded, [pair], text, args.text, ctx=args.ctx)
        finally:
            for handle in handles:
                handle.remove()
        stats = summarize(run.results[0].tokens)
        rows.append((mode, stats["kl_mean"], stats["kl_mean_unc"], stats["same_top"], stats["ppl_ratio"]))
        print(f"  {mode}: {time.perf_counter() - started:.0f} s", flush=True)

    lc, source = llamacpp_numbers(quant, args.log)
    print(f"\n{quant} vs {Path(args.dense).name}, {Path(args.text).name}, ctx {args.ctx}, {stats['tokens']} tokens")
    print(f"{'setting':<22} {'mean KLD':>20} {'same top':>9} {'PPL ratio':>10} {'KLD / llama.cpp':>16}")
    for mode, kl, unc, top, ratio in rows:
        line = f"{'hierui ' + mode:<22} {kl:>11.6f} ± {unc:.6f} {100 * top:>8.2f}% {ratio:>10.5f}"
        print(f"{line} {kl / lc['kl_mean']:>16.3f}")
    print(f"{'llama.cpp':<22} {lc['kl_mean']:>20.6f} {100 * lc['same_top']:>8.2f}% {lc['ppl_ratio']:>10.5f}")
    print(f"(llama.cpp: {source})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
