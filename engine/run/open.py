"""The one way to open a pair: a request checked before anything slow, its memory plan, the dense model loaded
placed by that plan (one device, one device_map over several GPUs, or decoder layers streamed from disk) and each
perturbed copy made through the cache.

Every command opens its models here: `explore`, `batch` (locally and in every Ray worker), `replay --rerun`,
`attribute`, `kld` (locally and on Ray), `check`, `prune`, and `noise` through the dense-only form (one load per
dtype it measures). A sweep of S specs opens the dense model once (`open_dense`) and each perturbed copy with
`open_pair(request, spec, dense=...)`.

    request = pair_request(model, specs, device=…, dtype=…, gpu_mem="600MiB", gpus=None, calib=…, …)
    plan = plan_pair(request)              # None where the model's config is not known before loading
    dense = open_dense(request, plan)      # placed as the plan says
    pair = open_pair(request, spec, dense=dense, plan=plan)

`gpu_mem` is the accelerator's budget per GPU (`--gpu-mem`; on a CPU a simulated one): a pair above it streams
its decoder layers, as `hierui plan` predicts. `gpus` (`--gpus`) is how many GPUs the pair spreads over (default:
every visible one for `auto` and `cuda`, one for `cuda:N`).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

from engine.errors import HieruiError
from engine.models.configs import check_tokenizer_files, check_weight_files, read_config
from engine.models.devices import check_device, check_dtype, pick_device
from engine.models.names import resolve
from engine.perturb.spec import Spec, check_fits, check_streamable, parse_spec, unperturbed
from engine.run.plan import PROMPT_TOKENS, parse_size, plan_for_run, planned_device_map, plans_streaming, remember
from engine.run.plan import check_gpus as plan_check_gpus

Progress = Callable[..., None]


@dataclass(frozen=True)
class Workload:
    """What the run will do with the pair, for its memory plan (engine.run.plan.estimate)."""

    batch_size: int = 1
    max_new_tokens: int = 64
    lens: str = "all"  # the lens mode (engine.record.settings.LENS_MODES)
    prompt_tokens: int = PROMPT_TOKENS
    perplexity: int = 0  # a window of full logits (prune's perplexity, kld's --ctx), 0 for none


@dataclass(frozen=True)
class PairRequest:
    """Everything needed to open a pair, already checked (pair_request)."""

    model: str
    specs: tuple[Spec, ...] = ()
    device: str = "auto"
    dtype: str = "auto"
    gpu_mem: int | None = None  # bytes per GPU (--gpu-mem), None: the device's own memory
    gpus: int | None = None  # --gpus; None: every visible GPU for auto/cuda
    calib: dict = field(default_factory=dict)  # engine.record.settings.CalibSettings.to_dict()
    use_cache: bool = True
    workload: Workload = Workload()


def check_gpus(gpus: int | None, device: str) -> int | None:
    """--gpus: at least 1, and more only with as many CUDA GPUs present and a CUDA device (the plan's check,
    engine.run.plan.check_gpus, made before anything slow)."""
    if gpus is not None:
        plan_check_gpus(pick_device(device), gpus, None)
    return gpus


def pair_request(
    model: str,
    specs=(),
    device: str = "auto",
    dtype: str = "auto",
    gpu_mem: str | int | None = None,
    gpus: int | None = None,
    calib: dict | None = None,
    use_cache: bool = True,
    source: dict[str, str] | None = None,
    **workload,
) -> PairRequest:
    """A PairRequest with every input checked before anything slow: the model name (an unknown one fails here),
    the specs (grammar, a checkpoint's path, the spec against the model's config where it is known), the device,
    the dtype, --gpus and --gpu-mem. `workload`: Workload's fields. `source`: where the model, spec or dtype
    came from when the user did not type it ({"model": "s.jsonl: the session's model", "spec": …, "dtype": …}):
    an error about that value starts with its label and blames no option (check_specs)."""
    with blamed(source, "model"):
        resolve(model)
    with blamed(source, "spec"):
        parsed = tuple(parse_spec(s) if isinstance(s, str) else s for s in specs)
    check_device(device)
    with blamed(source, "dtype"):
        check_dtype(dtype)
    request = PairRequest(model, parsed, device, dtype, None, None, dict(calib or {}), use_cache, Workload(**workload))
    request = budget(request, gpu_mem, gpus)
    check_specs(model, parsed, device, source)
    return request


@contextmanager
def blamed(source: dict[str, str] | None, what: str):
    """A HieruiError about `what` ("model", "spec", "dtype") raised inside, led by `source[what]` where the value
    came from a file (a session header, a kld folder) rather than an option the user typed."""
    try:
        yield
    except HieruiError as e:
        if not source or what not in source:
            raise
        raise HieruiError(f"{source[what]}: {e}", e.exit_code) from None


def check_specs(model: str, specs, device: str, source: dict[str, str] | None = None) -> dict | None:
    """The checks that need only the arguments, the config and the file system: the device, each spec's
    checkpoint path, each spec against the model's config.json where it can be read without a download. Returns
    that config (None: not known before loading). `source`: as pair_request's."""
    check_device(device)
    config = read_config(model)
    check_tokenizer_files(model)
    check_weight_files(model)
    for spec in specs:
        if spec.declared.takes_path:
            try:
                resolve(spec.path)  # a local checkpoint that is not there fails here
                check_weight_files(spec.path)  # and one whose weight files are broken
            except HieruiError as e:
                where = (source or {}).get("spec") or "--prune"  # an option's value or a file's
                raise HieruiError(f"{where} {spec}: {e}") from None
        with blamed(source, "spec"):
            check_fits(spec, config)
    return config


def check_budget(gpu_mem: str | int | None, gpus: int | None, device: str) -> tuple[int | None, int | None]:
    """The memory budget the user gave, checked: --gpu-mem in bytes (a size such as 24GiB; one line, exit 2, for a
    malformed one) and --gpus (against the GPUs present and the device)."""
    return (parse_size(gpu_mem) if isinstance(gpu_mem, str) else gpu_mem), check_gpus(gpus, device)


def budget(request: PairRequest, gpu_mem: str | int | None, gpus: int | None) -> PairRequest:
    """`request` with the memory budget the user gave (check_budget)."""
    size, gpus = check_budget(gpu_mem, gpus, request.device)
    return replace(request, gpu_mem=size, gpus=gpus)


def plan_pair(request: PairRequest, strict: bool = True):
    """The request's memory plan (engine.run.plan.Plan; None where the config is not known before loading),
    remembered for an out-of-memory message. A pair that cannot fit even streamed, or (`strict`) a streamed one
    with a spec that cannot stream: one line, exit 2, here (hierui check, not strict, reports such a spec n/a)."""
    w = request.workload
    plan = plan_for_run(
        request.model,
        list(request.specs) or [unperturbed()],
        request.device,
        request.dtype,
        request.calib,
        batch_size=w.batch_size,
        max_new_tokens=w.max_new_tokens,
        lens=w.lens,
        prompt_tokens=w.prompt_tokens,
        perplexity=w.perplexity,
        gpu_mem=request.gpu_mem,
        gpus=request.gpus,
    )
    if strict and plans_streaming(plan):
        check_streamable(request.specs)
    remember(plan)
    return plan


def _summary(plan) -> dict | None:
    return plan.summary() if hasattr(plan, "summary") else plan


def open_dense(request: PairRequest, plan=None, progress: Progress | None = None):
    """The dense model (engine.models.loading.LoadedModel), placed as `plan` says (a Plan or its summary dict, as a
    sweep's manifest keeps it; None: one device): its decoder layers streamed, or dispatched by the plan's
    device_map. The loaded model keeps the plan's summary as `.plan`."""
    from engine.models.loading import load

    placed = {"streamed": plans_streaming(plan), "device_map": planned_device_map(plan)}
    loaded = load(request.model, device=request.device, dtype=request.dtype, progress=progress, **placed)
    loaded.plan = _summary(plan)
    return loaded


def open_pair(
    request: PairRequest,
    spec: Spec | str | None = None,
    dense=None,
    plan=None,
    calibration=None,
    calib: dict | None = None,
    progress: Progress | None = None,
):
    """The ModelPair of `spec` (default: the request's only spec) over `dense` (opened here when None), perturbed
    through the cache (engine.perturb.perturb). `calibration`: a Calibration several specs share; `calib`: the
    calibration options for this spec when they differ from the request's. The pair keeps the plan's summary as
    `.plan` (every session header records it)."""
    from engine.perturb import perturb

    if spec is None:
        if len(request.specs) != 1:
            raise ValueError("open_pair needs the spec when the request has several")
        spec = request.specs[0]
    plan = plan if plan is not None else getattr(dense, "plan", None)
    dense = dense if dense is not None else open_dense(request, plan, progress)
    pair = perturb(
        dense,
        spec,
        calibration=calibration,
        use_cache=request.use_cache,
        progress=progress,
        calib_options=calib if calib is not None else request.calib,
    )
    pair.plan = _summary(plan)
    return pair
