"""Sinkhorn from first principles, shared by test_sinkhorn.py and test_blocks.py."""

from __future__ import annotations

import torch


def alternating_scaling(logits: torch.Tensor, n_iter: int) -> torch.Tensor:
    """Rescales exp(S)'s rows to sum 1, then its columns to n/m, and so on, n_iter times.

    Args:
        logits: ``(..., n, m)``.
        n_iter: Normalizations, rows first.

    Returns:
        The rescaled ``(..., n, m)`` matrix, computed without logs or potentials.
    """
    n, m = logits.shape[-2:]
    kernel = logits.exp()
    for iteration in range(n_iter):
        if iteration % 2 == 0:
            kernel = kernel / kernel.sum(-1, keepdim=True)
        else:
            kernel = kernel / kernel.sum(-2, keepdim=True) * (n / m)
    return kernel
