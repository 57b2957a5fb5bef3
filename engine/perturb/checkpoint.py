"""checkpoint:PATH: an already-perturbed model from elsewhere, compared against the dense --model.

The checkpoint is loaded like any --model (engine.models.load) on the dense model's device and dtype,
checked for compatibility (same output vocabulary, same hidden size), and then every parameter that is
bit-identical to the dense parameter of the same name is replaced by the dense model's own tensor, so
untouched embeddings, norms and LM head are held once. Tied weights stay tied: a parameter object
reached under several names is replaced everywhere it is used.
"""

from __future__ import annotations

from pathlib import Path

from engine.errors import HieruiError, one_line

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_checkpoint(loaded, spec, progress=None):
    """The model at `spec.path`, sharing with `loaded.model` every tensor the two have in common."""
    from engine.models import load, resolve

    say = progress or (lambda _msg: None)
    path = spec.path
    try:
        resolve(path)
    except HieruiError:
        if not Path(path).expanduser().exists():
            raise HieruiError(f"checkpoint not found: {path}") from None
        raise
    dense = loaded.model
    devices = set((getattr(dense, "hf_device_map", None) or {}).values())
    say(f"loading checkpoint {path}")
    try:
        ckpt = load(
            path,
            device=str(loaded.device),
            dtype=str(loaded.dtype).removeprefix("torch."),
            device_map="auto" if len(devices) > 1 else None,
            progress=say,
        ).model
    except HieruiError:
        raise
    except Exception as e:  # a broken or foreign directory: one line, with the likely cause
        hint = ""
        if Path(path).is_dir() and not any((Path(path) / f).is_file() for f in TOKENIZER_FILES):
            hint = " (it has no tokenizer files: save the tokenizer there too)"
        raise HieruiError(f"could not load checkpoint {path}{hint}: {one_line(e)}") from None
    _check_compatible(dense, ckpt, path)
    share_identical(dense, ckpt)
    ckpt.eval()
    ckpt.requires_grad_(False)
    return ckpt


def _dims(model) -> dict:
    return {
        "output vocabulary": model.get_output_embeddings().weight.shape[0],
        "hidden size": model.get_input_embeddings().weight.shape[1],
    }


def _check_compatible(dense, ckpt, path: str) -> None:
    d, c = _dims(dense), _dims(ckpt)
    diff = [f"{k} {c[k]} vs {d[k]}" for k in d if d[k] != c[k]]
    if diff:
        raise HieruiError(f"checkpoint {path} does not match the dense model: {', '.join(diff)} (checkpoint vs dense)")


def share_identical(dense, ckpt) -> int:
    """Point every parameter of `ckpt` that equals the dense one of the same name at the dense tensor.

    Returns how many parameter objects were replaced. Names are taken with duplicates, so a tied
    parameter (LM head = embeddings) is decided once and replaced under every name it has.
    """
    import torch

    dense_params = dict(dense.named_parameters(remove_duplicate=False))
    swap: dict[int, object] = {}
    for name, p in ckpt.named_parameters(remove_duplicate=False):
        d = dense_params.get(name)
        if id(p) in swap or d is None or d is p:
            continue
        if d.shape == p.shape and d.dtype == p.dtype and d.device == p.device and torch.equal(d.detach(), p.detach()):
            swap[id(p)] = d
    for module in ckpt.modules():
        for attr, p in list(module._parameters.items()):
            if p is not None and id(p) in swap:
                module._parameters[attr] = swap[id(p)]
    return len(swap)
