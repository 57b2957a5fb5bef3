"""Writing a perturbed model as a standard transformers checkpoint (`hierui prune --save DIR`).

The result loads with `from_pretrained(DIR)` and with `--prune checkpoint:DIR`. A model with streamed layers
(engine.place.streaming) is written as a sharded checkpoint, one shard of what is resident and one per decoder layer,
each layer read from its files in turn: as transformers' save_pretrained would write it, without ever holding
more than one layer's weights.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from engine.errors import HieruiError


def save_checkpoint(pair, directory: Path) -> Path:
    spec = pair.spec
    if not spec.declared.saves:
        raise HieruiError(f"{spec} models are quantized on the fly and not saved; use --prune {spec} directly")
    from engine.place.streaming import is_streamed
    from engine.record.paths import atomic_files

    directory = Path(directory)
    model = pair.perturbed
    if spec.family == "drop":
        from engine.perturb.drop import standard_equivalent

        model = standard_equivalent(pair.dense, pair.perturbed, pair.report.details)
    # written into a fresh folder inside DIR, then each file renamed into DIR: a link planted at a file's name is
    # replaced, never written through; a failed write (a full disk) is one line and leaves none of the files
    with atomic_files(directory) as partial:
        if is_streamed(model):  # its layers are on disk: written one layer at a time, never gathered
            save_streamed(model, partial)
        else:
            model.save_pretrained(str(partial), safe_serialization=True)
        pair.tokenizer.save_pretrained(str(partial))
        report = pair.report.to_dict() if pair.report is not None else {}
        (partial / "hierui-perturbation.json").write_text(json.dumps(report, indent=1, default=str))
    return directory


def save_streamed(model, directory: Path) -> None:
    """`model.save_pretrained(directory)` for a streamed model: the resident tensors (tied ones once, as
    save_pretrained keeps them) in model-00001-of-0000N.safetensors, decoder layer i in shard i + 2, each read
    (its own tensors where pruned, else the dense files') and written before the next is read;
    model.safetensors.index.json maps every name to its shard; config and generation config beside them."""
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    from engine.anatomy.linears import decoder_layers
    from engine.place.streaming import in_memory, layer_state, resident_state, write_safetensors

    total = len(decoder_layers(model)) + 1
    weight_map: dict[str, str] = {}
    size = 0
    for number in range(total):
        if number == 0:
            tensors = remove_tied_weights_from_state_dict(resident_state(model), model)
        else:
            tensors = layer_state(model, number - 1)
        tensors = _checkpoint_names(model, tensors)
        shard = f"model-{number + 1:05d}-of-{total:05d}.safetensors"
        # not safetensors' save_file: it copies every tensor of the shard first (the resident embeddings too)
        write_safetensors(directory / shard, in_memory(tensors), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, shard))
        size += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors  # before the next layer is read
    index = {"metadata": {"total_parameters": model.num_parameters(), "total_size": size}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    _save_configs(model, directory)


def _checkpoint_names(model, tensors: dict) -> dict:
    """`tensors` under the names of the checkpoint format (transformers reverts the renaming and fusing its
    loading applied, e.g. of MoE experts, as save_pretrained does for an offloaded model: shard by shard), each
    contiguous on the CPU as safetensors writes it."""
    from transformers.core_model_loading import revert_weight_conversion

    tensors = {name: t.detach().cpu() for name, t in tensors.items()}
    for name in getattr(model, "_keys_to_ignore_on_save", None) or ():
        tensors.pop(name, None)
    return {name: t.contiguous() for name, t in revert_weight_conversion(model, tensors).items()}


def _save_configs(model, directory: Path) -> None:
    """The config (with the dtype and architecture save_pretrained records) and the generation config."""
    config = copy.deepcopy(model.config)
    config.dtype = str(model.dtype).removeprefix("torch.")
    config.architectures = [type(model).__name__]
    config.save_pretrained(str(directory))
    if model.can_generate() and getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(str(directory))
