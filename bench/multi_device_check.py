"""A pair over several devices against the same pair on one: the cross-device path, checked where it can run.

    python bench/multi_device_check.py [--model random:qwen2.5-0.5b] [--devices auto] [--steps 16] [--batch 4]

--devices auto: every CUDA GPU (up to 4) when there are two or more; with one GPU, that GPU and the CPU (modules
mapped to the CPU run there: a real two-device pair on a one-GPU machine); without a GPU, the CPU alone with
accelerate's hooks on every module (the hooked path, no device boundary). The map comes from engine.place.placement,
the same device_map for both models, layers filled in order. The reference is the same model, built with the
same seed, on the first device alone.

For each spec (--specs; default wanda:0.5, sparsegpt:0.5, attndrop:1) on random calibration token ids: the masks'
agreement with the reference's and the largest weight difference, whether layer ℓ of dense and perturbed share a
device, then --steps of both pairs over --batch prompts (shared mode): the tokens that agree, the largest
difference of the per-step KL, ms/step of each and the number of device-to-device hidden-state copies per
forward that hierui adds (engine.place.placement.gather: one per device run). Then attribution at one step and the
hidden-state cosines of a `hierui kld` window on both. The same numbers everywhere on several identical GPUs
(same kernels); a GPU against the CPU differs by rounding, so there the masks agree to ~99.9% and the KL to
a few per cent. Prints labelled lines; never part of the tests (tests/test_gpu_check.py runs it on a CPU).
"""

from __future__ import annotations

import argparse
import time

import torch
from batch_throughput import PROMPTS  # bench/ is on the path when a bench script runs
from scale_check import random_calibration, sync

import engine.place.placement as placement
from engine.anatomy.linears import decoder_layers, decoder_layers_prefix, weight_views
from engine.models.loading import load
from engine.perturb import perturb
from engine.run.plan.shape import config_object, meta_model
from engine.run.stepper import BatchStepper, StepSettings


def pick_devices(text: str) -> list[str]:
    if text != "auto":
        return [d.strip() for d in text.split(",") if d.strip()]
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count >= 2:
        return [f"cuda:{i}" for i in range(min(count, 4))]
    return ["cuda:0", "cpu"] if count == 1 else ["cpu"]


def device_map(model_name: str, dtype, devices: list[str]) -> dict:
    """Layers split evenly over `devices` in order, the embeddings with the first layers and the final norm and
    head with the last (a tied head stays with the embeddings: accelerate ties it across devices otherwise)."""
    meta = meta_model(model_name, config_object(model_name), dtype)
    prefix = decoder_layers_prefix(meta)
    count = len(decoder_layers(meta))
    out: dict[str, str] = {}
    for name, _ in meta.named_children():
        if prefix.startswith(name + "."):
            for inner, _ in meta.get_submodule(name).named_children():
                full = f"{name}.{inner}"
                if full + "." != prefix:
                    out[full] = devices[0] if "embed" in inner else devices[-1]
        else:
            out[name] = devices[-1]
    for i in range(count):
        out[f"{prefix}{i}"] = devices[min(len(devices) - 1, i * len(devices) // count)]
    head = meta.get_output_embeddings()
    if head is not None and head.weight is meta.get_input_embeddings().weight:
        for name, module in meta.named_modules():
            if module is head and name in out:
                out[name] = devices[0]
    return out


def compare_weights(a, b) -> tuple[float, float]:
    """(fraction of mask entries that agree, largest absolute weight difference) over the decoder matrices."""
    same = total = 0
    worst = 0.0
    for index, (la, lb) in enumerate(zip(decoder_layers(a), decoder_layers(b))):
        for va, vb in zip(weight_views(la, index), weight_views(lb, index)):
            x, y = va.matrix().float().cpu(), vb.matrix().float().cpu()
            same += int(((x == 0) == (y == 0)).sum())
            total += x.numel()
            worst = max(worst, float((x - y).abs().max()))
    return same / max(total, 1), worst


def run_steps(pair, prompts, steps: int, devices) -> tuple[list[list[dict]], float]:
    stepper = BatchStepper(pair, prompts, StepSettings(mode="shared", max_new_tokens=steps, raw=True))
    stepper.eos = set()
    records: list[list[dict]] = [[] for _ in prompts]
    first = stepper.step()
    for b, r in enumerate(first):
        records[b].append(r)
    for d in devices:
        sync(torch.device(d))
    started = time.perf_counter()
    taken = 0
    while not stepper.finished:
        for b, r in enumerate(stepper.step()):
            if r is not None:
                records[b].append(r)
        taken += 1
    for d in devices:
        sync(torch.device(d))
    return records, (time.perf_counter() - started) / max(taken, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="random:qwen2.5-0.5b")
    parser.add_argument(
        "--devices", default="auto", help="auto, or a comma-separated list (cuda:0,cuda:1 or cuda:0,cpu)"
    )
    parser.add_argument("--dtype", default="float32", help="float32 (default: a GPU and the CPU compute alike)")
    parser.add_argument("--specs", default="wanda:0.5,sparsegpt:0.5,attndrop:1")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--calib", default="16x64", help="random calibration: SAMPLESxLENGTH")
    args = parser.parse_args()
    devices = pick_devices(args.devices)
    dtype = getattr(torch, args.dtype)
    samples, length = (int(x) for x in args.calib.lower().split("x"))
    prompts = (PROMPTS * (args.batch // len(PROMPTS) + 1))[: args.batch]

    reference = load(args.model, device=devices[0], dtype=args.dtype)
    mapped_map = device_map(args.model, dtype, devices)
    mapped = load(args.model, device=devices[0], dtype=args.dtype, device_map=mapped_map)
    prefix = decoder_layers_prefix(mapped.model)
    print(f"multi-device model: {mapped.ref.display} · {args.dtype} · {placement.describe(mapped_map, prefix)}")
    calib = random_calibration(reference.model.config.vocab_size, samples, length)
    for spec in [s.strip() for s in args.specs.split(",") if s.strip()]:
        try:
            ref_pair = perturb(reference, spec, calibration=calib, use_cache=False)
            started = time.perf_counter()
            pair = perturb(mapped, spec, calibration=calib, use_cache=False)
            seconds = time.perf_counter() - started
        except Exception as e:  # report and go on: this is a check, not a test
            print(f"multi-device {spec}: FAILED {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            continue
        same_place = not placement.mismatched_layers(pair.dense, pair.perturbed) if pair.spec.family != "drop" else True
        agree, worst = (1.0, 0.0) if pair.spec.family == "drop" else compare_weights(ref_pair.perturbed, pair.perturbed)
        print(
            f"multi-device {spec} pruning: {seconds:.1f} s · masks agree {agree:.4%} · max |Δw| {worst:.2e} · "
            f"layer ℓ of both on one device: {'yes' if same_place else 'NO'}"
        )
        try:
            ref_records, ref_ms = run_steps(ref_pair, prompts, args.steps, devices[:1])
            records, ms = run_steps(pair, prompts, args.steps, devices)
        except Exception as e:
            print(
                f"multi-device {spec} stepping: FAILED {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            )
            continue
        tokens = [
            (a["token_d"], a["token_p"]) == (b["token_d"], b["token_p"])
            for ra, rb in zip(ref_records, records)
            for a, b in zip(ra, rb)
        ]
        kl_gap = max(
            abs(a["kl"] - b["kl"]) / max(abs(a["kl"]), 1e-6)
            for ra, rb in zip(ref_records, records)
            for a, b in zip(ra, rb)
        )
        runs = len(placement.device_runs(placement.layer_devices(pair.dense)))
        print(
            f"multi-device {spec} stepping: {len(records[0])} steps × {len(prompts)} · "
            f"tokens agree {sum(tokens)}/{len(tokens)} "
            f"· max relative KL difference {kl_gap:.2e} · {ms * 1000:.1f} ms/step (one device {ref_ms * 1000:.1f}) · "
            f"hidden-state copies per forward {runs} (layers {len(decoder_layers(pair.dense))})"
        )
    pair = perturb(mapped, "wanda:0.5", calibration=calib, use_cache=False)
    ref_pair = perturb(reference, "wanda:0.5", calibration=calib, use_cache=False)
    from engine.kld.window import hidden_cosines, window_logits
    from engine.run.attribution import attribute

    ids = reference.tokenizer("The quick brown fox jumps over the lazy dog")["input_ids"]
    try:
        a, b = attribute(ref_pair, ids, greedy=False), attribute(pair, ids, greedy=False)
        gap = max(abs(x.kl_patched - y.kl_patched) for x, y in zip(a.units, b.units))
        print(
            f"multi-device attribution: {len(b.units)} units · KL {a.kl:.4f} vs {b.kl:.4f} · "
            f"max |Δ KL patched| {gap:.2e}"
        )
    except Exception as e:
        print(f"multi-device attribution: FAILED {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    try:
        window = torch.tensor([ids])
        cos = []
        for p in (ref_pair, pair):
            _, h_d = window_logits(p.dense, window.to(p.loaded.device), 4)
            _, h_p = window_logits(p.perturbed, window.to(p.loaded.device), 4)
            cos.append(hidden_cosines(h_d, h_p, p.hidden_map, 4).cpu())
        print(
            f"multi-device kld hidden cosines: max |Δ| {float((cos[0] - cos[1]).abs().max()):.2e} "
            f"over {tuple(cos[1].shape)}"
        )
    except Exception as e:
        print(f"multi-device kld hidden cosines: FAILED {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")


if __name__ == "__main__":
    main()
