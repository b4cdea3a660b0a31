"""Memory-efficient Sinkhorn attention: ``sinkhorn(Q K^T * scale, n_iter) @ V`` in tiles.

Dense Sinkhorn attention (:func:`dense_sinkhorn_attention`) materializes the ``n x m``
logits and, for backward, one ``n x m`` matrix per iteration. The implementations here keep
only the dual potentials of every iteration, ``O((n + m) * n_iter)`` numbers per head, and
recompute tiles of the logits when they are needed, as FlashAttention does for softmax.

Notation (one head; ``n`` queries, ``m`` keys, ``T = n_iter``, ``c = log(n / m)``)::

    S = scale * Q K^T                                   (n, m)
    v^0 = 0
    u^t = -logsumexp_j(S_ij + v^{t-1}_j)          t odd  (rows of exp(S + u^t + v^{t-1}) sum to 1)
    v^t = c - logsumexp_i(S_ij + u^{t-1}_i)       t even (columns sum to n / m)
    P = exp(S + u + v)  with u, v the last potentials computed
    O = P V

Backward is reverse-mode differentiation through the unrolled iterations. With the
per-iteration matrices ``A^t = exp(S + u^t + v^{t-1})`` (t odd) and
``B^t = exp(S + u^{t-1} + v^t)`` (t even; both equal ``P`` for ``t = T``), the Jacobian of
``u^t`` with respect to ``S`` (and to ``v^{t-1}``) is ``-A^t`` row by row, and that of ``v^t``
is ``-(m / n) B^t`` column by column (the softmax of a logsumexp: the columns of ``B^t``
sum to ``n / m``). Writing ``g^t`` for the gradient of the loss with respect to the
potential computed at iteration ``t`` and ``h^t = (m / n) g^t`` for even ``t``::

    dV = P^T dO,  dP = dO V^T
    g(u_final)_i = sum_j P_ij dP_ij = dO_i . O_i          (=: D_i)
    g(v_final)_j = sum_i P_ij dP_ij = dV_j . V_j          (=: E_j)
    t odd:  g^{t-1}_j += -sum_i g^t_i A^t_ij             (gradient reaching v^{t-1})
    t even: g^{t-1}_i += -sum_j B^t_ij h^t_j             (gradient reaching u^{t-1})
    dS = P * dP - sum_{t odd} g^t_i A^t_ij - sum_{t even} h^t_j B^t_ij
    dQ = scale * dS K,  dK = scale * dS^T Q

The reverse sweep runs ``t = T, ..., 2``; every step is one row or column reduction over
tiles that needs only the potentials and the complete gradient of the step after it. A
last pass assembles ``dS`` tile by tile and accumulates ``dQ`` and ``dK``. All ``T``
matrices in ``dS`` are ``exp(S)`` times row and column factors, so with the shifts
``c_i = max_t u^t_i`` and ``d_j = max_t v^t_j`` and ``E = exp(S + c_i + d_j)``::

    dS = E * (alpha_i beta_j dP_ij - sum_{k < T} a^k_i b^k_j)

where ``alpha = exp(u_final - c)``, ``beta = exp(v_final - d)`` and the rank-``T`` sum
collects the ``g`` terms (:func:`score_gradient_factors`): one exponential per element
instead of ``T``. The exponential factors are at most 1, so ``E`` bounds every matrix
entrywise and loses no term to underflow. Potentials fall by at most ``log n`` (rows) and
``log m`` (columns) per normalization, since entries of a normalized matrix are at most 1
(rows) or ``n / m`` (columns), so ``log E <= log max(1, n / m) + (ceil(T / 2) - 1) log n
+ floor(T / 2) log m`` whatever the logits; where that exceeds 85 (float32 overflows at
88.7; at ``T = 9`` for ``n = m`` above about 41,000, at ``T = 5`` never in practice), each
matrix is exponentiated on its own instead (:func:`use_factored_ds`).

Padded sets (``query_mask``, ``key_mask``) change only the target marginals: ``u^t`` gains
``log a_i`` (0, or :data:`MASKED_LOG_MASS` for a padded query), ``c`` becomes ``log b_j``
(``log(n' / m')``, or :data:`MASKED_LOG_MASS` for a padded key), ``v^0`` starts at
:data:`MASKED_LOG_MASS` on padded keys, and ``m / n`` becomes ``m' / n'``
(:func:`real_size_ratio`). Every matrix above is then 0 in padded rows and columns, so the
formulas hold as written.

Saved for backward: ``q, k, v`` (with masks, their copies with padding set to 0), the
output, the masks and the potentials (``ceil(T / 2)`` row and
``floor(T / 2) + 1`` column vectors per head).

Backends:

* ``"chunked"`` (any device): a ``torch.autograd.Function`` that loops over tiles of
  ``chunk_q`` queries by ``chunk_k`` keys with ordinary torch ops, in a workspace of two
  (forward) or four (backward) tile buffers. A query chunk holds complete rows, so an even
  step and the odd step before it (forward: a row normalization and the next column
  normalization) share one pass: the forward makes ``floor(T / 2) + 1`` passes over the
  logits and the backward ``floor(T / 2) + 1`` more. When the keys are split too
  (``chunk_k < m``; by default only for ``m > 8192``), each pass computes the logit tiles of
  a query chunk twice.
* ``"triton"`` (CUDA): fused Triton kernels (:mod:`pointsink.triton_sinkhorn`), imported
  lazily so that ``pointsink`` imports without Triton.
* ``"dense"``: the reference, plain autograd through :func:`pointsink.sinkhorn.sinkhorn`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal, get_args

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx

from pointsink.batching import fold_vmapped
from pointsink.sinkhorn import (
    _no_autocast,
    check_masks,
    log_marginals,
    prepare_masks,
    real_count,
    sinkhorn,
    zero_padded,
)
from pointsink.validation import autocast_enabled, check_int

__all__ = [
    "MASKED_LOG_MASS",
    "Backend",
    "dense_sinkhorn_attention",
    "differentiable_backward",
    "on_launch_device",
    "real_size_ratio",
    "require_triton",
    "sinkhorn_attention",
    "triton_available",
]

Backend = Literal["auto", "chunked", "triton", "dense"]

# Automatic tile size of the chunked backend: about this many elements per tile, summed over
# the flattened batch and head dimensions (16 MiB in float32 on CPU: fewer, larger ops stall
# less on a busy machine with several intra-op threads; 64 MiB elsewhere, to amortize kernel
# launches). Tiles span all keys up to _MAX_FULL_ROW keys, so that a row normalization and
# the following column normalization share one pass.
_TILE_ELEMENTS_CPU = 1 << 22
_TILE_ELEMENTS = 1 << 24
_MAX_FULL_ROW = 8192
_MIN_QUERY_CHUNK = 16

#: Log-mass of a padded query or key in the tiled backends: finite, so that the backward
#: pass's differences of potentials (e.g. ``u - max_t u``) stay finite, and far below any
#: logit, so that ``exp()`` of it is exactly 0 in float32.
MASKED_LOG_MASS = -1e30


def triton_available() -> bool:
    """Whether the ``triton`` package is installed (checked without importing it)."""
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # e.g. sys.modules["triton"] = None
        return False


def _triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def require_triton(tensor: Tensor, fallback: str) -> None:
    """Raises a clear error where ``backend='triton'`` cannot run on ``tensor``.

    Args:
        tensor: An input of the kernel: it must be on CUDA (or any device under
            ``TRITON_INTERPRET=1``, Triton's CPU interpreter).
        fallback: The backend to suggest instead, e.g. ``"chunked"``.

    Raises:
        RuntimeError: Triton is not installed, or the tensor is not on a CUDA device.
    """
    if not triton_available():
        raise RuntimeError("backend='triton' needs the triton package (pip install 'triton>=3.0').")
    if not tensor.is_cuda and not _triton_interpreting():
        raise RuntimeError(
            "backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for the CPU "
            f"interpreter); use backend='{fallback}' on this device."
        )


def on_launch_device(device: torch.device) -> contextlib.AbstractContextManager[object]:
    """Makes a CUDA ``device`` current for a Triton launch (which uses the current device).

    Tensors on ``cuda:1`` while ``cuda:0`` is current would otherwise be handed to a kernel
    launched on the wrong GPU. Other devices (the interpreter's CPU): nothing to do.
    """
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def dense_sinkhorn_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    n_iter: int,
    scale: float | None = None,
    *,
    query_mask: Tensor | None = None,
    key_mask: Tensor | None = None,
) -> Tensor:
    """Reference Sinkhorn attention that materializes the ``n x m`` attention matrix.

    ``sinkhorn(q @ k^T * scale, n_iter, query_mask=..., key_mask=...) @ v``; autograd stores
    one ``n x m`` matrix per iteration.

    Args:
        q: Queries of shape ``(..., n, d)``.
        k: Keys of shape ``(..., m, d)``.
        v: Values of shape ``(..., m, e)``.
        n_iter: Number of Sinkhorn normalizations, starting with the rows (``>= 1``).
        scale: Logit scale; defaults to ``1 / sqrt(d)``.
        query_mask: ``(..., n)`` bool, True for real queries, or None.
        key_mask: ``(..., m)`` bool, True for real keys, or None.

    Returns:
        Output of shape ``(..., n, e)``; zero in padded query rows.
    """
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    # Zeroed padding: dQ = dS K would be NaN for NaN padded keys, although dS is 0 there.
    q, k = zero_padded(q, query_mask), zero_padded(k, key_mask)
    # Scaled before the product, as the chunked path does: in float16, q @ k^T itself can
    # overflow (above 65504) where the scaled logits fit.
    logits = (q * scale) @ k.transpose(-2, -1)
    weights = sinkhorn(logits, n_iter, query_mask=query_mask, key_mask=key_mask)
    return weights @ zero_padded(v, key_mask)  # padded values never read (0 * nan)


def differentiable_backward(
    ctx: FunctionCtx, dout: Tensor
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients for ``q, k, v`` with a graph, through the dense reference.

    The memory-efficient backends call this from their backward pass when autograd asks for
    a differentiable one (``create_graph=True``: gradient penalties, Hessian-vector
    products, meta-learning; and under every ``torch.func`` transform, which runs backward
    passes with gradients enabled). Their own tiled backward passes are not differentiable;
    returning them there would silently drop the attention's part of every higher-order
    gradient. The recomputation costs the dense reference's memory, ``O(n * m * n_iter)``.

    Args:
        ctx: The context :meth:`SinkhornAttentionFunction.setup_context` filled: saved
            ``q, k, v`` first and the ``(G, n)`` / ``(G, m)`` padding masks (or None) last,
            ``n_iter`` and ``scale``.
        dout: Gradient of the output ``(G, n, e)``.

    Returns:
        The gradients for ``q, k, v`` in their dtypes (None where no gradient is needed),
        differentiable with respect to the inputs and ``dout``.
    """
    q, k, v, *_, query_mask, key_mask = ctx.saved_tensors  # type: ignore[attr-defined]
    needed = ctx.needs_input_grad[:3]  # type: ignore[attr-defined]
    compute_dtype = torch.promote_types(q.dtype, torch.float32)
    reference = _dense_reference(
        ctx.n_iter,  # type: ignore[attr-defined]
        ctx.scale,  # type: ignore[attr-defined]
        query_mask,
        key_mask,
        compute_dtype,
    )

    def attention(*wanted: Tensor) -> Tensor:
        given = iter(wanted)
        return reference(
            *(next(given) if need else x for x, need in zip((q, k, v), needed, strict=True))
        )

    with _no_autocast(q.device.type):
        # torch.func.vjp, not torch.autograd.grad: its results stay differentiable for
        # autograd, and it also works when this backward runs inside a torch.func transform
        # (vjp, jacrev), where autograd.grad sees no graph.
        wanted = [x for x, need in zip((q, k, v), needed, strict=True) if need]
        _, pullback = torch.func.vjp(attention, *wanted)
        grads = iter(pullback(dout.to(compute_dtype)))
    return tuple(  # type: ignore[return-value]
        next(grads).to(x.dtype) if need else None for x, need in zip((q, k, v), needed, strict=True)
    )


def differentiable_tangent(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    tangents: tuple[Tensor, Tensor, Tensor],
    n_iter: int,
    scale: float,
    *,
    query_mask: Tensor | None = None,
    key_mask: Tensor | None = None,
) -> Tensor:
    """Forward-mode derivative of the attention output, through the dense reference.

    The memory-efficient backends' ``jvp`` (``torch.func.jvp``, ``jacfwd``, ``hessian``):
    the tangent of ``(G, n, e)`` for tangents of ``q, k, v``, at the dense reference's
    memory, ``O(n * m * n_iter)``. Autograd passes zeros for inputs without a tangent (it
    materializes them, as it does gradients).
    """
    compute_dtype = torch.promote_types(q.dtype, torch.float32)
    reference = _dense_reference(n_iter, scale, query_mask, key_mask, compute_dtype)
    with _no_autocast(q.device.type):
        _, tangent = torch.func.jvp(reference, (q, k, v), tangents)
    return tangent.to(q.dtype)


def _dense_reference(
    n_iter: int,
    scale: float,
    query_mask: Tensor | None,
    key_mask: Tensor | None,
    compute_dtype: torch.dtype,
) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """Dense attention of ``(q, k, v)``, computed in ``compute_dtype``.

    What :func:`differentiable_backward` and :func:`differentiable_tangent` differentiate.
    """

    def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return dense_sinkhorn_attention(
            q.to(compute_dtype),
            k.to(compute_dtype),
            v.to(compute_dtype),
            n_iter,
            scale,
            query_mask=query_mask,
            key_mask=key_mask,
        )

    return attention


def real_size_ratio(
    query_mask: Tensor | None,
    key_mask: Tensor | None,
    g: int,
    n: int,
    m: int,
    dtype: torch.dtype,
) -> Tensor | None:
    """``m' / n'`` per set, ``(G, 1)``: the inverse column mass of padded sets.

    The backward passes scale the column gradients by it (``m / n`` without masks).

    Args:
        query_mask: ``(G, n)`` bool, True for real queries, or None.
        key_mask: ``(G, m)`` bool, True for real keys, or None.
        g: Number of sets ``G`` (batch times heads).
        n: Number of queries.
        m: Number of keys.
        dtype: Floating dtype of the result.

    Returns:
        The ratios, or None without masks.
    """
    if query_mask is None and key_mask is None:
        return None
    device = (query_mask if query_mask is not None else key_mask).device  # type: ignore[union-attr]
    ratio = real_count(key_mask, m, dtype, device) / real_count(query_mask, n, dtype, device)
    return ratio.expand(g, 1)


def _resolve_chunks(
    chunk_size: int | Sequence[int] | None, g: int, n: int, m: int, device: torch.device
) -> tuple[int, int]:
    """Query and key chunk sizes of the chunked backend (see :func:`sinkhorn_attention`)."""
    if chunk_size is None:
        budget = _TILE_ELEMENTS_CPU if device.type == "cpu" else _TILE_ELEMENTS
        chunk_k = m if m <= _MAX_FULL_ROW else _MAX_FULL_ROW // 2
        chunk_q = max(_MIN_QUERY_CHUNK, budget // max(1, g * chunk_k))
    else:
        pair = tuple(chunk_size) if isinstance(chunk_size, (tuple, list)) else (chunk_size,) * 2
        if len(pair) != 2:
            raise TypeError(
                f"chunk_size must be None, an int or a pair of ints; got {chunk_size!r}."
            )
        # check_int: Python and NumPy integers pass; bools, floats and values < 1 do not.
        chunk_q, chunk_k = (check_int("chunk_size", c) for c in pair)
    return min(chunk_q, n), min(chunk_k, m)


def _blocks(size: int, chunk: int) -> list[tuple[int, int]]:
    return [(start, min(start + chunk, size)) for start in range(0, size, chunk)]


class _Workspace:
    """Tile buffers reused across tiles.

    A fresh multi-megabyte CPU allocation per tile costs page faults that are as expensive
    as the arithmetic, so every tile-sized temporary lives in one of a few flat buffers.
    """

    def __init__(self, count: int, numel: int, like: Tensor) -> None:
        self._flat = [like.new_empty(numel) for _ in range(count)]

    def __call__(self, index: int, shape: tuple[int, ...]) -> Tensor:
        return self._flat[index][: math.prod(shape)].view(shape)


class _Tiles:
    """Logit tiles ``S[:, q0:q1, k0:k1]`` of one query chunk, written to workspace buffer 0.

    When one key block spans all keys, the tile is computed once and reused by every step
    on this query chunk. A yielded tile is only valid until the next one is requested, and
    callers must not modify it.
    """

    def __init__(
        self, q_chunk: Tensor, k_t: Tensor, key_blocks: list[tuple[int, int]], ws: _Workspace
    ) -> None:
        self.q_chunk = q_chunk  # (G, c, d), already multiplied by the scale
        self.k_t = k_t  # (G, d, m)
        self.key_blocks = key_blocks
        self.ws = ws
        self._cached: Tensor | None = None

    @property
    def single(self) -> bool:
        return len(self.key_blocks) == 1

    def __iter__(self) -> Iterator[tuple[int, int, Tensor]]:
        for k0, k1 in self.key_blocks:
            if self.single and self._cached is not None:
                yield k0, k1, self._cached
                continue
            g, c, _ = self.q_chunk.shape
            s = torch.bmm(self.q_chunk, self.k_t[:, :, k0:k1], out=self.ws(0, (g, c, k1 - k0)))
            if self.single:
                self._cached = s
            yield k0, k1, s


# Padded sets put MASKED_LOG_MASS into exponents, and PyTorch's vectorized CPU exp takes a
# slow path for arguments whose result is subnormal or 0 (below about -87 in float32): 6-15x
# slower per element on the 2-core Intel Xeon VM (2026-12-05), and the masked chunked
# backward ran 2.2x slower than the unmasked one. With masks, exponents are clamped to this
# floor and results at the floor set to 0 (exactly, so that no tiny factor makes subnormal
# products later, which are slow on x86 too). Without masks the two extra passes cost
# 4-26 % (random logits, nothing below the floor), so they are skipped.
_EXP_FLOOR = {torch.float32: -87.0, torch.float64: -708.0}


def _exp_floor(dtype: torch.dtype, masked: bool) -> float | None:
    """The exponent floor of :func:`_exp_` for padded sets, or None."""
    return _EXP_FLOOR.get(dtype, _EXP_FLOOR[torch.float32]) if masked else None


def _exp_(x: Tensor, floor: float | None) -> Tensor:
    """``exp(x)`` in place; with a ``floor``, 0 where ``x`` is at or below it."""
    if floor is None:
        return x.exp_()
    x.clamp_min_(floor).exp_()
    return torch.nn.functional.threshold_(x, 2.0 * math.exp(floor), 0.0)


def _exp_plus(
    s: Tensor, row: Tensor, col: Tensor, out: Tensor, floor: float | None = None
) -> Tensor:
    """``exp(s + row[..., :, None] + col[..., None, :])``, written to ``out``."""
    return _exp_(torch.add(s, row.unsqueeze(-1), out=out).add_(col.unsqueeze(-2)), floor)


def _row_lse(
    s: Tensor, col: Tensor, out: Tensor, floor: float | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Row logsumexp ``lse_i = log sum_j exp(s_ij + col_j)``, stabilized by the row maximum.

    Returns:
        ``(lse, w, l)`` with ``w = exp(s + col - max)`` (in ``out``) and ``l = sum_j w_ij``.
    """
    w = torch.add(s, col.unsqueeze(-2), out=out)
    mx = w.amax(dim=-1, keepdim=True)
    _exp_(w.sub_(mx), floor)
    total = w.sum(dim=-1)
    return total.log().add_(mx.squeeze(-1)), w, total


def _col_lse(s: Tensor, row: Tensor, out: Tensor, floor: float | None = None) -> Tensor:
    """Column logsumexp ``lse_j = log sum_i exp(s_ij + row_i)``, stabilized by the maximum."""
    w = torch.add(s, row.unsqueeze(-1), out=out)
    mx = w.amax(dim=-2, keepdim=True)
    _exp_(w.sub_(mx), floor)
    return w.sum(dim=-2).log_().add_(mx.squeeze(-2))


def _chunked_forward(
    qs: Tensor,
    k: Tensor,
    v: Tensor,
    n_iter: int,
    chunk_q: int,
    chunk_k: int,
    query_mask: Tensor | None = None,
    key_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Forward pass of the chunked backend.

    Args:
        qs: Scaled queries ``scale * Q`` of shape ``(G, n, d)``, in the compute dtype.
        k: Keys of shape ``(G, m, d)``.
        v: Values of shape ``(G, m, e)``.
        n_iter: Number of Sinkhorn iterations ``T``.
        chunk_q: Queries per tile.
        chunk_k: Keys per tile.
        query_mask: ``(G, n)`` bool, True for real queries, or None.
        key_mask: ``(G, m)`` bool, True for real keys, or None.

    Returns:
        ``(out, us, vs)``: the output ``(G, n, e)`` (zero in padded rows); the row
        potentials ``us[i] = u^{2i+1}`` of shape ``(ceil(T / 2), G, n)``; the column
        potentials ``vs[i] = v^{2i}`` of shape ``(floor(T / 2) + 1, G, m)`` with ``vs[0]``
        0 (:data:`MASKED_LOG_MASS` for padded keys).
    """
    g, n, _ = qs.shape
    m = k.shape[1]
    n_u, n_v = (n_iter + 1) // 2, n_iter // 2
    log_rows, log_cols, v_init = log_marginals(
        query_mask, key_mask, n, m, qs.dtype, MASKED_LOG_MASS
    )
    floor = _exp_floor(qs.dtype, query_mask is not None or key_mask is not None)
    k_t = k.transpose(1, 2)
    key_blocks = _blocks(m, chunk_k)
    ws = _Workspace(2, g * chunk_q * chunk_k, qs)
    us = qs.new_empty(n_u, g, n)
    vs = qs.new_zeros(n_v + 1, g, m)
    if isinstance(v_init, Tensor):
        vs[0] += v_init
    out = qs.new_zeros(g, n, v.shape[-1])

    # Pass i computes u^{2i+1} (row logsumexp, complete within a query chunk) and then
    # accumulates the column logsumexp of S + u^{2i+1} that gives v^{2i+2}; the last odd
    # iteration produces the output instead.
    for i in range(n_u):
        last = 2 * i + 1 == n_iter
        v_prev = vs[i]
        col_lse = None if last else qs.new_full((g, m), -math.inf)
        for q0, q1 in _blocks(n, chunk_q):
            tiles = _Tiles(qs[:, q0:q1], k_t, key_blocks, ws)
            row_lse = None
            for k0, k1, s in tiles:
                blk, w, total = _row_lse(s, v_prev[:, k0:k1], ws(1, s.shape), floor)
                row_lse = blk if row_lse is None else torch.logaddexp(row_lse, blk)
                if last and tiles.single:  # P = w / total: O = (w V) / total
                    out[:, q0:q1].baddbmm_(w, v).div_(total.unsqueeze(-1))
            assert row_lse is not None
            u = row_lse.neg_()
            if isinstance(log_rows, Tensor):
                u += log_rows[:, q0:q1]
            us[i, :, q0:q1] = u
            if last and tiles.single:
                continue
            for k0, k1, s in tiles:
                if last:
                    p = _exp_plus(s, u, v_prev[:, k0:k1], ws(1, s.shape), floor)
                    out[:, q0:q1].baddbmm_(p, v[:, k0:k1])
                else:
                    assert col_lse is not None
                    blk = _col_lse(s, u, ws(1, s.shape), floor)
                    col_lse[:, k0:k1] = torch.logaddexp(col_lse[:, k0:k1], blk)
        if col_lse is not None:
            vs[i + 1] = log_cols - col_lse

    if n_iter % 2 == 0:  # P = exp(S + u^{T-1} + v^T): one more pass for the output
        u_fin, v_fin = us[n_u - 1], vs[n_v]
        for q0, q1 in _blocks(n, chunk_q):
            for k0, k1, s in _Tiles(qs[:, q0:q1], k_t, key_blocks, ws):
                p = _exp_plus(s, u_fin[:, q0:q1], v_fin[:, k0:k1], ws(1, s.shape), floor)
                out[:, q0:q1].baddbmm_(p, v[:, k0:k1])
    if query_mask is not None:  # the single-tile shortcut above normalized padded rows too
        out.masked_fill_(~query_mask.unsqueeze(-1), 0.0)
    return out, us, vs


# Largest log E = S + max_t u^t + max_t v^t for which dS is assembled in factored form
# (score_gradient_factors): float32 overflows at exp(88.7).
FACTORED_LOG_BOUND = 85.0

# Rows of the packed factor tensors of score_gradient_factors.
SHIFT, FINAL_SCALE, FIRST_FACTOR = 0, 1, 2


def factored_ds_log_bound(n: int, m: int, n_iter: int) -> float:
    """Upper bound on ``log E = S_ij + max_t u^t_i + max_t v^t_j``, whatever the logits.

    Row potentials fall by at most ``log n`` per row normalization and column potentials by
    at most ``log m`` per column normalization (they rise without bound), and ``P <= max(1,
    n / m)``, so ``log E <= log max(1, n / m) + (ceil(T / 2) - 1) log n + floor(T / 2) log m``.
    """
    n_u, n_v = (n_iter + 1) // 2, n_iter // 2
    return max(0.0, math.log(n / m)) + (n_u - 1) * math.log(n) + n_v * math.log(m)


def use_factored_ds(n: int, m: int, n_iter: int) -> bool:
    """Whether the backward pass assembles ``dS`` from :func:`score_gradient_factors`.

    Yes when there is more than one matrix to combine (``T > 1``) and ``E`` provably stays
    below ``exp(85)`` (:func:`factored_ds_log_bound`); else one exponential per matrix.
    """
    return n_iter > 1 and factored_ds_log_bound(n, m, n_iter) <= FACTORED_LOG_BOUND


def score_gradient_factors(
    us: Tensor, vs: Tensor, gu: Tensor, gv: Tensor, n_iter: int
) -> tuple[Tensor, Tensor]:
    r"""Row and column factors of the logit gradient ``dS`` (the module docstring's notation).

    With ``E = exp(S + c_i + d_j)``, ``dS = E * (alpha_i beta_j dP_ij - sum_k a^k_i b^k_j)``
    and ``P = E * alpha_i beta_j``; the ``T`` terms of the sum are the final matrix's
    ``g_final`` term and the ``g^t A^t`` and ``h^t B^t`` terms of the earlier iterations.

    Args:
        us: Row potentials ``(ceil(T / 2), G, n)``, ``us[i] = u^{2i+1}``.
        vs: Column potentials ``(floor(T / 2) + 1, G, m)``, ``vs[i] = v^{2i}``, ``vs[0] = 0``.
        gu: Complete gradients with respect to ``us``, same shape.
        gv: Complete gradients with respect to ``vs`` times ``m / n``, same shape.
        n_iter: Number of Sinkhorn iterations ``T``.

    Returns:
        ``(rows, cols)`` of shapes ``(T + 2, G, n)`` and ``(T + 2, G, m)``: index
        :data:`SHIFT` holds ``c`` (``d``), :data:`FINAL_SCALE` ``alpha`` (``beta``) and
        ``FIRST_FACTOR + k`` the factors ``a^k`` (``b^k``).
    """
    n_u, n_v = (n_iter + 1) // 2, n_iter // 2
    odd = n_iter % 2 == 1
    row_shift, col_shift = us.amax(0), vs.amax(0)
    row_scales, col_scales = (us - row_shift).exp(), (vs - col_shift).exp()
    alpha, beta = row_scales[n_u - 1], col_scales[n_v]
    # The final matrix's term: g_final is a row vector for odd T, a column vector for even T.
    row_factors = [alpha * gu[n_u - 1] if odd else alpha]
    col_factors = [beta if odd else beta * gv[n_v]]
    for i in range(n_u - 1 if odd else n_u):  # A^{2i+1} = exp(S + u^{2i+1} + v^{2i})
        row_factors.append(row_scales[i] * gu[i])
        col_factors.append(col_scales[i])
    for j in range(1, n_v + 1 if odd else n_v):  # B^{2j} = exp(S + u^{2j-1} + v^{2j})
        row_factors.append(row_scales[j - 1])
        col_factors.append(col_scales[j] * gv[j])
    rows = torch.stack([row_shift, alpha, *row_factors])
    cols = torch.stack([col_shift, beta, *col_factors])
    return rows, cols


def _chunked_backward(
    qs: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    dout: Tensor,
    us: Tensor,
    vs: Tensor,
    n_iter: int,
    chunk_q: int,
    chunk_k: int,
    col_factor: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Backward pass of the chunked backend (see the module docstring for the formulas).

    Args:
        qs: Scaled queries ``scale * Q`` of shape ``(G, n, d)``, in the compute dtype.
        k: Keys ``(G, m, d)``.
        v: Values ``(G, m, e)``.
        out: Forward output ``(G, n, e)``.
        dout: Gradient of the loss with respect to the output, ``(G, n, e)``.
        us: Row potentials ``(ceil(T / 2), G, n)`` from :func:`_chunked_forward`.
        vs: Column potentials ``(floor(T / 2) + 1, G, m)``.
        n_iter: Number of Sinkhorn iterations ``T``.
        chunk_q: Queries per tile.
        chunk_k: Keys per tile.
        col_factor: For padded sets, ``m' / n'`` per set ``(G, 1)`` (the inverse column
            mass; padded potentials make every padded term 0), which also turns on the
            exponent floor; None: no masks, ``m / n``.

    Returns:
        ``(dS K, dS^T (scale Q), dV)``: multiply the first by ``scale`` to get ``dQ``; the
        second is ``dK``.
    """
    g, n, _ = qs.shape
    m = k.shape[1]
    n_u, n_v = (n_iter + 1) // 2, n_iter // 2
    odd = n_iter % 2 == 1
    k_t = k.transpose(1, 2)
    key_blocks = _blocks(m, chunk_k)
    query_blocks = _blocks(n, chunk_q)
    ws = _Workspace(4, g * chunk_q * chunk_k, qs)
    u_fin, v_fin = us[n_u - 1], vs[n_v]

    delta = (dout * out).sum(-1)  # D_i = dO_i . O_i = gradient w.r.t. u_final, (G, n)
    gu = torch.zeros_like(us)  # gu[i]: gradient w.r.t. u^{2i+1}
    # gv[i]: gradient w.r.t. v^{2i} times m / n (the factor of the column softmax, so that
    # it multiplies B^{2i} directly); gv[0] stays unused.
    gv = torch.zeros_like(vs)
    masked = col_factor is not None  # a per-set ratio comes only with masks
    floor = _exp_floor(qs.dtype, masked)
    column_factor: Tensor | float = m / n if col_factor is None else col_factor
    dq_unscaled = torch.zeros_like(qs)
    dk = torch.zeros_like(k)
    dv = torch.zeros_like(v)
    if odd:
        gu[n_u - 1] = delta

    factored = use_factored_ds(n, m, n_iter)

    def final_tile(
        q0: int, q1: int, k0: int, k1: int, s: Tensor, factors: tuple[Tensor, Tensor] | None
    ) -> None:
        """Assembles dS on one tile and accumulates dQ, dK (and dV for T = 1)."""
        dout_c = dout[:, q0:q1]
        ds = torch.bmm(dout_c, v[:, k0:k1].transpose(1, 2), out=ws(2, s.shape))  # dP
        if factors is not None:  # dS = E * (alpha beta dP - a b^T): one exponential
            rows, cols = factors[0], factors[1][:, :, k0:k1]
            e = _exp_plus(s, rows[SHIFT], cols[SHIFT], ws(1, s.shape), floor)
            ds.mul_(rows[FINAL_SCALE].unsqueeze(-1)).mul_(cols[FINAL_SCALE].unsqueeze(-2))
            rank_terms = torch.bmm(
                rows[FIRST_FACTOR:].permute(1, 2, 0),
                cols[FIRST_FACTOR:].permute(1, 0, 2),
                out=ws(3, s.shape),
            )
            ds.sub_(rank_terms).mul_(e)
        else:  # one exponential per matrix
            p = _exp_plus(s, u_fin[:, q0:q1], v_fin[:, k0:k1], ws(1, s.shape), floor)
            # The last iteration's matrix is P itself: fold its term into P * (dP - g).
            ds.sub_(gu[n_u - 1, :, q0:q1, None] if odd else gv[n_v, :, None, k0:k1]).mul_(p)
            tmp = ws(3, s.shape)
            for i in range(n_u - 1 if odd else n_u):  # A^{2i+1} = exp(S + u^{2i+1} + v^{2i})
                a = _exp_plus(s, us[i, :, q0:q1], vs[i, :, k0:k1], tmp, floor)
                ds.sub_(a.mul_(gu[i, :, q0:q1, None]))
            for j in range(1, n_v + 1 if odd else n_v):  # B^{2j} = exp(S + u^{2j-1} + v^{2j})
                b = _exp_plus(s, us[j - 1, :, q0:q1], vs[j, :, k0:k1], tmp, floor)
                ds.sub_(b.mul_(gv[j, :, None, k0:k1]))
            if n_iter == 1:
                dv[:, k0:k1].baddbmm_(p.transpose(1, 2), dout_c)
        dq_unscaled[:, q0:q1].baddbmm_(ds, k[:, k0:k1])
        dk[:, k0:k1].baddbmm_(ds.transpose(1, 2), qs[:, q0:q1])

    if n_v == 0:  # T = 1: softmax attention, dS = P * (dP - D)
        for q0, q1 in query_blocks:
            for k0, k1, s in _Tiles(qs[:, q0:q1], k_t, key_blocks, ws):
                final_tile(q0, q1, k0, k1, s, None)  # one matrix: nothing to factor
        return dq_unscaled, dk, dv

    # Pass 1: dV = P^T dO and the complete gradient of v_final,
    # E_j - [T odd] sum_i D_i P_ij (step T for odd T, whose matrix A^T is P).
    for q0, q1 in query_blocks:
        for k0, k1, s in _Tiles(qs[:, q0:q1], k_t, key_blocks, ws):
            p = _exp_plus(s, u_fin[:, q0:q1], v_fin[:, k0:k1], ws(1, s.shape), floor)
            dv[:, k0:k1].baddbmm_(p.transpose(1, 2), dout[:, q0:q1])
            if odd:
                gv[n_v, :, k0:k1].sub_(torch.bmm(delta[:, None, q0:q1], p).squeeze(1))
    gv[n_v].add_((dv * v).sum(-1)).mul_(column_factor)

    # Passes for the even steps s = 2j, j = n_v, ..., 1: with gv[j] complete, the row sums
    # of B^{2j} give gu[j-1] (complete within a query chunk); then the column sums of
    # A^{2j-1} weighted by gu[j-1] give gv[j-1]. The pass of j = 1 assembles dS instead.
    for j in range(n_v, 0, -1):
        final = j == 1
        for q0, q1 in query_blocks:
            tiles = _Tiles(qs[:, q0:q1], k_t, key_blocks, ws)
            if not odd and j == n_v:  # u^{T-1} is u_final
                row = delta[:, q0:q1].clone()
            else:
                row = qs.new_zeros(g, q1 - q0)
            for k0, k1, s in tiles:
                b = _exp_plus(s, us[j - 1, :, q0:q1], vs[j, :, k0:k1], ws(1, s.shape), floor)
                row.sub_(torch.bmm(b, gv[j, :, k0:k1, None]).squeeze(-1))
            gu[j - 1, :, q0:q1] = row
            factors = None
            if final and factored:  # gu[0] is complete on this chunk now
                factors = score_gradient_factors(us[:, :, q0:q1], vs, gu[:, :, q0:q1], gv, n_iter)
            for k0, k1, s in tiles:
                if final:
                    final_tile(q0, q1, k0, k1, s, factors)
                else:
                    a = _exp_plus(
                        s, us[j - 1, :, q0:q1], vs[j - 1, :, k0:k1], ws(1, s.shape), floor
                    )
                    gv[j - 1, :, k0:k1].sub_(torch.bmm(row[:, None, :], a).squeeze(1))
        if not final:
            gv[j - 1].mul_(column_factor)
    return dq_unscaled, dk, dv


class SinkhornAttentionFunction(torch.autograd.Function):
    """What the chunked and the Triton autograd Functions share: saving, ``vmap``, ``jvp``.

    Both take ``(q, k, v, n_iter, scale, tile_q, tile_k, query_mask, key_mask)`` on
    flattened ``(G, n, d)`` inputs and return ``(out, us, vs)``: the output and the
    potentials the tiled backward reads (outputs, marked non-differentiable, because
    ``torch.func`` transforms only let ``setup_context`` save inputs and outputs). The
    ``setup_context`` style, the ``vmap`` rule and ``jvp`` make ``torch.func`` transforms
    (``grad``, ``vmap``, ``jacrev``, ``jvp``, ``jacfwd``, ``hessian``: per-sample gradients,
    Jacobians) work. Each backend supplies its forward and :meth:`tiled_backward`.
    """

    @staticmethod
    def setup_context(ctx: FunctionCtx, inputs: tuple, output: tuple) -> None:
        q, k, v, n_iter, scale, tile_q, tile_k, query_mask, key_mask = inputs
        out, us, vs = output
        ctx.mark_non_differentiable(us, vs)
        # The masks are prepare_masks's copies, so a caller changing its own in place before
        # the backward changes nothing.
        ctx.save_for_backward(q, k, v, out, us, vs, query_mask, key_mask)
        ctx.save_for_forward(q, k, v, query_mask, key_mask)
        ctx.n_iter = n_iter  # type: ignore[attr-defined]
        ctx.scale = scale  # type: ignore[attr-defined]
        ctx.tiles = (tile_q, tile_k)  # type: ignore[attr-defined]

    @staticmethod
    def jvp(
        ctx: FunctionCtx, dq: Tensor, dk: Tensor, dv: Tensor, *_: Any
    ) -> tuple[Tensor, None, None]:
        q, k, v, query_mask, key_mask = ctx.saved_tensors  # type: ignore[attr-defined]
        tangent = differentiable_tangent(
            q,
            k,
            v,
            (dq, dk, dv),
            ctx.n_iter,  # type: ignore[attr-defined]
            ctx.scale,  # type: ignore[attr-defined]
            query_mask=query_mask,
            key_mask=key_mask,
        )
        return tangent, None, None  # the potentials are not differentiable

    @classmethod
    def backward(  # type: ignore[override]
        cls, ctx: FunctionCtx, dout: Tensor, _dus: Tensor | None, _dvs: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        if torch.is_grad_enabled():  # create_graph=True: higher-order gradients follow
            grads = differentiable_backward(ctx, dout)
        else:
            grads = cls.tiled_backward(ctx, dout)
        return (*grads, *(None,) * 6)  # n_iter, scale, the two tile sizes and the masks

    @staticmethod
    def tiled_backward(ctx: FunctionCtx, dout: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The backend's own backward pass (not differentiable): gradients for q, k, v."""
        raise NotImplementedError


def vmap_by_folding(
    function: type[torch.autograd.Function], info: Any, in_dims: tuple, inputs: tuple
) -> tuple[tuple[Tensor, Tensor, Tensor], tuple[int, int, int]]:
    """The ``vmap`` rule of a :class:`SinkhornAttentionFunction`: one call for all samples.

    The vmapped dimension of each tensor input (``in_dims``, None where an input is shared
    by every sample) is folded into the flattened batch ``G``, and the outputs unfolded:
    the output ``(size * G, n, e)`` and the potentials ``(T', size * G, .)``.
    """
    size = info.batch_size
    q, k, v, *numbers, query_mask, key_mask = inputs
    tensors = (q, k, v, query_mask, key_mask)
    dims = (*in_dims[:3], *in_dims[-2:])
    qf, kf, vf, query_folded, key_folded = (
        fold_vmapped(t, d, size) for t, d in zip(tensors, dims, strict=True)
    )
    out, us, vs = function.apply(qf, kf, vf, *numbers, query_folded, key_folded)
    unfolded = (
        out.reshape(size, -1, *out.shape[1:]),
        us.reshape(us.shape[0], size, -1, us.shape[-1]),
        vs.reshape(vs.shape[0], size, -1, vs.shape[-1]),
    )
    return unfolded, (0, 1, 1)


class _ChunkedSinkhornAttention(SinkhornAttentionFunction):
    """Autograd function of the chunked backend on flattened ``(G, n, d)`` inputs."""

    @staticmethod
    def forward(  # type: ignore[override]
        q: Tensor,
        k: Tensor,
        v: Tensor,
        n_iter: int,
        scale: float,
        chunk_q: int,
        chunk_k: int,
        query_mask: Tensor | None = None,
        key_mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        compute_dtype = torch.promote_types(q.dtype, torch.float32)
        with _no_autocast(q.device.type):
            qs = q.to(compute_dtype) * scale
            out, us, vs = _chunked_forward(
                qs,
                k.to(compute_dtype),
                v.to(compute_dtype),
                n_iter,
                chunk_q,
                chunk_k,
                query_mask,
                key_mask,
            )
        return out.to(q.dtype), us, vs

    @staticmethod
    def vmap(
        info: Any, in_dims: tuple, *inputs: Any
    ) -> tuple[tuple[Tensor, Tensor, Tensor], tuple[int, int, int]]:
        q, k, v, n_iter, scale, chunk_q, chunk_k, query_mask, key_mask = inputs
        # The folded batch is `size` times larger: fewer queries per tile keep its memory.
        chunk_q = max(min(_MIN_QUERY_CHUNK, chunk_q), chunk_q // info.batch_size)
        inputs = (q, k, v, n_iter, scale, chunk_q, chunk_k, query_mask, key_mask)
        return vmap_by_folding(_ChunkedSinkhornAttention, info, in_dims, inputs)

    @staticmethod
    def tiled_backward(ctx: FunctionCtx, dout: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        n_iter: int = ctx.n_iter  # type: ignore[attr-defined]
        scale: float = ctx.scale  # type: ignore[attr-defined]
        q, k, v, out, us, vs, query_mask, key_mask = ctx.saved_tensors  # type: ignore[attr-defined]
        compute_dtype = us.dtype
        col_factor = real_size_ratio(
            query_mask, key_mask, q.shape[0], q.shape[1], k.shape[1], compute_dtype
        )
        with _no_autocast(q.device.type):
            dq, dk, dv = _chunked_backward(
                q.to(compute_dtype) * scale,
                k.to(compute_dtype),
                v.to(compute_dtype),
                out.to(compute_dtype),
                dout.to(compute_dtype),
                us,
                vs,
                n_iter,
                *ctx.tiles,  # type: ignore[attr-defined]
                col_factor,
            )
            dq = dq.mul_(scale).to(q.dtype)
        return dq, dk.to(k.dtype), dv.to(v.dtype)


def _flatten(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor, torch.Size]:
    """Broadcasts the leading dimensions and flattens them to ``(G, ., .)``."""
    batch = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    n, d = q.shape[-2:]
    m, e = v.shape[-2:]
    qf = q.expand(*batch, n, d).reshape(-1, n, d)
    kf = k.expand(*batch, m, d).reshape(-1, m, d)
    vf = v.expand(*batch, m, e).reshape(-1, m, e)
    return qf.contiguous(), kf.contiguous(), vf.contiguous(), batch


def _check_inputs(q: Tensor, k: Tensor, v: Tensor, n_iter: int) -> torch.Size:
    """Checks the arguments of :func:`sinkhorn_attention`; returns the broadcast batch shape."""
    fits = min(q.dim(), k.dim(), v.dim()) >= 2
    fits = fits and q.shape[-1] == k.shape[-1] and k.shape[-2] == v.shape[-2]
    try:
        batch_shape = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    except RuntimeError:  # leading dimensions that do not broadcast
        fits = False
    if not fits:
        raise ValueError(
            "sinkhorn_attention needs q (..., n, d), k (..., m, d), v (..., m, e) with leading "
            f"dimensions that broadcast; got shapes {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}."
        )
    if q.shape[-2] == 0 or k.shape[-2] == 0:
        raise ValueError("sinkhorn_attention needs at least one query and one key.")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device; got {q.device}, {k.device}, {v.device}.")
    if not (q.dtype == k.dtype == v.dtype) or not q.dtype.is_floating_point:
        raise TypeError(
            f"q, k, v must share one floating dtype; got {q.dtype}, {k.dtype}, {v.dtype}."
        )
    check_int("n_iter", n_iter)
    return batch_shape


def _choose_backend(backend: Backend, q: Tensor) -> str:
    if backend not in get_args(Backend):
        raise ValueError(f"unknown backend {backend!r}; use auto, chunked, triton or dense.")
    if backend != "auto":
        return backend
    if (
        q.is_cuda
        and q.dtype in (torch.float32, torch.float16, torch.bfloat16)
        and triton_available()
    ):
        return "triton"
    return "chunked"


def sinkhorn_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    n_iter: int,
    scale: float | None = None,
    chunk_size: int | Sequence[int] | None = None,
    backend: Backend = "auto",
    *,
    query_mask: Tensor | None = None,
    key_mask: Tensor | None = None,
) -> Tensor:
    """Sinkhorn attention ``sinkhorn(q @ k^T * scale, n_iter) @ v`` without ``n x m`` storage.

    Equals :func:`dense_sinkhorn_attention` (up to float rounding) in value and gradient.
    The ``"chunked"`` and ``"triton"`` backends store for backward only the inputs, the
    output and the potentials of every iteration, ``O((n + m) * n_iter)`` per head, and work
    on one bounded tile of the logits at a time. ``n_iter=1`` is softmax attention.

    Leading dimensions of ``q``, ``k`` and ``v`` broadcast against each other. Under autocast
    the inputs are cast to the autocast dtype first (so they may differ in dtype), except
    float64 inputs, which autocast leaves alone (as for
    ``torch.nn.functional.scaled_dot_product_attention`` and matmul), and the backend is
    chosen for the cast inputs; the normalization always runs in at least float32.
    Higher-order gradients (``create_graph=True``) are exact too: the
    ``"chunked"`` and ``"triton"`` backends then recompute the backward pass through the
    dense reference, at its memory cost.

    Padded sets: ``query_mask`` and ``key_mask`` give each set's real elements, as for
    :func:`pointsink.sinkhorn.sinkhorn` (masked marginals: keys cannot be masked out by
    ``-inf`` or large negative logits, since Sinkhorn's column normalization restores a
    masked key's share). The output's real rows equal Sinkhorn attention on the unpadded
    set, padded rows are 0, and padded queries, keys and values get no gradient, on every
    backend. Padding values are never read, not even NaN or inf ones; a set without a real
    query or key gets an output of 0 and zero gradients.

    Args:
        q: Queries of shape ``(..., n, d)``.
        k: Keys of shape ``(..., m, d)``, on the device of ``q``.
        v: Values of shape ``(..., m, e)``, on the device of ``q``.
        n_iter: Number of Sinkhorn normalizations, starting with the rows (``>= 1``).
        scale: Logit scale; defaults to ``1 / sqrt(d)``.
        chunk_size: Tile size of the ``"chunked"`` backend: ``(queries, keys)`` per tile (a
            tuple or list), or one int for both. ``None`` picks tiles that span all keys (up
            to 8192) with about ``2**22`` elements (CPU; ``2**24`` on other devices) over all
            batch and head dimensions, and at least 16 queries. Ignored by other backends.
        backend: ``"auto"`` (Triton for CUDA tensors of dtype float32/float16/bfloat16 when
            Triton is installed, else chunked), ``"chunked"``, ``"triton"`` or ``"dense"``.
        query_mask: ``(..., n)`` bool, True for real queries, or None (all real). One
            leading dimension per leading dimension of the output, each equal to it or 1
            (e.g. ``(B, 1, n)`` for ``(B, H, n, d)`` queries).
        key_mask: ``(..., m)`` bool, True for real keys, or None, likewise.

    Returns:
        Output of shape ``(..., n, e)`` in the input dtype (the autocast dtype under autocast,
        for inputs other than float64).

    Raises:
        ValueError: Mismatched shapes, no queries or keys, inputs on different devices, an
            unknown ``backend``, ``n_iter`` or a chunk size that is not an integer ``>= 1``,
            or a mask whose shape or device does not fit.
        TypeError: ``q``, ``k``, ``v`` do not share one floating dtype (after autocast's
            cast), ``chunk_size`` is
            a tuple or list of other than two sizes, ``scale`` is a tensor that requires
            a gradient (it would not get one), or a mask is not a bool tensor.
    """
    device_type = q.device.type
    if autocast_enabled(device_type):
        # autocast's rule, input by input (mixed dtypes then agree): float64 is never cast.
        dtype = torch.get_autocast_dtype(device_type)
        q, k, v = (
            t.to(dtype) if t.is_floating_point() and t.dtype != torch.float64 else t
            for t in (q, k, v)
        )
    batch_shape = _check_inputs(q, k, v, n_iter)
    if query_mask is not None or key_mask is not None:
        check_masks(query_mask, key_mask, tuple(batch_shape), q.shape[-2], k.shape[-2], q.device)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if isinstance(scale, Tensor) and scale.requires_grad and torch.is_grad_enabled():
        # float() would silently cut it from the graph.
        raise TypeError("scale must be a number; to learn a temperature, multiply q by it instead.")
    scale = float(scale)
    chosen = _choose_backend(backend, q)
    if chosen == "dense":  # it prepares the masks and zeroes the padding itself
        return dense_sinkhorn_attention(
            q, k, v, n_iter, scale, query_mask=query_mask, key_mask=key_mask
        )

    # Padding values never reach a sum (a NaN there would: 0 * nan), not even in sets without
    # a real query or key, which are then computed as fully real (keep marks them).
    q, k, v = zero_padded(q, query_mask), zero_padded(k, key_mask), zero_padded(v, key_mask)
    query_mask, key_mask, keep = prepare_masks(query_mask, key_mask)
    qf, kf, vf, batch = _flatten(q, k, v)
    n, m = qf.shape[1], kf.shape[1]
    query_mask, key_mask = (
        None if mask is None else mask.expand(*batch, mask.shape[-1]).reshape(-1, mask.shape[-1])
        for mask in (query_mask, key_mask)
    )
    apply: Callable[..., Tensor]
    if chosen == "triton":
        require_triton(qf, "chunked")
        from pointsink.triton_sinkhorn import triton_sinkhorn_attention

        out = triton_sinkhorn_attention(
            qf, kf, vf, n_iter, scale, query_mask=query_mask, key_mask=key_mask
        )
    else:
        chunk_q, chunk_k = _resolve_chunks(chunk_size, qf.shape[0], n, m, qf.device)
        apply = _ChunkedSinkhornAttention.apply
        out = apply(qf, kf, vf, n_iter, scale, chunk_q, chunk_k, query_mask, key_mask)[0]
    out = out.reshape(*batch, n, vf.shape[-1])
    # Sets without a real query or key were computed as fully real: their output is 0.
    return zero_padded(out, keep)
