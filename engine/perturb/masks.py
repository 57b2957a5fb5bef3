"""Mask selection shared by the pruning methods. A mask is True where a weight is pruned.

Entries are chosen by index (topk), never by `score <= threshold`: de-quantized weights have many exact
ties, and a threshold would prune more than asked.
"""

from __future__ import annotations

import torch


def lowest_per_matrix(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the int(numel * sparsity) lowest scores of the whole matrix (one threshold per matrix)."""
    return lowest_k(score, int(score.numel() * sparsity))


def lowest_per_row(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the int(cols * sparsity) lowest scores of every output row (Wanda's comparison group)."""
    k = int(score.shape[1] * sparsity)
    mask = torch.zeros_like(score, dtype=torch.bool)
    if k > 0:
        mask.scatter_(1, torch.topk(score, k, dim=1, largest=False).indices, True)
    return mask


def n_of_m(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Semi-structured N:M: in every group of m consecutive inputs of a row keep the n highest scores."""
    rows, cols = score.shape
    if cols % m:
        raise ValueError(f"N:M pruning needs the input size ({cols}) to be a multiple of M={m}")
    groups = score.reshape(rows, cols // m, m)
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(2, torch.topk(groups, m - n, dim=2, largest=False).indices, True)
    return mask.reshape(rows, cols)


def lowest_k(score: torch.Tensor, k: int) -> torch.Tensor:
    """Prune exactly the k lowest scores of the whole tensor."""
    mask = torch.zeros(score.numel(), dtype=torch.bool, device=score.device)
    if k > 0:
        mask[torch.topk(score.flatten(), k, largest=False).indices] = True
    return mask.view_as(score)
