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


# ------------------------------------------------------------------ show / replay (no model is loaded)


def _visible(text, keep_newlines: bool = False) -> str:
    """Token text with control characters escaped (\\n, \\x0e, …) so a terminal shows what was generated."""
    import unicodedata

    out = []
    for ch in "" if text is None else str(text):
        if ch == "\n":
            out.append("\n" if keep_newlines else "\\n")
        elif ch == "\t":
            out.append("\\t")
        elif unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Cn"):
            out.append(f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return "".join(out)


def _token_cell(text) -> str:
    """A token for a table cell: escaped, spaces shown as ·."""
    shown = _visible(text).replace(" ", "·")
    return shown if shown else "∅"


def _num(value, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            return str(value)
        if value != 0 and (abs(value) >= 1e4 or abs(value) < 10 ** -(digits - 1)):
            return f"{value:.{max(digits - 1, 1)}e}"
        return f"{value:.{digits}f}"
    return str(value)


def _print_warnings(warnings: list[str]) -> None:
    from rich.text import Text

    for warning in warnings:
        err_console.print(Text("warning: ", style="yellow") + Text(warning), soft_wrap=True)


def _session_header_table(session) -> Table:
    from rich.text import Text

    h = session.header
    pert = h.get("perturbation") or {}
    table = Table(title=Text(f"session {session.path}", style="italic"), title_justify="left", show_header=False, box=None, padding=(0, 2, 0, 0))
    table.add_column(style="bold")
    table.add_column(overflow="fold")

    def pct(v):
        return f"{v:.2%}" if isinstance(v, (int, float)) and not isinstance(v, bool) else "–"

    sparsity = pct(pert.get("measured_sparsity"))
    if isinstance(pert.get("dense_sparsity"), (int, float)) and pert.get("dense_sparsity"):
        sparsity += f" (dense model: {pct(pert['dense_sparsity'])})"
    rows = [
        ("model", h.get("model_display") or h.get("model") or "–"),
        ("perturbation", str(pert.get("spec", "–"))),
        ("measured sparsity", sparsity),
    ]
    calib = h.get("calibration")
    if isinstance(calib, dict):
        origin = "self-generated" if calib.get("source") in (None, "self") else str(calib.get("source"))
        rows.append(("calibration", f"{calib.get('samples')}×{calib.get('length')} tokens, {origin}, seed {calib.get('seed')}"))
    decoding = f"sampled, seed {h.get('seed')}" if h.get("sample") else "greedy"
    rows += [
        ("mode", f"{h.get('mode', '–')} ({decoding})"),
        ("temperature", _num(h.get("temperature"), 3)),
        ("prompt", _visible(h.get("prompt"), keep_newlines=True) + ("  (raw, no chat template)" if h.get("raw") else "")),
        ("choices", ", ".join(repr(c) for c in h["choices"]) if isinstance(h.get("choices"), list) and h["choices"]
         else "–"),
        ("steps", f"{len(session.steps)}" + ("" if session.complete else " (interrupted: no closing summary)")),
        ("created", str(h.get("created", "–"))),
    ]
    where = " ".join(str(h[k]) for k in ("device", "dtype") if h.get(k))
    if where:
        rows.append(("recorded on", where + (f", hierui {h['hierui']}" if h.get("hierui") else "")))
    for name, value in rows:
        table.add_row(name, Text(value))
    return table


def _summary_table(summary: dict, title: str) -> Table:
    table = Table(title=title, title_justify="left", show_header=False, box=None, padding=(0, 2, 0, 0))
    table.add_column(style="bold")
    table.add_column(justify="right")
    for name, value in summary.items():
        table.add_row(name, _num(value))
    return table


def _continuations_table(session) -> Table:
    from rich.text import Text

    shared = session.header.get("mode") != "free"
    table = Table(title="continuations", title_justify="left", expand=True)
    table.add_column("dense", ratio=1, overflow="fold")
    table.add_column("perturbed (its own choice at each step, fed the dense token)" if shared else "perturbed",
                     ratio=1, overflow="fold")
    dense = "".join(_visible(s.get("text_d"), keep_newlines=True) for s in session.steps)
    pert = "".join(_visible(s.get("text_p"), keep_newlines=True) for s in session.steps)
    table.add_row(Text(dense), Text(pert))
    return table


def _steps_table(session) -> Table:
    from rich.text import Text

    choices = bool(session.header.get("choices")) or any("sub_kl" in s for s in session.steps)
    table = Table(title="steps", title_justify="left")
    columns = ["step", "dense", "perturbed", "emb_cos[L]", "logit_cos", "prob_cos", "kl", "kl_est", "tv", "top1",
               "amp", "cum_kl"] + (["sub_kl"] if choices else [])
    for name in columns:
        table.add_column(name, justify="left" if name in ("dense", "perturbed") else "right")
    for s in session.steps:
        emb = s.get("emb_cos") if isinstance(s.get("emb_cos"), list) and s.get("emb_cos") else [None]
        top1 = s.get("top1_agree")
        same = s.get("token_d") == s.get("token_p")
        row = [str(s.get("step")), Text(_token_cell(s.get("text_d"))),
               Text(_token_cell(s.get("text_p")), style=None if same else "red"),
               _num(emb[-1], 6), _num(s.get("logit_cos"), 6), _num(s.get("prob_cos"), 6), _num(s.get("kl")),
               _num(s.get("kl_est")), _num(s.get("tv")), "–" if top1 is None else ("✓" if top1 else "✗"),
               _num(s.get("amp"), 3), _num(s.get("cum_kl"))]
        if choices:
            row.append(_num(s.get("sub_kl")))
        table.add_row(*row)
    return table


def _session_files(path: Path) -> list[Path]:
    """The sessions of a directory: a `hierui batch` output (sessions/*.jsonl) or a folder of sessions."""
    for folder in (path / "sessions", path):
        files = sorted(folder.glob("*.jsonl")) if folder.is_dir() else []
        if files:
            return files
    raise HieruiError(f"{path} is a directory, not a session file (and it holds no sessions/*.jsonl)")


def _show_directory(path: Path) -> None:
    from rich.text import Text

    from engine.session import load_session
    from engine.summary import summarize

    table = Table(title=Text(f"sessions in {path}", style="italic"), title_justify="left")
    for name in ("session", "model", "perturbation", "mode", "prompt", "steps", "kl_mean", "same_top1_rate"):
        table.add_column(name, justify="right" if name in ("steps", "kl_mean", "same_top1_rate") else "left")
    interrupted = False
    for file in _session_files(path):
        try:
            s = load_session(file)
        except HieruiError as e:
            table.add_row(Text(file.name), Text(f"unreadable: {e}", style="red"), "", "", "", "", "", "")
            continue
        summary = s.summary if s.complete else summarize(s.steps, s.header.get("mode"))
        interrupted |= not s.complete
        prompt = _visible(s.header.get("prompt"))
        table.add_row(Text(file.name), Text(str(s.header.get("model_display") or s.header.get("model", "–"))),
                      Text(str((s.header.get("perturbation") or {}).get("spec", "–"))), str(s.header.get("mode", "–")),
                      Text(prompt if len(prompt) <= 40 else prompt[:39] + "…"),
                      f"{len(s.steps)}" + ("" if s.complete else "*"),
                      _num(summary.get("kl_mean")), _num(summary.get("same_top1_rate")))
    console.print(table)
    if interrupted:
        console.print("* interrupted run (no closing summary); its figures are computed from the recorded steps")
    csv = path / "summary.csv"
    if csv.is_file():
        console.print(f"batch summary table: {csv}")
    console.print("show one of them with: hierui show SESSION.jsonl [--steps]", highlight=False)


def _show(path: Path, steps: bool) -> None:
    from engine.session import load_session
    from engine.summary import summarize

    if path.is_dir():
        from hierui.batchview import is_batch_output, show_batch

        if is_batch_output(path):  # a `hierui batch` output: the report's table and charts
            show_batch(path, console)
            return
        _show_directory(path)
        return
    session = load_session(path)
    _print_warnings(session.warnings)
    console.print(_session_header_table(session))
    if session.steps:
        console.print(_continuations_table(session))
    if session.complete:
        console.print(_summary_table(session.summary, "summary"))
    else:
        console.print(f"the run was interrupted: no closing summary; computed from the {len(session.steps)} recorded steps:",
                      style="yellow", highlight=False)
        console.print(_summary_table(summarize(session.steps, session.header.get("mode")), "summary (computed)"))
    if steps and session.steps:
        console.print(_steps_table(session))


SESSION_HELP = "a session file (.jsonl), or a directory of sessions (a `hierui batch` output)"


def _interactive() -> bool:
    return sys.stdin.isatty() and sys.stdout.isatty()


@app.command()
def explore(
    model: str = typer.Option("smollm2-135m", "--model", "-m", help=MODEL_HELP),
    spec: str = typer.Option("wanda:0.5", "--prune", "-p", help=SPEC_HELP),
    prompt: str = typer.Option("What is the capital of France?", "--prompt", help="the prompt both models continue"),
    mode: str = typer.Option("shared", "--mode", help="shared (both fed the dense token) or free (each its own)"),
    temperature: float = typer.Option(1.0, "--temperature", "-T", help="T of the probability space"),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="tokens per run"),
    sample: bool = typer.Option(False, "--sample", help="sample both models with one seeded stream (default greedy)"),
    seed: int = typer.Option(0, "--seed", help="sampling seed"),
    choices: Optional[list[str]] = typer.Option(None, "--choices", help="a candidate token of the categorical subspace; repeatable"),
    raw: bool = typer.Option(False, "--raw", help="do not apply the chat template"),
    topk: int = typer.Option(5, "--topk", help="size of the top-k lists"),
    run: bool = typer.Option(False, "--run", help="start stepping as soon as the models are ready"),
    sessions: Path = typer.Option(Path("sessions"), "--sessions", help="where the session files are written"),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N"),
    dtype: str = typer.Option("auto", "--dtype", help="auto, float32, bfloat16 or float16"),
    calib: Optional[Path] = typer.Option(None, "--calib", help="plain-text calibration file (default: sampled from the dense model)"),
    calib_samples: int = typer.Option(64, "--calib-samples", min=1, help="calibration sequences"),
    calib_len: int = typer.Option(128, "--calib-len", min=2, help="tokens per calibration sequence"),
    no_cache: bool = typer.Option(False, "--no-cache", help="recompute calibration and pruned weights"),
) -> None:
    """Open the explorer: step the dense and the perturbed model token by token and watch them drift apart."""
    from engine.models import DTYPES, resolve
    from engine.perturb.spec import parse_spec
    from engine.stepper import StepSettings

    resolve(model)  # everything the user typed is checked before the UI starts
    parsed = parse_spec(spec)
    settings = StepSettings(mode=mode, temperature=temperature, max_new_tokens=max_new_tokens, sample=sample,
                            seed=seed, choices=list(choices or []) or None, raw=raw, topk=topk).validate()
    if calib is not None and not calib.is_file():
        raise HieruiError(f"calibration file not found: {calib}")
    if dtype.lower() != "auto" and dtype.lower() not in DTYPES:
        raise HieruiError(f"unknown dtype '{dtype}': use auto, float32, bfloat16 or float16")
    if parsed.method == "checkpoint":
        resolve(parsed.path)
    if not _interactive():
        raise HieruiError("explore needs an interactive terminal; for headless runs use hierui batch")
    _quiet_libraries()
    if settings.choices:  # choices need the tokenizer: check them before the UI too
        from engine.models import load_tokenizer
        from engine.stepper import choice_token_ids

        choice_token_ids(load_tokenizer(model, progress=lambda m: err_console.print(f"[dim]{m}[/]")), settings.choices)

    def make_pair(progress):
        from engine.models import load
        from engine.perturb import perturb

        loaded = load(model, device=device, dtype=dtype, progress=lambda message: progress(message, 0, 0))
        return perturb(loaded, parsed, use_cache=not no_cache, progress=progress,
                       calib_options={"source": str(calib) if calib else None, "samples": calib_samples,
                                      "length": calib_len})

    from hierui.app import HieruiApp

    HieruiApp(pair_factory=make_pair, prompt=prompt, settings=settings, session_dir=sessions,
              title_hint=f"{model} · {parsed}", autorun=run).run()


@app.command()
def show(
    session: Path = typer.Argument(..., help=SESSION_HELP, show_default=False),
    steps: bool = typer.Option(False, "--steps", help="also print one table row per step"),
) -> None:
    """Print a recorded session: header, continuations, summary (and --steps: every step). Loads no model."""
    _show(session, steps)


@app.command()
def replay(
    session: Path = typer.Argument(..., help=SESSION_HELP, show_default=False),
    rerun: bool = typer.Option(False, "--rerun", help="recompute the session with its models and report the largest deviation"),
    print_only: bool = typer.Option(False, "--print", help="print the session as text instead of opening the explorer"),
    steps: bool = typer.Option(False, "--steps", help="with --print: also print one table row per step"),
    device: str = typer.Option("auto", "--device", help="--rerun: auto, cpu, cuda or cuda:N"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="--rerun: auto, float32, bfloat16 or float16 (default: the recorded dtype)"),
    tol: float = typer.Option(1e-4, "--tol", min=0.0, help="--rerun: exit 1 when a metric deviates by this much or more"),
    no_cache: bool = typer.Option(False, "--no-cache", help="--rerun: recompute calibration and pruned weights"),
) -> None:
    """Replay a recorded session in the explorer, with no model loaded (--print: as text, like `show`).

    With --rerun: recompute every step with the models and compare; exit 0 when all tokens match and every metric is within --tol of the recording, 1 otherwise.
    """
    if not rerun and (print_only or not _interactive()):
        _show(session, steps)  # no terminal to draw on: print it instead
        return
    if not rerun:
        if session.is_dir():
            raise HieruiError(f"{session} is a directory: replay opens one session file (hierui show DIR lists them)")
        from engine.session import load_session

        recorded = load_session(session)  # every problem with the file is reported here, before the UI starts
        from hierui.app import HieruiApp

        HieruiApp(session=recorded).run()
        return
    if session.is_dir():
        raise HieruiError(f"{session} is a directory: replay --rerun takes one session file")
    from engine.session import load_session

    loaded_session = load_session(session)
    _print_warnings(loaded_session.warnings)
    if dtype is not None:
        from engine.models import DTYPES

        if dtype.lower() != "auto" and dtype.lower() not in DTYPES:
            raise HieruiError(f"unknown dtype '{dtype}': use auto, float32, bfloat16 or float16")
    _quiet_libraries()
    from engine import replay as R
    from hierui.progress import stage_progress

    with stage_progress(err_console) as (_say, step):
        new = R.rerun(loaded_session, device=device, dtype=dtype, use_cache=not no_cache, progress=step)
    result = R.compare(loaded_session.steps, new)
    _print_comparison(loaded_session, result, tol)
    if not result.ok(tol):
        raise typer.Exit(1)


def _print_comparison(session, result, tol: float) -> None:
    from rich.text import Text

    h = session.header
    console.print(Text(f"{h.get('model_display') or h.get('model')} · {(h.get('perturbation') or {}).get('spec')} · "
                       f"{h.get('mode')} · {result.recorded} recorded steps, {result.rerun} recomputed"))
    console.print("largest absolute deviation per metric, recording vs recomputation:", highlight=False)
    table = Table()
    table.add_column("metric")
    table.add_column("max |Δ|", justify="right")
    for name, value in result.deviations.items():
        label = "null vs number, or missing" if value == float("inf") else f"{value:.3e}"
        table.add_row(name, label, style="red" if value >= tol else None)
    console.print(table)
    for note in result.notes:
        console.print(note, highlight=False)
    if result.tokens_match:
        console.print(f"tokens: all {result.recorded} steps match", highlight=False)
    else:
        i = result.first_token_mismatch
        console.print(f"tokens: differ, first at step {i}", style="red", highlight=False)
    if result.topk_id_mismatches:
        console.print(f"top-k token lists differ at {result.topk_id_mismatches} step(s)", highlight=False)
    worst = max(result.deviations, key=result.deviations.get, default=None)
    if worst is not None:
        verdict = "below" if result.max_deviation < tol else "NOT below"
        console.print(f"max deviation {result.max_deviation:.3e} ({worst}), {verdict} the tolerance {tol:g}",
                      highlight=False)
    console.print("rerun matches the recording" if result.ok(tol) else "rerun does NOT match the recording",
                  style="green" if result.ok(tol) else "bold red", highlight=False)


# ------------------------------------------------------------------ batch


class _BatchBars:
    """The progress hooks of engine.batch.run_sweep as rich bars on stderr: the runs of the sweep, the
    tokens of the current run, and the slow stages (calibrating, pruning) while they last."""

    def __init__(self, target: Console):
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                                   TimeElapsedColumn)

        self.progress = Progress(SpinnerColumn(), TextColumn("{task.description:<28}"), BarColumn(),
                                 MofNCompleteColumn(), TimeElapsedColumn(), console=target, transient=True)
        self.runs = self.tokens = None
        self.stages: dict[str, int] = {}

    def sweep_started(self, total: int, done: int) -> None:
        self.progress.start()
        self.runs = self.progress.add_task("runs", total=total, completed=done)

    def message(self, text: str) -> None:
        self.progress.console.print(f"[dim]{text}[/]", highlight=False)

    def stage(self, stage: str, done: int, total: int) -> None:
        if total <= 0:
            self.message(stage)
            return
        if stage not in self.stages:
            self._clear_stages()  # a stage may stop short of its total (calibrating does): a new one ends it
            self.stages[stage] = self.progress.add_task(stage, total=total)
        self.progress.update(self.stages[stage], completed=done, total=total)
        if done >= total:
            self.progress.remove_task(self.stages.pop(stage))

    def _clear_stages(self) -> None:
        for task in self.stages.values():
            self.progress.remove_task(task)
        self.stages.clear()

    def run_started(self, run, max_tokens: int) -> None:
        self._clear_stages()
        if self.tokens is None:
            self.tokens = self.progress.add_task(run.run_id, total=max_tokens)
        self.progress.reset(self.tokens, total=max_tokens, description=run.run_id)

    def batch_started(self, runs, max_tokens: int) -> None:
        more = f" +{len(runs) - 1}" if len(runs) > 1 else ""
        self.run_started(runs[0], max_tokens)
        self.progress.update(self.tokens, description=f"{runs[0].run_id}{more}")

    def step(self, run, record: dict) -> None:
        self.progress.advance(self.tokens)

    def run_finished(self, run) -> None:
        self.progress.advance(self.runs)

    def close(self) -> None:
        self.progress.stop()


def _choice_table(rows: list[dict]) -> Table:
    """Multiple-choice items per spec: accuracy of both models, agreement, subspace vs full-vocabulary KL."""
    from rich import box

    table = Table(title="multiple choice (scored, no generation), per spec", title_justify="left",
                  box=box.SIMPLE_HEAD, pad_edge=False)
    for name, justify in (("spec", "left"), ("items", "right"), ("acc d", "right"), ("acc p", "right"),
                          ("agree", "right"), ("sub KL", "right"), ("KL", "right")):
        table.add_column(name, justify=justify, no_wrap=True)
    for r in rows:
        table.add_row(r["spec"], str(r["items"]), f"{r['acc_d']:.3f}", f"{r['acc_p']:.3f}", f"{r['agree_rate']:.3f}",
                      f"{r['sub_kl_mean']:.4f}", f"{r['kl_mean']:.4f}")
    return table


def _batch_table(groups: list[dict], fields: dict, width: int) -> Table:
    """Means per (spec, mode): a row per group, or, where that is wider than `width`, a column per group."""
    from rich import box
    from rich.measure import Measurement

    shown = [name for name in fields if any(g[name] is not None for g in groups)]
    cell = lambda value: "—" if value is None else f"{value:.3g}"  # noqa: E731
    style = dict(title="mean over runs, per spec and mode", title_justify="left", box=box.SIMPLE_HEAD,
                 pad_edge=False, collapse_padding=True)
    table = Table(**style)
    for name in ("spec", "mode", "runs", *shown):
        table.add_column(fields.get(name, name), justify="left" if name in ("spec", "mode") else "right", no_wrap=True)
    for g in groups:
        table.add_row(g["spec"], g["mode"], str(g["runs"]), *[cell(g[name]) for name in shown])
    if Measurement.get(console, console.options.update_width(10_000), table).maximum <= width:
        return table
    table = Table(**style)
    table.add_column("")
    for g in groups:
        table.add_column(f"{g['spec']}\n{g['mode']}", justify="right", no_wrap=True)
    table.add_row("runs", *[str(g["runs"]) for g in groups])
    for name in shown:
        table.add_row(fields[name], *[cell(g[name]) for g in groups])
    return table


@app.command()
def batch(
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="a text file, one prompt per line, or .jsonl with \"prompt\" and optional \"choices\", \"id\""),
    from_session: Optional[Path] = typer.Option(None, "--from", help="rerun this session's prompt and settings under the --prune specs"),
    model: Optional[str] = typer.Option(None, "--model", "-m", help=MODEL_HELP + " (default smollm2-135m, or the session's)"),
    specs: Optional[list[str]] = typer.Option(None, "--prune", "-p", help=SPEC_HELP + "; repeatable (default wanda:0.5)"),
    modes: Optional[list[str]] = typer.Option(None, "--mode", help="shared or free; repeatable (default shared, or the session's)"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="output folder (default runs/<time>); rerun into it to resume"),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", help="tokens per run (default 32)"),
    temperature: Optional[float] = typer.Option(None, "--temperature", help="T of the probability space (default 1.0)"),
    sample: Optional[bool] = typer.Option(None, "--sample/--greedy", help="sample both models with one seed (default greedy)"),
    seed: Optional[int] = typer.Option(None, "--seed", help="sampling seed (default 0)"),
    raw: Optional[bool] = typer.Option(None, "--raw/--chat", help="do not apply the chat template (default: apply it)"),
    topk: Optional[int] = typer.Option(None, "--topk", help="size of the recorded top-k lists (default 5)"),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N"),
    dtype: str = typer.Option("auto", "--dtype", help="auto, float32, bfloat16 or float16"),
    calib: Optional[Path] = typer.Option(None, "--calib", help="plain-text calibration file (default: sampled from the dense model)"),
    calib_samples: Optional[int] = typer.Option(None, "--calib-samples", help="calibration sequences (default 64)"),
    calib_len: Optional[int] = typer.Option(None, "--calib-len", help="tokens per calibration sequence (default 128)"),
    calib_seed: Optional[int] = typer.Option(None, "--calib-seed", help="seed of the self-generated calibration (default 0)"),
    no_cache: bool = typer.Option(False, "--no-cache", help="recompute calibration and pruned weights"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", min=1, help="prompts stepped at once (default 8 on CPU, 16 on GPU)"),
    recipe: Optional[str] = typer.Option(None, "--recipe", help="a sweep described in a TOML file, or a shipped recipe's name (hierarchy); the other options override it"),
) -> None:
    """Sweep prompts × --prune specs × --mode headless: a session per run, steps.parquet, summary.parquet/.csv."""
    from engine import batch as B

    args = dict(prompts_file=prompts, from_session=from_session, model=model, specs=specs, modes=modes,
                calib={"source": str(calib) if calib else None, "samples": calib_samples,
                       "length": calib_len, "seed": calib_seed},
                device=device, dtype=dtype, temperature=temperature, max_new_tokens=max_new_tokens,
                sample=sample, seed=seed, raw=raw, topk=topk)
    if recipe is not None:  # the recipe's prompts go to OUT/prompts.jsonl
        from engine.recipe import apply_recipe

        out = out or B.default_out_dir()
        args, batch_size = apply_recipe(recipe, out, args, batch_size)
    sweep = B.plan_sweep(**args)
    out = out or B.default_out_dir()
    _quiet_libraries()
    bars = _BatchBars(err_console)
    try:
        result = B.run_sweep(sweep, out, use_cache=not no_cache, hooks=bars, batch_size=batch_size)
    except KeyboardInterrupt:
        bars.close()
        done = B.complete_runs(sweep, out)
        listed = f": {', '.join(done)}" if done else ""
        err_console.print(f"interrupted: {len(done)} of {len(sweep.runs())} runs complete in {out}{listed}", highlight=False)
        err_console.print(f"rerun with --out {out} to finish the others", highlight=False)
        raise typer.Exit(130)
    finally:
        bars.close()
    if result.runs:
        console.print(_batch_table(B.group_summary(sweep, result.summary), B.GROUP_FIELDS, console.width))
    if result.choice_summary:
        console.print(_choice_table(result.choice_summary))
    n = len(result.runs)
    if n:
        console.print(f"{n} run{'s' * (n != 1)} ({len(result.computed)} computed, {len(result.skipped)} already "
                      f"complete) in {out}: sessions/, steps.parquet, summary.parquet, summary.csv",
                      highlight=False, soft_wrap=True)
    if result.choice_summary:
        console.print(f"{len(sweep.choice_items)} multiple-choice items × {len(sweep.specs)} specs in {out}: "
                      f"mc/, mc.parquet, mc_summary.parquet, mc_summary.csv", highlight=False, soft_wrap=True)
    console.print(f"the report: hierui report {out}", highlight=False, soft_wrap=True)


@app.command()
def report(
    run_dir: Path = typer.Argument(..., help="the --out folder of a hierui batch run", show_default=False),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="the HTML file to write (default RUN_DIR/report.html)"),
    open_: bool = typer.Option(False, "--open", help="print only the report's path (to hand to a browser)"),
) -> None:
    """One self-contained HTML page from a batch output: the hierarchy, KL vs theory, amplification, accumulation, first divergence, multiple choice."""
    from engine.report import write_report

    path = write_report(run_dir, out)
    if open_:
        print(path.resolve())
    else:
        console.print(f"report: {path} (hierui show {run_dir} prints its table in the terminal)", highlight=False,
                      soft_wrap=True)


def main() -> None:
    try:
        app()
    except HieruiError as e:
        from rich.text import Text  # the message is plain text: a path like a[b] is not markup

        err_console.print(Text("error: ", style="bold red") + Text(str(e)), highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
