"""`hierui prune` (perturb a model and compare it with the dense one: sparsity, perplexity, greedy text; --save a
checkpoint) and `hierui plan` (the pair's predicted memory and placement, before anything is loaded)."""

from dataclasses import replace
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from engine.errors import HieruiError
from engine.record.methods import DEFAULT_SPEC
from engine.record.settings import DEFAULT_PROMPT
from hierui.cli import checks, launch, options
from hierui.cli.apps import app
from hierui.output import console, err_console

# --seed was prune's calibration seed: --calib-seed now, as in every command (--seed is the sampling seed)
OldSeed = typer.Option(None, "--seed", hidden=True, help="deprecated: --calib-seed")
PlanSpecs = options.specs(f"; repeatable, one pair at a time (default {DEFAULT_SPEC})")
PlanGpus = options.gpus(
    "GPUs to spread the pair over, one device_map for both models (default: every visible one, as explore, batch "
    "and prune do)"
)
PlanGpuMem = options.gpu_mem(
    "memory per GPU, e.g. 80GiB, 24GB, 512MiB (default: the GPU's free memory); on a CPU, a simulated device of that "
    "size (above it the layers are streamed)"
)


@app.command()
def prune(
    model: options.Model = "smollm2-135m",
    spec: options.Spec = DEFAULT_SPEC,
    save: Optional[Path] = typer.Option(
        None, "--save", help="write the perturbed model as a transformers checkpoint here"
    ),
    prompt: str = typer.Option(DEFAULT_PROMPT, "--prompt", help="prompt for the side-by-side greedy text"),
    tokens: int = typer.Option(24, "--tokens", min=1, help="greedy tokens to show from each model"),
    raw: bool = typer.Option(False, "--raw", help="do not apply the chat template to the prompt"),
    device: options.Device = "auto",
    dtype: options.Dtype = "auto",
    gpu_mem: options.GpuMem = None,
    gpus: options.Gpus = None,
    calib: options.Calib = None,
    calib_samples: options.CalibSamples = None,
    calib_len: options.CalibLen = None,
    calib_seed: options.CalibSeed = None,
    seed: Optional[int] = OldSeed,
    no_cache: options.NoCache = False,
) -> None:
    """Perturb a model and report sparsity, time, perplexity and greedy text, dense vs perturbed."""
    from engine.models.names import resolve
    from engine.perturb.spec import parse_spec
    from engine.record.settings import calibration_for

    ref = resolve(model)  # bad names fail here, before anything slow
    parsed = parse_spec(spec)
    typed = {"--calib": calib, "--calib-samples": calib_samples, "--calib-len": calib_len, "--calib-seed": calib_seed}
    typed["--seed"] = seed
    checks.calibration_unused([parsed], typed)
    calib_seed = _calib_seed(seed, calib_seed)
    calibration = calibration_for(  # engine.record.settings: the one default, the same in every command
        parsed.method, source=None, samples=calib_samples, length=calib_len, seed=calib_seed
    )
    save = _check_save(save, parsed)
    config = checks.check_model_args(model, parsed, device)  # before the dense model is loaded
    # --calib: a text file, at least one sequence long (before the model loads)
    calibration = replace(calibration, source=checks.check_calib_file(calib, model, calibration.length))
    if config is not None:  # the prompt and --tokens within the context (the tokenizer is local: no download)
        from engine.models.configs import config_int
        from engine.models.loading import load_tokenizer
        from engine.models.tokens import prompt_ids
        from engine.record.settings import fit_context

        n = len(prompt_ids(load_tokenizer(model), prompt, raw=raw))
        fit_context(n, tokens, config_int(config, "max_position_embeddings"), option="--tokens", can_truncate=False)
    checks.check_dtype(dtype)
    from engine.run.open import pair_request

    placed = dict(device=device, dtype=dtype, gpu_mem=gpu_mem, gpus=gpus, use_cache=not no_cache)
    workload = dict(max_new_tokens=tokens, lens="off", perplexity=512)
    request = pair_request(model, [parsed], calib=calibration.to_dict(), **placed, **workload)
    plan = launch.print_plan(request)
    launch.quiet_libraries()
    loaded, pair, (ppl_d, ppl_p, out_d, out_p) = _perturb_and_measure(request, plan, prompt, raw, tokens)
    console.print(
        f"[bold]{ref.display}[/] · [bold cyan]{parsed}[/] · {loaded.device} {str(loaded.dtype).replace('torch.', '')}"
    )
    _print_report(pair.report, parsed)
    ratio = ppl_p / ppl_d
    console.print(f"perplexity on the held-out text: dense {ppl_d:.2f} · perturbed {ppl_p:.2f} · ratio {ratio:.2f}×")
    side = Table(title=f"greedy continuation of {prompt!r}", title_justify="left", expand=True)
    side.add_column("dense", ratio=1)
    side.add_column(f"perturbed ({parsed})", ratio=1)
    side.add_row(loaded.tokenizer.decode(out_d), loaded.tokenizer.decode(out_p))
    console.print(side)
    if save is not None:
        from engine.perturb.export import save_checkpoint

        save_checkpoint(pair, save)
        console.print(f"saved to {save} (load it with --prune checkpoint:{save} or from_pretrained)")


@app.command()
def plan(
    model: options.Model = "smollm2-135m",
    specs: PlanSpecs = None,
    device: options.Device = "auto",
    dtype: options.Dtype = "auto",
    gpus: PlanGpus = None,
    gpu_mem: PlanGpuMem = None,
    batch_size: int = typer.Option(1, "--batch-size", "-b", min=1, help="prompts stepped at once"),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1, help="tokens per run"),
    prompt_tokens: Optional[int] = typer.Option(
        None, "--prompt-tokens", min=1, help="prompt length in tokens (default 64)", show_default=False
    ),
    calib_samples: options.CalibSamples = None,
    calib_len: options.CalibLen = None,
    calib: options.Calib = None,
    lens: options.lens("all", "; sampled holds as much at its peak") = None,
    no_lens: options.NoLens = False,
) -> None:
    """Predict the peak memory of the dense + perturbed pair, and where it would go, before loading anything.

    From the model's config alone: the dense weights, the tensors the perturbation replaces, calibration
    activations, the pruning workspace of the layer in flight, both KV caches for --batch-size × (prompt +
    --max-new-tokens), logits and the lens; whether it fits the device, and the placement: one device, several
    GPUs with one device_map for both models, or streamed offload."""
    from engine.models.names import resolve
    from engine.perturb.spec import parse_spec
    from engine.record.settings import calibration_for
    from engine.run.plan import PROMPT_TOKENS, DoesNotFit, estimate, parse_size, visible_gpus

    lens = checks.lens_choice(lens, no_lens, "all")
    resolve(model)
    parsed = [parse_spec(s) for s in (specs or [DEFAULT_SPEC])]
    typed = {"--calib": calib, "--calib-samples": calib_samples, "--calib-len": calib_len}
    checks.calibration_unused(parsed, typed)
    size = parse_size(gpu_mem) if gpu_mem is not None else None
    checks.check_calib_file(calib)  # a text file (its length is not the plan's business)
    checks.check_dtype(dtype)
    from engine.run.open import check_specs

    check_specs(model, parsed, device)
    calibrating = [p for p in parsed if p.needs_calibration]
    settings = [calibration_for(p.method, samples=calib_samples, length=calib_len) for p in calibrating]
    largest = max(settings, key=lambda c: c.samples * c.length) if settings else None
    launch.quiet_libraries()
    try:
        result = estimate(
            model,
            parsed,
            device=device,
            dtype=dtype,
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            prompt_tokens=prompt_tokens or PROMPT_TOKENS,
            calib=(largest.samples, largest.length) if largest else None,
            self_calibration=calib is None,
            lens=lens,
            gpus=gpus if gpus is not None else visible_gpus(device),
            gpu_mem=size,
            fetch=True,
        )
    except DoesNotFit as e:  # the breakdown, then the one line saying it does not fit and what to do (exit 2)
        _print_estimate(e.plan, verdict=False)
        raise
    if result is None:
        raise HieruiError(f"the config of {model} is not known before it is fetched: hierui models pull {model}")
    _print_estimate(result)


def _print_estimate(result, verdict: bool = True) -> None:
    """engine.run.plan.estimate's answer: every item and when it is resident, the peak by stage, the device_map
    over several GPUs, and the one-line verdict (`verdict` False: a pair that does not fit, whose error line
    says so)."""
    from engine.run.plan import gib

    title = f"{result.display} · {result.dtype} on {result.device} · {', '.join(result.specs)}"
    table = Table(title=title, title_justify="left")
    table.add_column("item")
    table.add_column("memory", justify="right")
    table.add_column("resident during")
    table.add_column("counted as", overflow="fold")
    for item in result.items:
        where = ", ".join(item.stages) if len(item.stages) < 4 else "all"
        host = " (host)" if not item.on_device and result.device != "cpu" else ""
        table.add_row(item.name, gib(item.nbytes), where + host, item.note)
    console.print(table)
    stages = " · ".join(f"{s} {gib(n)}" for s, n in result.stages.items())
    console.print(f"by stage: {stages}", highlight=False, soft_wrap=True)
    if result.calibration:
        samples, length = result.calibration
        console.print(f"calibration {samples}×{length}; prompt {result.prompt_tokens} tokens", highlight=False)
    if result.gpu_loads:
        spread = Table(title="one device_map for both models", title_justify="left")
        for column in ("GPU", "modules (dense and perturbed alike)", "dense weights", "pair, at most"):
            spread.add_column(column, justify="right" if column != "modules (dense and perturbed alike)" else "left")
        for gpu, (modules, dense, peak) in sorted(result.gpu_loads.items()):
            spread.add_row(f"cuda:{gpu}", modules, gib(dense), gib(peak))
        console.print(spread)
    if verdict:
        console.print(result.line(), highlight=False, soft_wrap=True)


def _calib_seed(seed: int | None, calib_seed: int | None) -> int | None:
    """prune's old --seed (the calibration's seed) for one release: a warning, and --calib-seed's value."""
    if seed is None:
        return calib_seed
    if calib_seed is not None and calib_seed != seed:
        raise HieruiError(f"--seed {seed} and --calib-seed {calib_seed} disagree: --seed is now --calib-seed")
    err_console.print(
        "warning: --seed is now --calib-seed (the calibration's seed; --seed is the sampling seed elsewhere): "
        "use --calib-seed, --seed will be removed",
        highlight=False,
        soft_wrap=True,
    )
    return seed


def _check_save(save: Path | None, parsed) -> Path | None:
    """--save: a spec that can be saved, into an empty folder that can be written (checked before the pruning)."""
    if save is not None and not parsed.declared.saves:
        raise HieruiError(f"{parsed} models are quantized on the fly and not saved; use --prune {parsed} directly")
    if save is not None and save.is_dir() and any(save.iterdir()):
        raise HieruiError(f"--save directory {save} is not empty")
    if save is not None:
        save = checks.writable_folder(save, "--save")
    return save


def _perturb_and_measure(request, plan, prompt: str, raw: bool, tokens: int):
    """Open the pair of `request` (the dense model placed as `plan` says) and measure both models: the perplexity
    on the held-out text and `tokens` greedy tokens after `prompt`. Returns (loaded, pair, (ppl dense, ppl
    perturbed, tokens dense, tokens perturbed))."""
    from engine.models.tokens import prompt_ids
    from engine.run import quality
    from engine.run.open import open_dense, open_pair
    from hierui.progress import stage_progress

    with stage_progress(err_console) as (_say, step):
        loaded = open_dense(request, plan, progress=step)
        pair = open_pair(request, dense=loaded, progress=step)
        measuring = "measuring perplexity and greedy text"
        step(measuring, 0, 4)
        text = quality.heldout_text()
        ppl_d = quality.perplexity(pair.dense, loaded.tokenizer, text)
        step(measuring, 1, 4)
        ppl_p = quality.perplexity(pair.perturbed, loaded.tokenizer, text)
        step(measuring, 2, 4)
        ids = prompt_ids(loaded.tokenizer, prompt, raw=raw)
        out_d = quality.greedy_tokens(pair.dense, loaded.tokenizer, ids, tokens)
        step(measuring, 3, 4)
        out_p = quality.greedy_tokens(pair.perturbed, loaded.tokenizer, ids, tokens)
        step(measuring, 4, 4)
    return loaded, pair, (ppl_d, ppl_p, out_d, out_p)


def _print_report(report, parsed) -> None:
    """What the perturbation did: zero weights per linear (and per expert), drops or quantization, its time and
    its calibration."""
    if report.by_type and parsed.declared.zeros_table:  # its weights' values changed
        table = Table(title="zero weights in the decoder linears", title_justify="left")
        table.add_column("linear")
        table.add_column("weights", justify="right")
        table.add_column("dense", justify="right")
        table.add_column("perturbed", justify="right")
        for name, row in report.by_type.items():
            style = "bold" if name == "all" else None
            table.add_row(name, f"{row['total']:,}", f"{row['dense']:.2%}", f"{row['perturbed']:.2%}", style=style)
        console.print(table)
    experts = _expert_table(report.details)
    if experts is not None:
        console.print(experts)
    allocated = _allocation_table(report.details.get("allocation"))
    if allocated is not None:
        console.print(allocated)
    console.print(parsed.declared.describe(report.details))  # the method's own line (engine.record.methods)
    how = "loaded from cache" if report.from_cache else f"{report.seconds:.2f} s"
    calib_note = ""
    if report.calibration:
        from engine.perturb.calibration import describe_calibration

        c = report.calibration
        made = "from the cache" if c["from_cache"] else f"made in {c['seconds']:.1f} s"
        calib_note = f" · {describe_calibration(c)} ({made})"
    console.print(f"perturbation time: {how}{calib_note}", highlight=False)


def _allocation_table(allocation: dict | None):
    """Per decoder layer, a layer allocation's sparsity (engine.perturb.allocated): OWL's outlier ratio and the
    sparsity its formula wanted, or the file's; the fraction pruned, in whole rows or weights."""
    if not allocation:
        return None
    owl = allocation["kind"] == "owl"
    what = f"OWL, M = {allocation['m']:g}, λ = {allocation['lam']:g}" if owl else f"from {allocation['allocation']}"
    table = Table(title="sparsity per layer", caption=what, title_justify="left", caption_justify="left")
    table.add_column("layer", justify="right")
    if owl:
        table.add_column("outliers", justify="right")
        table.add_column("wanted", justify="right")
    table.add_column("pruned", justify="right")
    for layer, pruned in enumerate(allocation["layers"]):
        owl_cells = [f"{allocation['outlier_ratios'][layer]:.2%}", f"{allocation['wanted'][layer]:.2%}"] if owl else []
        table.add_row(str(layer), *owl_cells, f"{pruned:.2%}")
    table.add_row("all", *([""] * (2 if owl else 0)), f"{allocation['sparsity']:.2%}", style="bold")
    return table


def _expert_table(details: dict):
    """Per MoE layer and expert: the sparsity of its matrices and the calibration tokens routed to it."""
    rows = details.get("by_expert") or []
    if not rows:
        return None
    tokens = {(e["layer"], i): n for e in details.get("expert_tokens") or [] for i, n in enumerate(e["tokens"])}
    experts = sorted({r["expert"] for r in rows})
    table = Table(title="experts: zero weights (calibration tokens routed to each)", title_justify="left")
    table.add_column("layer", justify="right")
    for e in experts:
        table.add_column(f"expert {e}", justify="right")
    for layer in sorted({r["layer"] for r in rows}):
        cells = {r["expert"]: r for r in rows if r["layer"] == layer}
        table.add_row(
            str(layer),
            *[
                f"{cells[e]['perturbed']:.1%}" + (f" ({tokens[layer, e]:,})" if (layer, e) in tokens else "")
                if e in cells
                else "—"
                for e in experts
            ],
        )
    return table
