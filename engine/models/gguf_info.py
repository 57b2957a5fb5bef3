"""What a GGUF file holds, read from its tensor table (never from its name): its size on disk, each quantization
type's share of the weights and the bits per weight, for `hierui kld`'s table of candidates by size."""

from __future__ import annotations

from pathlib import Path


def describe_gguf(path: str | Path) -> dict:
    """{"file_size": bytes on disk, "bits_per_weight": 8 · tensor bytes / weights over every tensor (as llama.cpp
    reports a model's BPW), "types": {type name: weights of that type}, most weights first}."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    types: dict[str, int] = {}
    weights = size = 0
    for tensor in reader.tensors:
        n = int(tensor.n_elements)
        types[tensor.tensor_type.name] = types.get(tensor.tensor_type.name, 0) + n
        weights += n
        size += int(tensor.n_bytes)
    return {
        "file_size": Path(path).stat().st_size,
        "bits_per_weight": 8 * size / weights if weights else None,
        "types": dict(sorted(types.items(), key=lambda kv: -kv[1])),
    }


def types_label(types: dict[str, int] | None) -> str:
    """ "Q5_0 71% · Q6_K 20% · F32 9%": each type's share of the weights (types under 1% left out)."""
    if not types:
        return ""
    total = sum(types.values())
    return " · ".join(f"{name} {n / total:.0%}" for name, n in types.items() if n / total >= 0.01)
