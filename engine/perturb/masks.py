"""Mask selection shared by the pruning methods. A mask is True where a weight is pruned.

Entries are chosen by index (topk), never by `score <= threshold`: de-quantized weights have many exact
ties, and a threshold would prune more than asked. Unsorted top-k: which entries it picks does not depend on
sorting them, which only costs time.
"""

from __future__ import annotations

import torch


def lowest_per_matrix(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the int(numel * sparsity) lowest scores of the whole matrix (one threshold per matrix)."""
    return lowest_k(score, int(score.numel() * sparsity))


def _lowest_per_row(score: torch.Tensor, sparsity: float) -> torch.Tensor | None:
    """The indices [rows, k] of the int(cols * sparsity) lowest scores of every row (None when k is 0)."""
    k = int(score.shape[1] * sparsity)
    return torch.topk(score, k, dim=1, largest=False, sorted=False).indices if k > 0 else None


def _n_of_m(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """The indices [rows, cols / m, m - n] of the m - n lowest scores of every group of m consecutive inputs."""
    rows, cols = score.shape
    if cols % m:
        raise ValueError(f"N:M pruning needs the input size ({cols}) to be a multiple of M={m}")
    return torch.topk(score.reshape(rows, cols // m, m), m - n, dim=2, largest=False, sorted=False).indices


def lowest_per_row(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the int(cols * sparsity) lowest scores of every output row (Wanda's comparison group)."""
    mask = torch.zeros_like(score, dtype=torch.bool)
    index = _lowest_per_row(score, sparsity)
    if index is not None:
        mask.scatter_(1, index, True)
    return mask


def n_of_m(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Semi-structured N:M: in every group of m consecutive inputs of a row keep the n highest scores."""
    rows, cols = score.shape
    index = _n_of_m(score, n, m)
    return (
        torch.zeros(rows, cols // m, m, dtype=torch.bool, device=score.device).scatter_(2, index, True).view(rows, cols)
    )


def zero_lowest_per_row(weight: torch.Tensor, score: torch.Tensor, sparsity: float, n=None, m=None) -> torch.Tensor:
    """A new `weight` ([out, in]) with the entries `lowest_per_row(score, sparsity)` (or, with `n` and `m`,
    `n_of_m(score, n, m)`) prunes set to zero: the same entries, written by index, without a mask."""
    rows, cols = weight.shape
    if n is not None:
        return weight.reshape(rows, cols // m, m).scatter(2, _n_of_m(score, n, m), 0.0).reshape(rows, cols)
    index = _lowest_per_row(score, sparsity)
    return weight.clone() if index is None else weight.scatter(1, index, 0.0)


def lowest_k(score: torch.Tensor, k: int) -> torch.Tensor:
    """Prune exactly the k lowest scores of the whole tensor."""
    mask = torch.zeros(score.numel(), dtype=torch.bool, device=score.device)
    if k > 0:
        mask[torch.topk(score.flatten(), k, largest=False, sorted=False).indices] = True
    return mask.view_as(score)


def magnitude_mask(weight: torch.Tensor, spec) -> torch.Tensor:
    """Magnitude pruning's mask (engine.perturb.magnitude), True where pruned: one threshold per matrix at
    `spec.sparsity` (unstructured), or per group of M inputs (`spec.n`, `spec.m`). `weight` is [out, in] (a
    WeightView's matrix)."""
    score = weight.detach().abs().float()
    if spec.n is not None:
        return n_of_m(score, spec.n, spec.m)
    return lowest_per_matrix(score, spec.sparsity)
