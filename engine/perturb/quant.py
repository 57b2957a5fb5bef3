"""int8 / nf4: replace the decoder linears of the sharing clone with bitsandbytes quantized linears.

Every linear inside the decoder layers (attention q/k/v/o, MLP gate/up/down) becomes the bitsandbytes
module built from the dense weight, on the device where that weight lives (CPU included); embeddings,
norms and the LM head stay shared with the dense model.

- `int8`: `bnb.nn.Linear8bitLt`, `has_fp16_weights=False`, `threshold=0.0` (bitsandbytes' default):
  LLM.int8()'s vector-wise quantization of weights (per output row) and activations (per token), with
  no fp16 outlier decomposition, so every column goes through int8. (transformers' `load_in_8bit`
  defaults to threshold 6.0, which computes activation outlier columns in fp16.)
- `nf4`: `bnb.nn.Linear4bit`, `quant_type="nf4"`, blocksize 64, no double quantization of the scales
  (the defaults of transformers' BitsAndBytesConfig), compute dtype = the model's dtype.

The dense weights are never touched: each weight is copied before quantization and the new module
gets its own Parameter objects (bias included), so nothing bitsandbytes does in place reaches them.
"""

from __future__ import annotations

import logging

from engine.errors import HieruiError, one_line
from engine.perturb.linears import decoder_layers, layer_linears

INT8_THRESHOLD = 0.0
NF4_BLOCKSIZE = 64
NF4_DOUBLE_QUANT = False


def quantize(clone, spec) -> dict:
    """Swap every decoder linear of `clone` for its bitsandbytes version; say what was done."""
    import torch

    bnb = _import_bnb()
    dtype = next(clone.parameters()).dtype
    count = 0
    probed: set = set()
    for layer in decoder_layers(clone):
        for name, linear in layer_linears(layer).items():
            device = linear.weight.device
            if device.type == "meta":
                raise HieruiError(
                    f"cannot quantize {name}: its weight is offloaded (meta device); load the model on one device"
                )
            new = _int8_linear(bnb, linear) if spec.method == "int8" else _nf4_linear(bnb, linear, dtype)
            new.train(linear.training)
            new.requires_grad_(False)
            layer.set_submodule(name, new)
            if device not in probed:  # fail here with one line, not later in the middle of stepping
                _probe(new, spec.method, device, dtype, torch)
                probed.add(device)
            count += 1
    details = {
        "quantized_linears": count,
        "bits": 8 if spec.method == "int8" else 4,
        "backend": f"bitsandbytes {bnb.__version__}",
    }
    if spec.method == "int8":
        details["threshold"] = INT8_THRESHOLD
    else:
        details.update(
            quant_type="nf4",
            blocksize=NF4_BLOCKSIZE,
            double_quant=NF4_DOUBLE_QUANT,
            compute_dtype=str(dtype).removeprefix("torch."),
        )
    return details


class _QuietCast(logging.Filter):
    """Drops the warning MatMul8bitLt logs on every forward whose input is not float16 (it is by design)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("MatMul8bitLt: inputs will be cast")


_QUIET_CAST = _QuietCast()


def _import_bnb():
    """bitsandbytes, or one line saying why not.

    Two notices that would otherwise reach stderr are silenced: the import-time one about an optional
    CPU kernel package (`kernels`; the built-in CPU kernels are used instead), and the per-call one
    saying int8 casts float32/bfloat16 inputs to float16 before quantizing them.
    """
    log = logging.getLogger("bitsandbytes")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        import bitsandbytes as bnb
    except Exception as e:  # ImportError, or a failing native library
        raise HieruiError(f"int8/nf4 need bitsandbytes, which failed to import: {one_line(e)}", 1) from None
    finally:
        log.setLevel(level)
    cast_log = logging.getLogger("bitsandbytes.autograd._functions")
    if _QUIET_CAST not in cast_log.filters:
        cast_log.addFilter(_QUIET_CAST)
    return bnb


def _own_bias(linear):
    """A new Parameter over the dense bias tensor (shared memory, but its own object)."""
    import torch.nn as nn

    return None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)


def _int8_linear(bnb, linear):
    import torch

    w = linear.weight.detach().to(dtype=torch.float16, copy=True)
    cb, scb, _ = bnb.functional.int8_vectorwise_quant(w)  # int8 rows and their absmax scales
    new = bnb.nn.Linear8bitLt(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        has_fp16_weights=False,
        threshold=INT8_THRESHOLD,
        device="meta",
    )
    new.weight = bnb.nn.Int8Params(cb, requires_grad=False, has_fp16_weights=False, CB=cb, SCB=scb)
    new.bias = _own_bias(linear)
    return new


def _nf4_linear(bnb, linear, dtype):
    import torch

    w = linear.weight.detach().clone()
    packed, state = bnb.functional.quantize_4bit(
        w, blocksize=NF4_BLOCKSIZE, compress_statistics=NF4_DOUBLE_QUANT, quant_type="nf4", quant_storage=torch.uint8
    )
    new = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        compute_dtype=dtype,
        compress_statistics=NF4_DOUBLE_QUANT,
        quant_type="nf4",
        quant_storage=torch.uint8,
        device="meta",
    )
    new.weight = bnb.nn.Params4bit(
        packed,
        requires_grad=False,
        quant_state=state,
        blocksize=NF4_BLOCKSIZE,
        compress_statistics=NF4_DOUBLE_QUANT,
        quant_type="nf4",
        quant_storage=torch.uint8,
        module=new,
        bnb_quantized=True,
    )
    new.quant_state = state
    new.bias = _own_bias(linear)
    return new


def _probe(module, method: str, device, dtype, torch) -> None:
    """One tiny forward pass through a fresh quantized linear; a backend that cannot run it is one line."""
    try:
        with torch.no_grad():
            module(torch.zeros(1, module.in_features, device=device, dtype=dtype))
    except Exception as e:
        raise HieruiError(
            f"bitsandbytes cannot run {method} on {device} with {str(dtype).removeprefix('torch.')}: {one_line(e)}", 1
        ) from None
