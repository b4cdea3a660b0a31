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

Padded sets: Sinkhorn cannot be masked through the logits, as softmax is (a column
normalization would give a masked key its share back). Masks act on the marginals instead:
with ``n'`` real queries and ``m'`` real keys, real rows sum to 1 and real columns to
``n' / m'``, and padded rows and columns get mass 0 (:func:`log_marginals`)::

    u <- log a - logsumexp_j(S_ij + v_j),   log a_i = 0 (real) or -inf (padded)
    v <- log b - logsumexp_i(S_ij + u_i),   log b_j = log(n' / m') (real) or -inf (padded)

starting from ``v = log [key is real]``. The real block of the result equals Sinkhorn on the
unpadded logits, and padded rows and columns are exactly 0.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import Tensor

from pointsink.validation import check_bool_mask, check_int

__all__ = [
    "check_masks",
    "log_marginals",
    "log_sinkhorn",
    "prepare_masks",
    "real_count",
    "sinkhorn",
    "sinkhorn_potentials",
    "zero_padded",
]


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


def check_masks(
    query_mask: Tensor | None,
    key_mask: Tensor | None,
    batch_shape: tuple[int, ...],
    n: int,
    m: int,
    device: torch.device,
) -> None:
    """Checks padding masks against ``n`` queries and ``m`` keys with leading ``batch_shape``.

    Type, shape, dtype and device only: no host synchronization. (A set without a real
    element is allowed; :func:`prepare_masks` handles it.)

    Args:
        query_mask: ``(..., n)`` bool, True for real queries, or None.
        key_mask: ``(..., m)`` bool, True for real keys, or None.
        batch_shape: Leading dimensions of the inputs.
        n: Number of queries.
        m: Number of keys.
        device: Device of the inputs.

    Raises:
        ValueError: A mask's last dimension is not ``n`` (``m``), its leading dimensions are
            not those of ``batch_shape`` (each equal or 1), or it is on another device.
        TypeError: A mask is not a bool tensor.
    """
    for name, mask, size, size_name in (
        ("query_mask", query_mask, n, "n"),
        ("key_mask", key_mask, m, "m"),
    ):
        if mask is None:
            continue
        check_bool_mask(name, mask, device)
        # As many leading dimensions as the inputs, each equal or 1: right-aligned
        # broadcasting would silently match a (B, n) mask's batch with the heads of
        # (B, H, n, m) logits.
        fits = mask.dim() == len(batch_shape) + 1 and all(
            mask_size in (1, batch_size)
            for mask_size, batch_size in zip(mask.shape[:-1], batch_shape, strict=True)
        )
        if not fits or mask.shape[-1] != size:
            hint = ""
            if mask.dim() == len(batch_shape) and len(batch_shape) >= 2:
                hint = f" For heads, pass {name}[:, None] (one mask for every head)."
            raise ValueError(
                f"{name} must have shape (..., {size_name}) = (..., {size}) with one leading "
                f"dimension per input dimension, each equal to it or 1 (inputs: "
                f"{tuple(batch_shape)}); got {tuple(mask.shape)}.{hint}"
            )


def log_marginals(
    query_mask: Tensor | None,
    key_mask: Tensor | None,
    n: int,
    m: int,
    dtype: torch.dtype,
    masked: float = -math.inf,
) -> tuple[Tensor | float, Tensor | float, Tensor | float]:
    """Log target marginals of Sinkhorn attention, and the initial column potential.

    Args:
        query_mask: ``(..., n)`` bool, True for real queries, or None (all real).
        key_mask: ``(..., m)`` bool, True for real keys, or None (all real).
        n: Number of queries (padded).
        m: Number of keys (padded).
        dtype: Floating dtype of the results.
        masked: Log-mass of a padded element: ``-inf`` (exact), or a large finite negative
            number where differences of potentials must stay finite (tiled backward passes).

    Returns:
        ``(log_rows, log_cols, v_init)``: ``log a`` of shape ``(..., n)``, ``log b`` of shape
        ``(..., m)`` (``log(n' / m')`` for real keys) and the starting column potential
        ``(..., m)`` (0 for real keys), each ``masked`` where padded. Without masks, the
        plain numbers ``0``, ``log(n / m)`` and ``0``.
    """
    if query_mask is None and key_mask is None:
        return 0.0, math.log(n / m), 0.0
    device = (query_mask if query_mask is not None else key_mask).device  # type: ignore[union-attr]
    log_col_mass = (
        real_count(query_mask, n, dtype, device).log()
        - real_count(key_mask, m, dtype, device).log()
    )  # (..., 1)
    # Python scalars only: a tensor made from a number on CUDA would be a blocking copy.
    log_rows: Tensor | float = 0.0
    v_init: Tensor | float = 0.0
    log_cols: Tensor | float = log_col_mass.expand(*log_col_mass.shape[:-1], m)
    # Out of place throughout: broadcasts masks whose leading dimensions differ (e.g.
    # per-head query masks with one key mask for all heads), and works under torch.func.vmap
    # with per-sample masks.
    if query_mask is not None:
        log_rows = torch.zeros((), dtype=dtype, device=device).masked_fill(~query_mask, masked)
    if key_mask is not None:
        log_cols = log_col_mass.masked_fill(~key_mask, masked)
        v_init = torch.zeros((), dtype=dtype, device=device).masked_fill(~key_mask, masked)
    return log_rows, log_cols, v_init


def real_count(mask: Tensor | None, size: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Number of real elements per set, ``(..., 1)`` (``(1,)`` holding ``size`` for None).

    Args:
        mask: ``(..., size)`` bool, True for real elements, or None (all real).
        size: The padded set size.
        dtype: Floating dtype of the result.
        device: Device of the result.
    """
    if mask is None:
        return torch.full((1,), float(size), dtype=dtype, device=device)
    return mask.sum(-1, keepdim=True, dtype=dtype)


def prepare_masks(
    query_mask: Tensor | None, key_mask: Tensor | None
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Padding masks made safe for sets with no real query or no real key.

    Such a set is computed as if all its elements were real (so nothing is NaN, in the
    output or the gradients), and ``keep`` marks it for its result to be set to 0.
    Tensor operations only, no host synchronization.

    Args:
        query_mask: ``(..., n)`` bool, True for real queries, or None.
        key_mask: ``(..., m)`` bool, True for real keys, or None.

    Returns:
        ``(query_mask, key_mask, keep)``: the masks with empty sets filled, and ``keep``
        ``(..., 1)`` bool, False for the sets without a real query or key (None without
        masks).
    """
    keep: Tensor | None = None
    filled: list[Tensor | None] = []
    for mask in (query_mask, key_mask):
        if mask is None:
            filled.append(None)
            continue
        has_real = mask.any(-1, keepdim=True)
        filled.append(mask | ~has_real)
        keep = has_real if keep is None else keep & has_real
    return filled[0], filled[1], keep


def zero_padded(x: Tensor, mask: Tensor | None) -> Tensor:
    """``x`` of shape ``(..., L, C)`` with the rows where ``mask`` ``(..., L)`` is False set to 0.

    Padding values never reach a result this way, not even NaN or inf ones (``0 * nan`` is
    NaN), and padded positions get zero gradient.
    """
    return x if mask is None else x.masked_fill(~mask.unsqueeze(-1), 0.0)


def zero_padded_logits(
    logits: Tensor, query_mask: Tensor | None, key_mask: Tensor | None
) -> Tensor:
    """``logits`` ``(..., n, m)`` with every entry of a padded query or key set to 0.

    Called with the caller's masks, before :func:`prepare_masks` fills the empty sets: a NaN
    or inf there would survive a ``-inf`` mask, or reach the gradients of a set without a
    real query or key (``0 * nan``).
    """
    if query_mask is None and key_mask is None:
        return logits
    real = True if query_mask is None else query_mask.unsqueeze(-1)
    real = real if key_mask is None else key_mask.unsqueeze(-2) & real
    return logits.masked_fill(~real, 0.0)  # type: ignore[operator]


def _masked_scores(
    logits: Tensor, n_iter: int, query_mask: Tensor | None, key_mask: Tensor | None
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """Checks the arguments; logits in the compute dtype with padded entries set to 0.

    Returns:
        ``(scores, query_mask, key_mask, keep)``, the masks from :func:`prepare_masks`.
    """
    _check(logits, n_iter)
    n, m = logits.shape[-2], logits.shape[-1]
    check_masks(query_mask, key_mask, tuple(logits.shape[:-2]), n, m, logits.device)
    scores = zero_padded_logits(
        logits.to(torch.promote_types(logits.dtype, torch.float32)), query_mask, key_mask
    )
    return scores, *prepare_masks(query_mask, key_mask)


def _potentials(
    scores: Tensor, n_iter: int, query_mask: Tensor | None, key_mask: Tensor | None
) -> tuple[Tensor, Tensor]:
    """The loop of :func:`sinkhorn_potentials` on checked scores and prepared masks."""
    n, m = scores.shape[-2], scores.shape[-1]
    log_rows, log_cols, v_init = log_marginals(query_mask, key_mask, n, m, scores.dtype)
    # Row and column vectors: (..., n, 1) and (..., 1, m).
    log_rows = log_rows.unsqueeze(-1) if isinstance(log_rows, Tensor) else log_rows
    log_cols = log_cols.unsqueeze(-2) if isinstance(log_cols, Tensor) else log_cols
    v = scores.new_zeros(*scores.shape[:-2], 1, m)
    if isinstance(v_init, Tensor):  # padded keys start (and stay) at -inf
        v = v + v_init.unsqueeze(-2)
    u = scores.new_zeros(*scores.shape[:-2], n, 1)
    for iteration in range(n_iter):
        if iteration % 2 == 0:
            u = log_rows - torch.logsumexp(scores + v, dim=-1, keepdim=True)
        else:
            v = log_cols - torch.logsumexp(scores + u, dim=-2, keepdim=True)
    return u, v


def sinkhorn_potentials(
    logits: Tensor,
    n_iter: int,
    *,
    query_mask: Tensor | None = None,
    key_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Runs ``n_iter`` alternating normalizations and returns the dual potentials.

    Computation happens in at least float32 (also under fp16/bf16 autocast), so that
    logits as large as ±1e4 stay finite.

    Args:
        logits: Attention logits ``S`` of shape ``(..., n, m)``.
        n_iter: Number of normalizations, starting with the rows (``>= 1``).
        query_mask: ``(..., n)`` bool, True for real queries (padded ones get potential
            ``-inf``); one leading dimension per leading dimension of ``logits``, each
            equal to it or 1. None: all real. A set without real queries or keys is
            computed as if all its elements were real (:func:`sinkhorn` then zeroes it).
        key_mask: ``(..., m)`` bool, True for real keys, likewise.

    Returns:
        ``(u, v)`` of shapes ``(..., n, 1)`` and ``(..., 1, m)``, float32 or float64, such
        that ``exp(S + u + v)`` is the normalized attention matrix (with padded logits
        read as 0).

    Raises:
        ValueError: ``logits`` has fewer than two dimensions, ``n`` or ``m`` is 0,
            ``n_iter`` is not an integer ``>= 1``, or a mask does not fit (see
            :func:`check_masks`).
        TypeError: ``logits`` is not floating point, or a mask is not a bool tensor.
    """
    with _no_autocast(logits.device.type):
        scores, query_mask, key_mask, _ = _masked_scores(logits, n_iter, query_mask, key_mask)
        return _potentials(scores, n_iter, query_mask, key_mask)


def log_sinkhorn(
    logits: Tensor,
    n_iter: int,
    *,
    query_mask: Tensor | None = None,
    key_mask: Tensor | None = None,
) -> Tensor:
    """Log of the Sinkhorn-normalized attention matrix.

    Args:
        logits: Attention logits of shape ``(..., n, m)``.
        n_iter: Number of alternating normalizations, starting with the rows.
        query_mask: ``(..., n)`` bool padding mask of the queries, see :func:`sinkhorn`.
        key_mask: ``(..., m)`` bool padding mask of the keys, see :func:`sinkhorn`.

    Returns:
        Log-weights of shape ``(..., n, m)``, in float32 (float64 for float64 input);
        ``-inf`` in padded rows and columns, and in sets without a real query or key.
    """
    with _no_autocast(logits.device.type):
        scores, query_mask, key_mask, keep = _masked_scores(logits, n_iter, query_mask, key_mask)
        u, v = _potentials(scores, n_iter, query_mask, key_mask)
        log_weights = scores + u + v
        if keep is not None:
            log_weights = log_weights.masked_fill(~keep.unsqueeze(-1), -math.inf)
    return log_weights


def sinkhorn(
    logits: Tensor,
    n_iter: int,
    *,
    query_mask: Tensor | None = None,
    key_mask: Tensor | None = None,
) -> Tensor:
    """Sinkhorn-normalized attention weights.

    After an odd number of iterations every row sums to 1; after an even number every
    column sums to ``n / m``; both hold in the limit. ``n_iter=1`` equals
    ``torch.softmax(logits, dim=-1)``.

    Padded sets take ``query_mask`` and ``key_mask``, not masked logits: setting a padded
    key's logits to ``-inf`` or a large negative value, as one would for softmax, does not
    work. The column normalization gives every key, masked or not, a column sum of
    ``n / m`` again (restoring a masked key's share), and a column of ``-inf`` makes it NaN.
    Large offsets also cost precision: the potentials grow to cancel them, and
    ``logits + u + v`` loses the offset's digits (float32, 4 x 6 logits with two keys
    offset, 5 iterations: rows summed to 2.4-2.8 instead of 1 with a ``-1e9`` offset, within
    ``1.1e-4`` of 1 with ``-1e4``). The masks instead set the padded elements' target mass
    to 0 (module docstring): the real block equals Sinkhorn on the unpadded logits, real
    columns sum to ``n' / m'``, and padded rows and columns are 0.

    Args:
        logits: Attention logits ``S`` of shape ``(..., n, m)`` (``n`` queries, ``m`` keys,
            both ``>= 1``), floating point.
        n_iter: Number of alternating normalizations, starting with the rows (``>= 1``).
        query_mask: ``(..., n)`` bool, True for real queries; its leading dimensions
            match those of ``logits``, each equal or 1 (e.g. ``(B, 1, n)`` for
            ``(B, H, n, m)``). None: all queries are real. A set without a real query or
            key gets weights of 0 (and zero gradient). Padded logits are never read, not
            even NaN ones.
        key_mask: ``(..., m)`` bool, True for real keys, likewise.

    Returns:
        Attention weights of shape ``(..., n, m)`` in the dtype of ``logits``.

    Raises:
        ValueError: ``logits`` has fewer than two dimensions, ``n`` or ``m`` is 0,
            ``n_iter`` is not an integer ``>= 1``, or a mask's shape or device does not fit.
        TypeError: ``logits`` is not floating point, or a mask is not a bool tensor.
    """
    with _no_autocast(logits.device.type):
        log_weights = log_sinkhorn(logits, n_iter, query_mask=query_mask, key_mask=key_mask)
        return log_weights.exp().to(logits.dtype)
