"""`hierui kld`: the teacher-forced KL divergence of a corpus, dense vs each perturbation (llama.cpp's report),
here or on Ray, against the dense model or a stored base file."""

import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from engine.errors import HieruiError
from hierui.cli import checks, launch, options
from hierui.cli.apps import app
from hierui.output import console, err_console

Specs = options.specs("; repeatable")
Out = options.out("output folder (default runs/kld-<time>)")
SaveBase = Annotated[
    Optional[Path],
    typer.Option(
        "--save-base",
        help="write a dense base file here (safetensors): the dense head's inputs, exact; with --base-k K, the "
        "top-K log-probabilities (smaller, KL lower bounds)",
    ),
]
Base = Annotated[
    Optional[Path],
    typer.Option(
        "--base",
        help="compare against this base file instead of running the dense model (hierui's, or llama.cpp's "
        "--kl-divergence-base file)",
    ),
]
BaseFormat = Annotated[
    str,
    typer.Option(
        "--base-format",
        help="the format of --save-base: hierui (default) or llama.cpp (llama-perplexity's --kl-divergence-base "
        "file: 16-bit log-probabilities of the whole vocabulary; --stride = --ctx)",
    ),
]
Ctx = Annotated[
    Optional[int],
    typer.Option(
        "--ctx", help="tokens per window, the second half of each scored (default 512; a llama.cpp --base file's n_ctx)"
    ),
]
FORMATS = ("hierui", "llama.cpp")
Ray = Annotated[
    Optional[str],
    typer.Option("--ray", help="score the specs on a Ray cluster: auto or its address (pip install 'hierui[ray]')"),
]


@app.command()
def kld(
    model: options.Model = "smollm2-135m",
    specs: Specs = None,
    text: options.Text = None,
    suite: options.Suite = None,
    ctx: Ctx = None,
    stride: options.Stride = None,
    out: Out = None,
    save_base: SaveBase = None,
    base: Base = None,
    base_k: Optional[int] = typer.Option(None, "--base-k", min=1, help="write a top-K base file (e.g. 64)"),
    base_format: BaseFormat = "hierui",
    ray: Ray = None,
    ray_cpus: Optional[int] = typer.Option(None, "--ray-cpus", help="with --ray: CPUs per worker (default 1)"),
    ray_gpus: Optional[int] = typer.Option(None, "--ray-gpus", help="with --ray: GPUs per worker (default 1)"),
    device: options.Device = "auto",
    dtype: options.Dtype = "auto",
    gpu_mem: options.GpuMem = None,
    gpus: options.Gpus = None,
    calib: options.Calib = None,
    calib_samples: options.CalibSamples = None,
    calib_len: options.CalibLen = None,
    calib_seed: options.CalibSeed = None,
    no_cache: options.NoCache = False,
) -> None:
    """Teacher-forced KL divergence of a corpus, dense vs each --prune spec, in llama.cpp's report.

    --save-base FILE stores the dense model's side of the comparison (exact by default; --base-k K writes a
    small top-K file whose KL is a lower bound), and --base FILE scores against it without running the dense
    model. Without --prune, --base scores --model itself: `hierui prune --save DIR`, then
    `hierui kld --model DIR --base FILE`, holds only the pruned model in memory. --base-format llama.cpp writes
    llama-perplexity's --kl-divergence-base file, and --base reads one (its n_ctx is the run's --ctx)."""
    from engine.kld import corpus as kldmod
    from engine.models.names import resolve
    from engine.perturb.spec import expand_specs, parse_spec, unperturbed

    resolve(model)
    parsed = [parse_spec(s) for s in expand_specs(specs or [])]
    if text is not None and suite is not None:
        raise HieruiError("give --text or --suite, not both")
    ctx = _window(ctx, stride, base, save_base, base_format, base_k)
    kldmod.check_window(ctx, stride)  # the window's bounds; against the model's context in _check_corpus
    if base_k is not None and save_base is None:
        raise HieruiError("--base-k is the K of --save-base FILE; give both")
    if base is not None and save_base is not None:
        raise HieruiError("--base and --save-base do not go together: a base file is written from the dense model")
    ray_options = checks.ray_options(None, ray, ray_cpus, ray_gpus, None)  # Ray missing: one line, exit 2
    if ray_options is not None and save_base is not None:
        raise HieruiError("--save-base runs the dense model here: write the base file without --ray")
    if base is not None and not parsed:  # the model itself against the base file (a saved pruned checkpoint, say)
        parsed = [unperturbed()]
    if not parsed and save_base is None:
        raise HieruiError("nothing to do: give --prune SPEC (repeatable) and/or --save-base FILE")
    checks.output_file(save_base, "--save-base")
    checks.check_dtype(dtype)
    typed = {"--calib": calib, "--calib-samples": calib_samples, "--calib-len": calib_len, "--calib-seed": calib_seed}
    checks.calibration_unused(parsed, typed)
    given = _calibration(model, parsed, calib, calib_samples, calib_len, calib_seed)
    corpus = str(text) if text is not None else (suite or "heldout")
    body = kldmod.read_text(text) if text is not None else kldmod.suite_text(suite or "heldout")
    base_file = _check_corpus(model, parsed, device, body, ctx, stride, base, save_base, base_k, base_format)
    if base_file is not None and specs:  # --prune perturbs --model: it must be the base file's dense model
        base_file.check_model(model)
    # a file can be made in OUT (a probe that leaves nothing: the lock makes the folder), before anything slow
    out = checks.writable_folder(out or Path("runs") / time.strftime("kld-%Y%m%d-%H%M%S"), "--out")
    request = _request(model, parsed, ctx, device, dtype, gpu_mem, gpus, not no_cache, given)
    from engine.record.settings import calibrations

    calibration = calibrations(parsed, **given)  # per spec, as batch.json records it
    from engine.record.lock import lock_folder

    with lock_folder(out, warn=_say):  # one writer per OUT, as batch (engine.record.lock)
        llama = getattr(base_file, "bos_first", False) or (save_base is not None and base_format == "llama.cpp")
        tokens = "llama.cpp" if llama else "hierui"  # llama.cpp's token stream: kld.json keeps which
        wanted, reused = _check_out(request, corpus, body, ctx, stride, base_file, out, calibration, tokens)
        plan = launch.print_plan(request, always=False)
        scoring = (request, plan, body, corpus, ctx, stride, out, wanted, reused)
        if ray_options is not None:
            _kld_on_ray(*scoring, ray_options, base_file, calibration=calibration)
        else:
            _kld_here(*scoring, base_file, save_base, base_k, calibration=calibration, base_format=base_format)


def _window(ctx: int | None, stride, base: Path | None, save_base: Path | None, base_format: str, base_k) -> int:
    """--ctx (default kldmod.DEFAULT_CTX), or a llama.cpp --base file's n_ctx (engine.kld.llamacpp: its chunks
    are the run's windows); the llama.cpp format's refusals, before anything slow."""
    from engine.kld import llamacpp
    from engine.kld.corpus import DEFAULT_CTX

    if base_format not in FORMATS:
        raise HieruiError(f"--base-format {base_format}: use {' or '.join(FORMATS)}")
    if base_format != "hierui" and save_base is None:
        raise HieruiError("--base-format is the format of --save-base FILE (--base knows a file's format); give both")
    if base_format == "llama.cpp":
        if base_k is not None:
            raise HieruiError("--base-format llama.cpp holds the whole vocabulary: leave --base-k out")
        if stride is not None and stride != (ctx or DEFAULT_CTX):
            raise HieruiError(
                f"--base-format llama.cpp: llama.cpp's chunks do not overlap: --stride {stride} must be --ctx "
                f"({ctx or DEFAULT_CTX}) or left out"
            )
    n_ctx = llamacpp.peek_ctx(base) if base is not None else None
    if n_ctx is None:
        return DEFAULT_CTX if ctx is None else ctx
    if ctx is not None and ctx != n_ctx:
        raise HieruiError(f"--ctx {ctx}: the llama.cpp base file {base} was made with n_ctx {n_ctx}; leave --ctx out")
    if stride is not None and stride != n_ctx:
        raise HieruiError(f"--stride {stride}: llama.cpp's chunks do not overlap (n_ctx {n_ctx}); leave --stride out")
    return n_ctx


def _say(text: str) -> None:
    err_console.print(text, highlight=False, markup=False, soft_wrap=True)


def _check_out(
    request, corpus: str, body: str, ctx: int, stride, base_file, out: Path, calibration: dict, tokens: str = "hierui"
):
    """Before the model loads: whether OUT takes this run (engine.kld.folder: the same kld run, a batch folder of
    the same model and calibration, or a new folder). Returns (kld.json's fields, the specs OUT already holds)."""
    from engine.kld import corpus as kldmod
    from engine.kld import folder

    base, base_k = (base_file.path, None if base_file.exact else base_file.k) if base_file is not None else (None, None)
    wanted = folder.manifest(
        request.model,
        corpus,
        kldmod.text_hash(body),
        ctx,
        stride,
        request.device,
        request.dtype,
        base,
        base_k,
        calibration or None,  # engine.record.settings.calibrations: per spec that calibrates
        tokens,
    )
    reused = folder.check_out(wanted, out)
    if reused:
        todo = [str(p) for p in request.specs if str(p) not in reused]
        _say(
            f"{out}: reusing {len(reused)} spec{'s' * (len(reused) != 1)} already scored there ({', '.join(reused)})"
            + (f"; scoring {', '.join(todo)}" if todo else "; nothing to score again")
        )
    return wanted, reused


def _stored(request, body: str, corpus: str, ctx: int, stride, out: Path, wanted: dict, reused: list, base_file):
    """(the folder's stored SpecResults, the KldRun frame to put them in), or ([], None) for a new folder."""
    if not reused:
        return [], None
    from engine.kld import corpus as kldmod
    from engine.kld import folder
    from engine.models.loading import load_tokenizer

    tokenizer = load_tokenizer(request.model)
    frame = kldmod.frame(tokenizer, body, corpus, wanted["model"], ctx, stride, None, base_file)
    frame.noise_floor = folder.stored_noise_floor(out)
    return folder.load_results(out, reused, frame), frame


def _calibration(model: str, parsed, calib: Path | None, samples, length, seed) -> dict:
    """The calibration values given (engine.record.settings.calibration_for fills in each spec's method's
    defaults: the same model as in every command), checked before the model loads; a --calib file as every text
    file a user names, at least one sequence long, its path absolute."""
    from engine.record.settings import calibration_for

    given = {"source": None, "samples": samples, "length": length, "seed": seed}
    length = calibration_for(None, **given).length  # bad values fail here
    return {**given, "source": checks.check_calib_file(calib, model, length)}


def _request(model: str, parsed, ctx: int, device: str, dtype: str, gpu_mem, gpus, use_cache: bool, given: dict):
    """The engine.run.open.PairRequest of a corpus KLD: its workload a window of --ctx tokens of full logits, its
    calibration the largest any spec uses (each spec is perturbed with its own, `given` over its method's
    defaults)."""
    from engine.record.settings import calibrations
    from engine.run.open import pair_request

    calibs = calibrations(parsed, **given).values()
    calib = max(calibs, key=lambda c: c["samples"] * c["length"], default={})
    workload = dict(max_new_tokens=1, lens="off", prompt_tokens=ctx, perplexity=ctx)
    return pair_request(model, parsed, device, dtype, gpu_mem, gpus, calib=calib, use_cache=use_cache, **workload)


def _check_corpus(model: str, parsed, device: str, body: str, ctx: int, stride, base, save_base, base_k, fmt):
    """Before the model loads: the base file (a truncated or foreign one fails here), the device and the specs,
    and, where the config is local, the corpus against the windows and the base file against the corpus.
    Returns the base file (engine.kld.base.BaseFile or engine.kld.llamacpp.LlamaCppBase) or None."""
    from engine.kld import corpus as kldmod

    base_file = None
    if base is not None:
        from engine.kld.llamacpp import open_base

        base_file = open_base(base)
    bos_first = getattr(base_file, "bos_first", False) or (save_base is not None and fmt == "llama.cpp")
    from engine.models.configs import config_int
    from engine.models.loading import load_tokenizer
    from engine.run.open import check_specs

    config = check_specs(model, parsed, device)
    if config is not None:
        tok = load_tokenizer(model)
        max_ctx = config_int(config, "max_position_embeddings")
        _ids, lay, _bos = kldmod.prepare(tok, body, ctx, stride, max_ctx, bos_first)
        if base_file is not None:
            from engine.models.tokens import embedding_rows

            base_file.check(tok, body, lay, embedding_rows(model, config), model)
        if save_base is not None and base_k is not None and base_k > len(tok):
            raise HieruiError(f"--base-k {base_k} is beyond the vocabulary ({len(tok)} tokens)")
    return base_file


def _kld_here(
    request,
    plan,
    body,
    corpus,
    ctx,
    stride,
    out,
    wanted,
    reused,
    base_file,
    save_base,
    base_k,
    calibration,
    base_format,
):
    """The specs scored in this process: beside the dense model (one dense forward per window serves them all) or
    against the base file (one perturbed copy in memory at a time, the tables written after each); --save-base
    writes the dense side. The models are opened by `request`, placed as `plan` says (engine.run.open). Specs
    OUT already holds (`reused`) are not scored again; with nothing else to do no model is loaded."""
    from hierui.views.kld import print_report

    stored, frame = _stored(request, body, corpus, ctx, stride, out, wanted, reused, base_file)
    todo = [p for p in request.specs if str(p) not in reused]
    if frame is not None and not todo and save_base is None:  # every spec is in OUT already
        _report_stored(request, out, wanted, stored, frame)
        return
    writer = None
    if save_base is not None:
        from engine.kld.base import BaseWriter
        from engine.kld.llamacpp import LlamaCppWriter

        writer = LlamaCppWriter(save_base) if base_format == "llama.cpp" else BaseWriter(save_base, base_k)
    try:
        rows, run, loaded = _score_here(
            request, plan, body, corpus, ctx, stride, out, wanted, stored, todo, base_file, writer, base_k, calibration
        )
    finally:
        if writer is not None and hasattr(writer, "discard"):
            writer.discard()  # a llama.cpp writer's rows, where the run stopped before the file was written
    if rows:
        worst = run.worst(loaded.tokenizer)
        print_report(console, run, rows, worst, out)
    if writer is not None:
        console.print(
            f"base file {save_base}: {writer.describe(len(run.positions))} (ctx {ctx}, stride {run.stride}), "
            f"{save_base.stat().st_size / 2**20:.1f} MiB",
            highlight=False,
        )


def _score_here(
    request, plan, body, corpus, ctx, stride, out, wanted, stored, todo, base_file, writer, base_k, calibration
):
    """_kld_here's scoring: (the summary rows, the KldRun, the dense model as loaded)."""
    from engine.kld import corpus as kldmod
    from engine.kld import folder
    from engine.run.open import open_dense, open_pair
    from hierui.progress import stage_progress

    with stage_progress(err_console) as (say, step):
        loaded = open_dense(request, plan, progress=step)
        parsed = todo
        if writer is not None and base_k is not None and base_k > len(loaded.tokenizer):
            raise HieruiError(f"--base-k {base_k} is beyond the vocabulary ({len(loaded.tokenizer)} tokens)")

        def perturbed(p):
            return open_pair(request, p, dense=loaded, calib=calibration.get(str(p), {}), progress=step)

        if base_file is None:
            pairs = [perturbed(p) for p in parsed]
            run = kldmod.score(loaded, pairs, body, corpus, ctx, stride, save_base=writer, progress=step)
        else:
            import gc

            from engine.sweep.folder import noise_floor

            run = None
            for p in parsed:
                pair = perturbed(p)
                part = kldmod.score(loaded, [pair], body, corpus, ctx, stride, base=base_file, progress=step)
                run = part if run is None else run.merged(part)
                del pair, part
                gc.collect()
                run.noise_floor = noise_floor(loaded.ref.name, loaded.model)
                folder.write_run(out, wanted, run, loaded.tokenizer, stored)  # a rerun resumes after this spec
        from engine.sweep.folder import noise_floor

        run.noise_floor = noise_floor(loaded.ref.name, loaded.model)
        if writer is not None:
            lay = kldmod.layout(len(run.ids), ctx, stride)
            writer.write(loaded.tokenizer, body, lay, loaded.ref.name, loaded.ref.cache_key())
        rows = folder.write_run(out, wanted, run, loaded.tokenizer, stored) if run.results or stored else []
    return rows, run, loaded


def _report_stored(request, out: Path, wanted: dict, stored: list, frame) -> None:
    """Every spec asked for is in OUT already: its tables written again (the same) and the report, no model loaded."""
    from engine.kld import folder
    from engine.models.loading import load_tokenizer
    from hierui.views.kld import print_report

    tokenizer = load_tokenizer(request.model)
    rows = folder.write_run(out, wanted, frame, tokenizer, stored)
    print_report(console, frame, rows, frame.worst(tokenizer), out)


def _kld_on_ray(request, plan, body, corpus, ctx, stride, out, wanted, reused, ray_options, base_file, calibration):
    """hierui kld --ray: the specs scored on the cluster (engine.kld.distributed), the tables and report as locally;
    the specs OUT already holds are not scored again."""
    from engine.kld import folder
    from engine.kld.distributed import score_on_ray
    from engine.models.loading import load_tokenizer
    from hierui.views.kld import print_report

    say = _say
    stored, frame = _stored(request, body, corpus, ctx, stride, out, wanted, reused, base_file)
    todo = [str(p) for p in request.specs if str(p) not in reused]
    if frame is not None and not todo:
        _report_stored(request, out, wanted, stored, frame)
        return
    run = score_on_ray(
        request.model,
        todo,
        body,
        corpus,
        ctx,
        stride,
        ray_options,
        device=request.device,
        dtype=request.dtype,
        use_cache=request.use_cache,
        base=str(base_file.path.resolve()) if base_file is not None else None,  # the workers' cwd differs
        say=say,
        plan=plan.summary() if plan is not None else None,  # workers stream when the driver's plan says so
        calibration=calibration,
    )
    tokenizer = load_tokenizer(request.model)
    rows = folder.write_run(out, wanted, run, tokenizer, stored)
    print_report(console, run, rows, run.worst(tokenizer), out)
