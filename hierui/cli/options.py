"""The options that several commands share, declared once: their help texts and `Annotated` types.

A command takes a shared option as one parameter line, with its default in the signature:

    def kld(model: options.Model = "smollm2-135m", device: options.Device = "auto", gpu_mem: options.GpuMem = None)

Where commands word an option differently (replay's "--rerun: …" prefix, the extra words of a repeatable
`--prune`), a small function here builds the type with that wording; the shared part of the text still lives only here.
"""

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from engine.models.devices import DEVICE_CHOICES, DTYPE_CHOICES
from engine.record.settings import CALIB_LENGTH, CALIB_SEED, LENS_HELP, LENS_MODES, calib_samples_help

MODEL_HELP = (
    "alias (smollm2-135m, llama-7b, …), tiny-random[:FAMILY], random:SHAPE, local directory, .gguf file or hub id"
)
SPEC_HELP = (
    "perturbation: wanda:0.5, sparsegpt:0.5, magnitude:2:4, attndrop:4, mlpdrop:4, blockdrop:4, int8, nf4, "
    "checkpoint:DIR, none"
)
DEVICE_HELP = DEVICE_CHOICES  # what engine.models.devices.check_device accepts
DTYPE_HELP = DTYPE_CHOICES
CALIB_HELP = "plain-text calibration file (default: sequences sampled from the dense model)"
CALIB_LEN_HELP = f"tokens per calibration sequence (default {CALIB_LENGTH})"
CALIB_SEED_HELP = f"seed of the self-generated calibration and of a --calib file's windows (default {CALIB_SEED})"
NO_CACHE_HELP = "recompute calibration and pruned weights"
GPU_MEM_HELP = (
    "the device's memory budget, e.g. 24GiB, 512MiB (default: the GPU's free memory): a pair whose predicted peak "
    "is above it runs with its decoder layers streamed from disk one at a time; on a CPU it simulates a smaller "
    "device (the layers are streamed the same way)"
)
GPUS_HELP = "GPUs to spread the pair over, one device_map for both models (default: every visible one)"
SESSION_HELP = "a session file (.jsonl), or a directory of sessions (a `hierui batch` output)"
NO_LENS_HELP = "the same as --lens off"
TRUNCATE_HELP = "a prompt longer than the context allows: keep its last tokens (default: refuse)"
COUNTERFACTUAL_HELP = (
    "free mode: at the first divergence, branch, feeding the perturbed model the dense token, and record whether "
    "the texts agree again (recovered, recovery_steps)"
)
TIE_MARGIN_HELP = (
    "a flip whose dense top-1/top-2 probability margin is below this is a near tie "
    "(default: the model's noise floor from hierui noise, else a default for its dtype)"
)
KIND_HELP = "only this kind: pruned (weights), scores (drop scores) or calib (calibration batches)"


# ------------------------------------------------------------------ the model and its perturbation


def model(help: str = MODEL_HELP) -> Any:
    """`--model/-m` with this help text (batch says what its default is)."""
    return Annotated[Optional[str], typer.Option("--model", "-m", help=help)]


Model = Annotated[str, typer.Option("--model", "-m", help=MODEL_HELP)]
Spec = Annotated[str, typer.Option("--prune", "-p", help=SPEC_HELP)]


def specs(more: str) -> Any:
    """A repeatable `--prune/-p`; `more` says what repeating it does and its default."""
    return Annotated[Optional[list[str]], typer.Option("--prune", "-p", help=SPEC_HELP + more)]


# replay --rerun and attribute reload a session's models: a path or hub id the session names is used only when
# given again with these (a session file is not trusted to steer what is read)
def confirmed_model(prefix: str = "") -> Any:
    help = f"{prefix}the model to load (confirms a local path or hub id the session names)"
    return Annotated[Optional[str], typer.Option("--model", "-m", help=help)]


def confirmed_calib(prefix: str = "") -> Any:
    help = f"{prefix}the calibration text file (confirms the one the session names)"
    return Annotated[Optional[Path], typer.Option("--calib", help=help)]


def confirmed_spec(prefix: str = "") -> Any:
    help = f"{prefix}the perturbation spec (confirms a checkpoint:PATH the session names)"
    return Annotated[Optional[str], typer.Option("--prune", "-p", help=help)]


# ------------------------------------------------------------------ where and how the models run


def device(prefix: str = "") -> Any:
    """`--device`; `prefix` names the mode it applies to (replay's "--rerun: ")."""
    return Annotated[str, typer.Option("--device", help=prefix + DEVICE_HELP)]


Device = device()
Dtype = Annotated[str, typer.Option("--dtype", help=DTYPE_HELP)]


def recorded_dtype(prefix: str = "") -> Any:
    """`--dtype` of a command that reloads a session's models: by default the dtype the session recorded."""
    return Annotated[Optional[str], typer.Option("--dtype", help=f"{prefix}{DTYPE_HELP} (default: the recorded dtype)")]


def gpu_mem(help: str = GPU_MEM_HELP) -> Any:
    """`--gpu-mem` (a size such as 24GiB, parsed by engine.run.plan.parse_size)."""
    return Annotated[Optional[str], typer.Option("--gpu-mem", help=help, show_default=False)]


def gpus(help: str = GPUS_HELP) -> Any:
    """`--gpus`: how many GPUs one device_map spreads the pair over."""
    return Annotated[Optional[int], typer.Option("--gpus", help=help, show_default=False)]


GpuMem = gpu_mem()
Gpus = gpus()


# ------------------------------------------------------------------ calibration and the caches


Calib = Annotated[Optional[Path], typer.Option("--calib", help=CALIB_HELP)]


def calib_samples(min: Optional[int] = 1) -> Any:
    """`--calib-samples`, whose help states the default per method (engine.record.settings.calib_samples_help:
    the same in every command)."""
    return Annotated[Optional[int], typer.Option("--calib-samples", min=min, help=calib_samples_help())]


def calib_len(min: Optional[int] = 2) -> Any:
    return Annotated[Optional[int], typer.Option("--calib-len", min=min, help=CALIB_LEN_HELP)]


CalibSamples = calib_samples()
CalibLen = calib_len()
# the seed of the calibration; `--seed` is the sampling seed (batch, explore) and nothing else
CalibSeed = Annotated[Optional[int], typer.Option("--calib-seed", help=CALIB_SEED_HELP, show_default=False)]


def no_cache(prefix: str = "") -> Any:
    return Annotated[bool, typer.Option("--no-cache", help=prefix + NO_CACHE_HELP)]


NoCache = no_cache()
Kind = Annotated[Optional[str], typer.Option("--kind", help=KIND_HELP)]


# ------------------------------------------------------------------ stepping, sessions, outputs


def lens(default: str, more: str = "") -> Any:
    """`--lens all|sampled|off` (engine.record.settings.LENS_MODES); the help says what each word computes, and
    what the command does by default (`default`, `more`)."""
    words = "; ".join(f"{word}: {LENS_HELP[word]}" for word in LENS_MODES)
    help = f"the logit lens per layer (lens_kl …) at which steps: {words} (default {default}{more})"
    return Annotated[Optional[str], typer.Option("--lens", help=help, show_default=False, metavar="all|sampled|off")]


NoLens = Annotated[bool, typer.Option("--no-lens", help=NO_LENS_HELP)]
TieMargin = Annotated[Optional[float], typer.Option("--tie-margin", help=TIE_MARGIN_HELP, show_default=False)]
Session = Annotated[Path, typer.Argument(help=SESSION_HELP, show_default=False)]


# ------------------------------------------------------------------ a corpus in windows (kld, sensitivity)


Text = Annotated[Optional[Path], typer.Option("--text", help="a UTF-8 text file to score")]
Suite = Annotated[Optional[str], typer.Option("--suite", help="a shipped corpus: heldout (the default)")]
Ctx = Annotated[int, typer.Option("--ctx", help="tokens per window; the second half of each is scored")]
Stride = Annotated[Optional[int], typer.Option("--stride", help="tokens between window starts (default --ctx)")]


def out(help: str) -> Any:
    """`--out/-o`: a file or a folder, as `help` says."""
    return Annotated[Optional[Path], typer.Option("--out", "-o", help=help)]
