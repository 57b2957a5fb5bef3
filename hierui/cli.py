"""The `hierui` command line (typer). Heavy imports (torch, transformers) happen inside commands."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from engine.errors import HieruiError

app = typer.Typer(
    name="hierui",
    help="Explore why pruning breaks generation: a dense and a perturbed LLM side by side.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
models_app = typer.Typer(help="List the model aliases and what is cached; fetch a model.", invoke_without_command=True)
app.add_typer(models_app, name="models")

console = Console()
err_console = Console(stderr=True)

MODEL_HELP = "alias (smollm2-135m, llama-7b, …), tiny-random, local directory, .gguf file or hub id"
SPEC_HELP = "perturbation: wanda:0.5, sparsegpt:0.5, magnitude:2:4, attndrop:4, mlpdrop:4, blockdrop:4, int8, nf4, checkpoint:DIR, none"


def _quiet_libraries() -> None:
    import os
    import warnings

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


@app.command()
def prune(
    model: str = typer.Option("smollm2-135m", "--model", "-m", help=MODEL_HELP),
    spec: str = typer.Option("wanda:0.5", "--prune", "-p", help=SPEC_HELP),
    save: Optional[Path] = typer.Option(None, "--save", help="write the perturbed model as a transformers checkpoint here"),
    prompt: str = typer.Option("What is the capital of France?", "--prompt", help="prompt for the side-by-side greedy text"),
    tokens: int = typer.Option(24, "--tokens", min=1, help="greedy tokens to show from each model"),
    raw: bool = typer.Option(False, "--raw", help="do not apply the chat template to the prompt"),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N"),
    dtype: str = typer.Option("auto", "--dtype", help="auto, float32, bfloat16 or float16"),
    calib: Optional[Path] = typer.Option(None, "--calib", help="plain-text calibration file (default: sampled from the dense model)"),
    calib_samples: int = typer.Option(64, "--calib-samples", min=1, help="calibration sequences"),
    calib_len: int = typer.Option(128, "--calib-len", min=2, help="tokens per calibration sequence"),
    seed: int = typer.Option(0, "--seed", help="seed of the self-generated calibration"),
    no_cache: bool = typer.Option(False, "--no-cache", help="recompute calibration and pruned weights"),
) -> None:
    """Perturb a model and report sparsity, time, perplexity and greedy text, dense vs perturbed."""
    from engine.models import resolve
    from engine.perturb.spec import parse_spec

    ref = resolve(model)  # bad names fail here, before anything slow
    parsed = parse_spec(spec)
    if save is not None and parsed.family == "quant":
        raise HieruiError(f"{parsed} models are quantized on the fly and not saved; use --prune {parsed} directly")
    if save is not None and save.is_dir() and any(save.iterdir()):
        raise HieruiError(f"--save directory {save} is not empty")
    _quiet_libraries()

    from engine import quality
    from engine.models import load
    from engine.perturb import perturb
    from hierui.progress import stage_progress

    with stage_progress(err_console) as (say, step):
        loaded = load(model, device=device, dtype=dtype, progress=say)
        pair = perturb(loaded, parsed, use_cache=not no_cache, progress=step,
                       calib_options={"source": str(calib) if calib else None, "samples": calib_samples,
                                      "length": calib_len, "seed": seed})
        say("measuring perplexity and greedy text")
        text = quality.heldout_text()
        ppl_d = quality.perplexity(pair.dense, loaded.tokenizer, text)
        ppl_p = quality.perplexity(pair.perturbed, loaded.tokenizer, text)
        ids = quality.prompt_ids(loaded.tokenizer, prompt, raw=raw)
        out_d = quality.greedy_tokens(pair.dense, loaded.tokenizer, ids, tokens)
        out_p = quality.greedy_tokens(pair.perturbed, loaded.tokenizer, ids, tokens)

    report = pair.report
    console.print(f"[bold]{ref.display}[/] · [bold cyan]{parsed}[/] · {loaded.device} {str(loaded.dtype).replace('torch.', '')}")
    if report.by_type and parsed.family in ("prune", "checkpoint"):
        table = Table(title="zero weights in the decoder linears", title_justify="left")
        table.add_column("linear")
        table.add_column("weights", justify="right")
        table.add_column("dense", justify="right")
        table.add_column("perturbed", justify="right")
        for name, row in report.by_type.items():
            style = "bold" if name == "all" else None
            table.add_row(name, f"{row['total']:,}", f"{row['dense']:.2%}", f"{row['perturbed']:.2%}", style=style)
        console.print(table)
    console.print(_describe_details(report.details))
    how = "loaded from cache" if report.from_cache else f"{report.seconds:.2f} s"
    calib_note = ""
    if report.calibration:
        c = report.calibration
        made = "cached" if c["from_cache"] else f"{c['seconds']:.1f} s"
        origin = "sampled from the dense model" if c["source"] == "self" else c["source"]
        calib_note = f" · calibration: {c['samples']}×{c['length']} tokens {origin} ({made})"
    console.print(f"perturbation time: {how}{calib_note}")
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


def _describe_details(details: dict) -> str:
    """One line on what a drop or quantization did (empty for pruning)."""
    if "dropped" in details:
        sims = details.get("similarity") or []
        scored = ", ".join(f"{i} ({sims[i]:.3f})" if i < len(sims) else str(i) for i in details["dropped"])
        noun = {"attention": "attention sublayers", "mlp": "MLP sublayers", "block": "blocks"}[details["kind"]]
        return f"dropped {noun} (input/output cosine on calibration): {scored}"
    if "quantized_linears" in details:
        return f"quantized {details['quantized_linears']} linears to {details['bits']} bits ({details['backend']})"
    return ""


@models_app.callback()
def models_list(ctx: typer.Context) -> None:
    """List the aliases, their targets, and which are cached locally."""
    if ctx.invoked_subcommand is not None:
        return
    from engine.models import hierui_home, list_models

    table = Table(title=f"models (cache: {hierui_home()})", title_justify="left")
    for col in ("alias", "target", "cached", "where"):
        table.add_column(col)
    for row in list_models():
        table.add_row(row["alias"], row["target"], "yes" if row["cached"] else "-", row["where"])
    console.print(table)


@models_app.command("pull")
def models_pull(name: str = typer.Argument(..., help=MODEL_HELP)) -> None:
    """Fetch (and convert) a model so later runs need no network."""
    from engine.models import pull, resolve

    resolve(name)
    _quiet_libraries()
    from hierui.progress import stage_progress

    with stage_progress(err_console) as (say, _step):
        where = pull(name, progress=say)
    console.print(f"{name}: ready" + (f" in {where}" if where else " (built in, nothing to fetch)"))


def main() -> None:
    try:
        app()
    except HieruiError as e:
        err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
