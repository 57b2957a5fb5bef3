"""--device and --dtype: checked before anything slow, picked for loading, and where from_pretrained places a model."""

from __future__ import annotations

from engine.errors import HieruiError

# what --device and --dtype accept, as the errors and the CLI's help say it (one wording, here)
DEVICE_CHOICES = "auto, cpu, cuda, cuda:N or mps"
DTYPE_CHOICES = "auto, float32, bfloat16 or float16"


def check_device(device: str) -> str:
    """Check a --device string before anything slow: auto, cpu, cuda, cuda:N or mps, and that the GPU it
    names is there. Returns it lower-cased. torch is imported only for cuda/mps (to ask whether they exist)."""
    import re

    text = (device or "auto").strip().lower()
    if text in ("auto", "cpu"):
        return text
    match = re.fullmatch(r"cuda(?::([0-9]+))?", text)
    if match:
        import torch

        if not torch.cuda.is_available():
            raise HieruiError(f"device '{device}' asked for, but no CUDA GPU is available here; use --device cpu")
        if match.group(1) is not None and int(match.group(1)) >= torch.cuda.device_count():
            raise HieruiError(f"device '{device}' does not exist: {torch.cuda.device_count()} GPU(s) here")
        return text
    if text == "mps":
        import torch

        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise HieruiError(
                f"device '{device}' asked for, but no Apple GPU (MPS) is available here; use --device cpu"
            )
        return text
    raise HieruiError(f"unknown device '{device}': use {DEVICE_CHOICES}")


def pick_device(device: str = "auto"):
    import torch

    device = check_device(device)  # the one check of a device string (also called before anything slow)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
}


def check_dtype(dtype: str | None) -> str | None:
    """`--dtype`: auto or a dtype name DTYPES knows (None: the command's own default, e.g. the recorded one); one
    line (exit 2) for anything else. Returns it as given."""
    if dtype is not None and dtype.strip().lower() != "auto" and dtype.strip().lower() not in DTYPES:
        raise HieruiError(f"unknown dtype '{dtype}': use {DTYPE_CHOICES}")
    return dtype


def pick_dtype(dtype: str, device):
    import torch

    dtype = (dtype or "auto").lower()
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise HieruiError(f"unknown dtype '{dtype}': use {DTYPE_CHOICES}")
    return getattr(torch, DTYPES[dtype])


def placement_kwargs(device, device_map: str | dict | None) -> dict:
    """from_pretrained kwargs: the device_map given (engine.run.plan's, {module name: GPU index}), else accelerate's
    device_map='auto' when several GPUs are present (a model whose config was not known before loading)."""
    import torch

    if device_map:
        return {"device_map": device_map}
    if device.type == "cuda" and device.index is None and torch.cuda.device_count() > 1:
        return {"device_map": "auto"}
    return {}
