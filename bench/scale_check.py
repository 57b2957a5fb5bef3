"""Scale: a 7B-shaped model with random weights (engine.models.random_shapes) pruned and stepped on one device.

    python bench/scale_check.py [--model random:llama-7b] [--device cuda] [--steps 64] [--batch 16]

Loads the model (bfloat16 on CUDA, float32 on CPU unless --dtype), prunes it with wanda on random calibration
token ids (random weights make any text as good as any other; --calib NxL), steps the pair --steps tokens in
shared and in free mode over --batch prompts with end of sequence disabled (engine.run.stepper.BatchStepper), then
does the same for int8 and nf4 (bitsandbytes; --quant-steps tokens, shared mode). Prints, one labelled line each:
load, pruning and quantization times, the per-step time of the pair against the memory-bandwidth floor (a
decode step reads each model's weights once: (bytes read by the dense model + by the perturbed one) ÷
bandwidth; --bandwidth-tbps, default the H200's datasheet 4.8 TB/s, CUDA only) and peak CUDA memory. Timing
and memory only: the text of random weights means nothing. Nothing is cached (use_cache=False): a pruned 7B
would be 13 GB on disk.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import time

import torch
from batch_throughput import PROMPTS  # bench/ is on the path when a bench script runs

from engine.models.loading import load
from engine.perturb import perturb
from engine.perturb.calibration import Calibration
from engine.run.stepper import BatchStepper, StepSettings


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def peak(device) -> str:
    """' · peak CUDA 27.31 GiB' since the last reset_peak; nothing on a CPU."""
    return f" · peak CUDA {gib(torch.cuda.max_memory_allocated(device))}" if device.type == "cuda" else ""


def reset_peak(device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def bytes_read_per_step(model) -> int:
    """The bytes of weights one decode step reads: every parameter and buffer once, except the input embedding
    table (only the fed tokens' rows are read), unless it is also the LM head."""
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and head.weight.data_ptr() == embed.data_ptr()
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        ptr = t.data_ptr()
        if ptr in seen or (ptr == embed.data_ptr() and not tied):
            continue
        seen.add(ptr)
        total += t.numel() * t.element_size()
    return total


def random_calibration(vocab: int, samples: int, length: int, seed: int = 0) -> Calibration:
    """Seeded random token ids (what calibration reads of a random-weights model is as good as any text)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (samples, length), generator=gen)
    return Calibration(ids, "random tokens", samples, length, seed, key=f"random-tokens:{samples}x{length}:{seed}")


def time_steps(pair, prompts, mode: str, steps: int, device) -> tuple[float, int]:
    """Seconds per step after the first (the first includes the prefill), and the steps taken; after a
    warm-up run of 3 steps (the first calls of kernels and of the stepper's own code are slower)."""
    for limit in (min(3, steps), steps):  # the warm-up, then the timed run
        stepper = BatchStepper(pair, prompts, StepSettings(mode=mode, max_new_tokens=limit, raw=True))
        stepper.eos = set()  # every row makes `limit` steps
        stepper.step()
        sync(device)
        start = time.perf_counter()
        taken = 1
        while not stepper.finished:
            stepper.step()
            taken += 1
        sync(device)
    return (time.perf_counter() - start) / max(taken - 1, 1), taken


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="random:llama-7b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--quant-steps", type=int, default=16)
    parser.add_argument("--calib", default="64x128", help="random calibration: SAMPLESxLENGTH")
    parser.add_argument("--bandwidth-tbps", type=float, default=4.8, help="memory bandwidth (H200 datasheet: 4.8)")
    parser.add_argument("--skip-quant", action="store_true")
    args = parser.parse_args()
    samples, length = (int(x) for x in args.calib.lower().split("x"))
    prompts = (PROMPTS * (args.batch // len(PROMPTS) + 1))[: args.batch]

    started = time.perf_counter()
    loaded = load(args.model, device=args.device, dtype=args.dtype)
    device = loaded.device
    sync(device)
    dense_bytes = bytes_read_per_step(loaded.model)
    params = sum(p.numel() for p in {p.data_ptr(): p for p in loaded.model.parameters()}.values())
    print(
        f"scale model: {loaded.ref.display} · {params / 1e9:.2f} B parameters · "
        f"{str(loaded.dtype).removeprefix('torch.')} on {device}"
    )
    print(f"scale load: {time.perf_counter() - started:.1f} s · weights read per step {gib(dense_bytes)}")
    on_cuda = device.type == "cuda"
    bandwidth = args.bandwidth_tbps * 1e12

    def report_steps(label: str, pair, mode: str, steps: int) -> None:
        reset_peak(device)
        per_step, taken = time_steps(pair, prompts, mode, steps, device)
        floor = (dense_bytes + bytes_read_per_step(pair.perturbed)) / bandwidth
        vs = f" · bandwidth floor {floor * 1000:.2f} ms · ratio {per_step / floor:.1f}×" if on_cuda else ""
        print(
            f"scale {label} {mode}: {taken} steps × batch {len(prompts)} · {per_step * 1000:.1f} ms/step{vs}"
            f"{peak(device)}"
        )

    reset_peak(device)
    calib = random_calibration(loaded.model.config.vocab_size, samples, length)
    started = time.perf_counter()
    pair = perturb(loaded, "wanda:0.5", calibration=calib, use_cache=False)
    sync(device)
    total = time.perf_counter() - started
    print(
        f"scale wanda:0.5 pruning: {pair.report.seconds:.1f} s ({total:.1f} s with the clone and sparsity count) · "
        f"calibration {samples}×{length} random tokens · sparsity {pair.report.measured_sparsity:.3f}{peak(device)}"
    )
    for mode in ("shared", "free"):
        report_steps("wanda:0.5", pair, mode, args.steps)
    del pair
    gc.collect()
    if on_cuda:
        torch.cuda.empty_cache()

    if args.skip_quant:
        print("scale int8/nf4: skipped (--skip-quant)")
        return
    if importlib.util.find_spec("bitsandbytes") is None:
        print("scale int8/nf4: skipped: bitsandbytes is not installed here")
        return
    for spec in ("int8", "nf4"):
        reset_peak(device)
        started = time.perf_counter()
        try:
            pair = perturb(loaded, spec, use_cache=False)
            sync(device)
        except Exception as e:  # report and go on: this is a check, not a test
            print(f"scale {spec}: FAILED {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            continue
        print(f"scale {spec} quantize: {time.perf_counter() - started:.1f} s{peak(device)}")
        try:
            report_steps(spec, pair, "shared", args.quant_steps)
        except Exception as e:
            print(f"scale {spec} stepping: FAILED {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        del pair
        gc.collect()
        if on_cuda:
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
