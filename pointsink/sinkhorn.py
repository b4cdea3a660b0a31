"""Log-domain Sinkhorn normalization of attention logits.

Softmax attention normalizes the rows of ``exp(S)``. Sinkhorn's algorithm alternates row
and column normalizations, so that the attention matrix approaches a doubly stochastic
matrix (Sander et al., "Sinkformers", AISTATS 2022). With ``n`` queries and ``m`` keys the
target marginals are rows summing to ``1`` and columns summing to ``n / m``, which keeps the
row sums of softmax attention (every output is a weighted mean of the values).

In the log domain, with potentials ``u`` (one per query) and ``v`` (one per key)::

    u <- -logsumexp_j(S_ij + v_j)               (odd iterations: rows sum to 1)
    v <- log(n / m) - logsumexp_i(S_ij + u_i)   (even iterations: columns sum to n / m)
    P = exp(S + u + v)

Iteration 1 is a row normalization, so ``n_iter=1`` is exactly ``softmax(S, dim=-1)``.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import Tensor

from pointsink.validation import check_int

__all__ = ["log_sinkhorn", "sinkhorn", "sinkhorn_potentials"]


def _no_autocast(device_type: str) -> contextlib.AbstractContextManager[None]:
    """Disables autocast on ``device_type``; a no-op where autocast does not exist.

    ``torch.autocast`` itself raises on such devices (e.g. ``meta``). Shared with
    :mod:`pointsink.sinkhorn_attention`.
    """
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


def _check(logits: Tensor, n_iter: int) -> None:
    if logits.dim() < 2:
        raise ValueError(
            f"Sinkhorn needs logits of shape (..., n, m); got shape {tuple(logits.shape)}."
        )
    if not logits.dtype.is_floating_point:
        raise TypeError(f"Sinkhorn needs floating-point logits; got {logits.dtype}.")
    if logits.shape[-2] == 0 or logits.shape[-1] == 0:
        # The column mass n / m is undefined without queries or keys.
        raise ValueError(
            "Sinkhorn needs at least one query and one key (n, m >= 1); got logits of shape "
            f"{tuple(logits.shape)}."
        )
    check_int("n_iter", n_iter)


def sinkhorn_potentials(logits: Tensor, n_iter: int) -> tuple[Tensor, Tensor]:
    """Runs ``n_iter`` alternating normalizations and returns the dual potentials.

    Computation happens in at least float32 (also under fp16/bf16 autocast), so that
    logits as large as ±1e4 stay finite.

    Args:
        logits: Attention logits ``S`` of shape ``(..., n, m)``.
        n_iter: Number of normalizations, starting with the rows (``>= 1``).

    Returns:
        ``(u, v)`` of shapes ``(..., n, 1)`` and ``(..., 1, m)``, float32 or float64, such
        that ``exp(S + u + v)`` is the normalized attention matrix.

    Raises:
        ValueError: ``logits`` has fewer than two dimensions, ``n`` or ``m`` is 0, or
            ``n_iter`` is not an integer ``>= 1``.
        TypeError: ``logits`` is not floating point.
    """
    _check(logits, n_iter)
    compute_dtype = torch.promote_types(logits.dtype, torch.float32)
    with _no_autocast(logits.device.type):
        scores = logits.to(compute_dtype)
        n, m = scores.shape[-2], scores.shape[-1]
        log_col_mass = math.log(n / m)
        v = scores.new_zeros(*scores.shape[:-2], 1, m)
        u = scores.new_zeros(*scores.shape[:-2], n, 1)
        for iteration in range(n_iter):
            if iteration % 2 == 0:
                u = -torch.logsumexp(scores + v, dim=-1, keepdim=True)
            else:
                v = log_col_mass - torch.logsumexp(scores + u, dim=-2, keepdim=True)
    return u, v


def log_sinkhorn(logits: Tensor, n_iter: int) -> Tensor:
    """Log of the Sinkhorn-normalized attention matrix.

    Args:
        logits: Attention logits of shape ``(..., n, m)``.
        n_iter: Number of alternating normalizations, starting with the rows.

    Returns:
        Log-weights of shape ``(..., n, m)``, in float32 (float64 for float64 input).
    """
    u, v = sinkhorn_potentials(logits, n_iter)
    return logits.to(u.dtype) + u + v


def sinkhorn(logits: Tensor, n_iter: int) -> Tensor:
    """Sinkhorn-normalized attention weights.

    After an odd number of iterations every row sums to 1; after an even number every
    column sums to ``n / m``; both hold in the limit. ``n_iter=1`` equals
    ``torch.softmax(logits, dim=-1)``.

    No masking: padded keys cannot be excluded by setting their logits to ``-inf`` or a
    large negative value, as one would for softmax. The column normalization gives every
    key, masked or not, a column sum of ``n / m`` again (restoring a masked key's share),
    and a column of ``-inf`` makes it NaN. Large offsets also cost precision: the potentials
    grow to cancel them, and ``logits + u + v`` loses the offset's digits (float32, 4 x 6
    logits with two keys offset, 5 iterations: rows summed to 2.4-2.8 instead of 1 with a
    ``-1e9`` offset, within ``1.1e-4`` of 1 with ``-1e4``). Use sets of one fixed size (as the
    model does).

    Args:
        logits: Attention logits ``S`` of shape ``(..., n, m)`` (``n`` queries, ``m`` keys,
            both ``>= 1``), floating point.
        n_iter: Number of alternating normalizations, starting with the rows (``>= 1``).

    Returns:
        Attention weights of shape ``(..., n, m)`` in the dtype of ``logits``.

    Raises:
        ValueError: ``logits`` has fewer than two dimensions, ``n`` or ``m`` is 0, or
            ``n_iter`` is not an integer ``>= 1``.
        TypeError: ``logits`` is not floating point.
    """
    with _no_autocast(logits.device.type):
        return log_sinkhorn(logits, n_iter).exp().to(logits.dtype)
