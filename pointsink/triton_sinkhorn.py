"""Fused Triton kernels for Sinkhorn attention (the ``"triton"`` backend).

Imported lazily by :func:`pointsink.sinkhorn_attention.sinkhorn_attention`; importing this
module needs ``triton`` (``pip install 'triton>=3.0'``). The kernels run on CUDA, or on CPU
tensors under Triton's interpreter (``TRITON_INTERPRET=1`` set before ``triton`` is
imported), which the tests use.

Every kernel recomputes tiles ``S = scale * Q K^T`` of ``BLOCK_M`` queries by ``BLOCK_N``
keys in registers (``tl.dot`` with float32 accumulation) and never writes an ``n x m``
matrix. :func:`_col_lse_kernel` and :func:`_bwd_col_kernel`, which reduce over queries,
compute the transposed tile ``S^T``, so that their reductions run along the rows of a
matrix product's result, within a few threads (along columns they cross warps); the dQ
kernel also works on transposed tiles, for the reason given in :func:`_ds_tile`.
Exponentials are base 2 (see ``_LOG2E``). Each kernel has its own launch configuration
(:func:`_blocks_for`). Notation as in
:mod:`pointsink.sinkhorn_attention` (``T = n_iter``, ``us[i] = u^{2i+1}``, ``vs[i] = v^{2i}``
with ``vs[0] = 0``, ``c = log(n / m)``).

Forward, ``T`` potential passes (for odd ``T`` the last one also produces the output; even
``T`` needs one more output pass):

* :func:`_row_lse_kernel` (one program per query block, loop over key blocks, online
  logsumexp): ``u^t = -logsumexp_j(S_ij + v^{t-1}_j)``; with ``HAS_OUT`` it also
  accumulates ``O = softmax_j(S + v^{t-1}) V`` FlashAttention-style.
* :func:`_col_lse_kernel` (one program per key block, loop over query blocks):
  ``v^t = c - logsumexp_i(S_ij + u^{t-1}_i)``.
* :func:`_out_kernel` (``T`` even): ``O = exp(S + u^{T-1} + v^T) V``.

Backward, reverse-mode through the unrolled iterations: ``T - 1`` (odd ``T``) or ``T``
(even ``T``) reduction passes, then one pass for ``dQ`` and one for ``dK``/``dV``:

* :func:`_bwd_col_kernel`: ``COL_j = col_factor * ([HAS_DV] dV_j . V_j
  - sum_i GROW_i exp(S_ij + ROWP_i + COLP_j))``, with ``dV = P^T dO`` when ``HAS_DV``.
* :func:`_bwd_row_kernel`: ``ROW_i = [HAS_INIT] INIT_i - sum_j exp(S_ij + ROWP_i + COLP_j)
  GCOL_j``.
* :func:`_bwd_dq_kernel` and :func:`_bwd_dkdv_kernel` assemble
  ``dS = P * dP - sum_t g^t * (iteration-t matrix)`` tile by tile and accumulate
  ``dQ = scale dS K``, ``dK = scale dS^T Q`` (and ``dV`` for ``T = 1``). Where
  :func:`~pointsink.sinkhorn_attention.use_factored_ds` allows (always for ``T <= 7``
  at any practical size), ``dS = E * (alpha beta dP - a b^T)`` from rank-``T`` row and
  column factors computed once per call, one exponential per element; else ``T``.

Padded sets (query and key masks) need no kernel of their own: the masks only change the
target marginals, so between launches the row potentials gain ``log a`` and the column
potentials ``log b`` (:func:`~pointsink.sinkhorn.log_marginals`, with the finite
:data:`~pointsink.sinkhorn_attention.MASKED_LOG_MASS` for padded elements, whose ``exp2`` is
0), and the backward's column gradients are scaled by ``m' / n'`` per set instead of
``m / n``.

Inputs may be float32, float16 or bfloat16; logits, potentials, reductions and
accumulators are float32. Float32 ``tl.dot`` uses one TF32 product exactly when
``torch.backends.cuda.matmul.allow_tf32`` is set (as torch's own matmul does), else three
(``tf32x3``, float32 accuracy) on GPUs with TF32 tensor cores (:func:`_float32_precision`).
"""

# Triton convention: pointer and constexpr kernel arguments are upper case.
# ruff: noqa: N803

from __future__ import annotations

import functools
import math
import os
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.autograd.function import FunctionCtx
from triton.runtime.errors import OutOfResources

from pointsink.sinkhorn import log_marginals
from pointsink.sinkhorn_attention import (
    MASKED_LOG_MASS,
    SinkhornAttentionFunction,
    _check_inputs,
    on_launch_device,
    real_size_ratio,
    score_gradient_factors,
    use_factored_ds,
    vmap_by_folding,
)

__all__ = ["triton_sinkhorn_attention"]


# Exponentials are base 2: ``exp2`` is one MUFU.EX2 instruction, where ``exp`` adds a multiply
# and denormal handling, and the scale folds into the logits' multiply. Logits and potentials
# are multiplied by log2(e) where they are made or loaded, and results go back by ln(2).
_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _mm(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``tl.dot(a, b)`` with float32 accumulation.

    ``UPCAST`` multiplies in float32 (the interpreter mishandles bfloat16 ``tl.dot``).
    """
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _load_tile(PTR, g, offs_r, offs_c, num_rows, C: tl.constexpr):
    """Rows ``offs_r``, columns ``offs_c`` of the ``g``-th ``(num_rows, C)`` matrix; 0 outside."""
    mask = (offs_r < num_rows)[:, None] & (offs_c < C)[None, :]
    return tl.load(
        PTR + g * num_rows * C + offs_r[:, None] * C + offs_c[None, :], mask=mask, other=0.0
    )


@triton.jit
def _store_tile(PTR, g, offs_r, offs_c, num_rows, C: tl.constexpr, tile):
    """Writes ``tile``, in ``PTR``'s dtype, where :func:`_load_tile` reads."""
    mask = (offs_r < num_rows)[:, None] & (offs_c < C)[None, :]
    ptrs = PTR + g * num_rows * C + offs_r[:, None] * C + offs_c[None, :]
    tl.store(ptrs, tile.to(PTR.dtype.element_ty), mask=mask)


@triton.jit
def _load_vector(PTR, g, offs, length):
    """Entries ``offs`` of the ``g``-th vector of ``length`` at ``PTR``; 0 past its end."""
    return tl.load(PTR + g * length + offs, mask=offs < length, other=0.0)


@triton.jit
def _load_log2(PTR, g, offs, length):
    """Like :func:`_load_vector`, times log2(e), and ``-inf`` past the end.

    A potential of ``-inf`` makes every logit of its row or column vanish under ``exp2``,
    so the kernels need no other mask on the logits tile.
    """
    values = tl.load(PTR + g * length + offs, mask=offs < length, other=float("-inf"))
    return values * _LOG2E


@triton.jit
def _store_vector(PTR, g, offs, length, values):
    """Writes ``values`` where :func:`_load_vector` reads."""
    tl.store(PTR + g * length + offs, values, mask=offs < length)


@triton.jit
def _row_lse_kernel(
    Q, K, V, VPREV, U_OUT, OUT,
    n, m, n_blocks, scale,
    D: tl.constexpr, E: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
    HAS_OUT: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """``U_OUT_i = -logsumexp_j(S_ij + VPREV_j)``; with ``HAS_OUT`` also ``OUT = P V``."""
    pid = tl.program_id(0)
    g = (pid // n_blocks).to(tl.int64)
    offs_m = (pid % n_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_E)
    q = _load_tile(Q, g, offs_m, offs_d, n, D)
    scale_log2 = scale * _LOG2E
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_E], tl.float32)
    for start in range(0, m, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        k = _load_tile(K, g, offs_n, offs_d, m, D)
        vp = _load_log2(VPREV, g, offs_n, m)
        # Base-2 logits; every tile holds at least one key, so m_new is finite.
        s = _mm(q, tl.trans(k), PRECISION, UPCAST) * scale_log2 + vp[None, :]
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if HAS_OUT:
            val = _load_tile(V, g, offs_n, offs_e, m, E)
            acc = acc * alpha[:, None] + _mm(p.to(val.dtype), val, PRECISION, UPCAST)
        m_i = m_new
    _store_vector(U_OUT, g, offs_m, n, -(m_i + tl.log2(l_i)) * _LN2)
    if HAS_OUT:
        _store_tile(OUT, g, offs_m, offs_e, n, E, acc / l_i[:, None])


@triton.jit
def _col_lse_kernel(
    Q, K, UPREV, V_OUT,
    n, m, n_blocks, scale, log_col_mass,
    D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """``V_OUT_j = log_col_mass - logsumexp_i(S_ij + UPREV_i)``."""
    pid = tl.program_id(0)
    g = (pid // n_blocks).to(tl.int64)
    offs_n = (pid % n_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_tile(K, g, offs_n, offs_d, m, D)
    scale_log2 = scale * _LOG2E
    m_j = tl.full([BLOCK_N], float("-inf"), tl.float32)
    l_j = tl.zeros([BLOCK_N], tl.float32)
    for start in range(0, n, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        q = _load_tile(Q, g, offs_m, offs_d, n, D)
        up = _load_log2(UPREV, g, offs_m, n)
        # The transposed tile S^T (keys by queries): reductions along a row of a matrix
        # product's result stay within a few threads, along a column they cross warps.
        s_t = _mm(k, tl.trans(q), PRECISION, UPCAST) * scale_log2 + up[None, :]
        m_new = tl.maximum(m_j, tl.max(s_t, 1))
        l_j = l_j * tl.exp2(m_j - m_new) + tl.sum(tl.exp2(s_t - m_new[:, None]), 1)
        m_j = m_new
    _store_vector(V_OUT, g, offs_n, m, log_col_mass - (m_j + tl.log2(l_j)) * _LN2)


@triton.jit
def _out_kernel(
    Q, K, V, U, VC, OUT,
    n, m, n_blocks, scale,
    D: tl.constexpr, E: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """``OUT = exp(S + U_i + VC_j) V`` with known potentials (even ``T``)."""
    pid = tl.program_id(0)
    g = (pid // n_blocks).to(tl.int64)
    offs_m = (pid % n_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_E)
    q = _load_tile(Q, g, offs_m, offs_d, n, D)
    scale_log2 = scale * _LOG2E
    u = _load_log2(U, g, offs_m, n)
    acc = tl.zeros([BLOCK_M, BLOCK_E], tl.float32)
    for start in range(0, m, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        k = _load_tile(K, g, offs_n, offs_d, m, D)
        val = _load_tile(V, g, offs_n, offs_e, m, E)
        vc = _load_log2(VC, g, offs_n, m)
        s = _mm(q, tl.trans(k), PRECISION, UPCAST) * scale_log2 + vc[None, :] + u[:, None]
        acc += _mm(tl.exp2(s).to(val.dtype), val, PRECISION, UPCAST)
    _store_tile(OUT, g, offs_m, offs_e, n, E, acc)


@triton.jit
def _bwd_col_kernel(
    Q, K, V, DO, DV, ROWP, COLP, GROW, COL_OUT,
    n, m, n_blocks, scale, col_factor,
    D: tl.constexpr, E: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
    HAS_DV: tl.constexpr, HAS_GROW: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """Column reduction of ``W = exp(S + ROWP_i + COLP_j)`` for the reverse sweep.

    ``COL_OUT_j = col_factor * ([HAS_DV] dV_j . V_j - [HAS_GROW] sum_i GROW_i W_ij)`` and,
    with ``HAS_DV`` (then ``W = P``), ``DV = W^T dO``.
    """
    pid = tl.program_id(0)
    g = (pid // n_blocks).to(tl.int64)
    offs_n = (pid % n_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_E)
    k = _load_tile(K, g, offs_n, offs_d, m, D)
    scale_log2 = scale * _LOG2E
    colp = _load_log2(COLP, g, offs_n, m)
    col = tl.zeros([BLOCK_N], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_E], tl.float32)
    for start in range(0, n, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        q = _load_tile(Q, g, offs_m, offs_d, n, D)
        rowp = _load_log2(ROWP, g, offs_m, n)
        # W^T (keys by queries), as in _col_lse_kernel.
        s_t = _mm(k, tl.trans(q), PRECISION, UPCAST) * scale_log2 + colp[:, None]
        w_t = tl.exp2(s_t + rowp[None, :])
        if HAS_GROW:
            grow = _load_vector(GROW, g, offs_m, n)
            col += tl.sum(w_t * grow[None, :], 1)
        if HAS_DV:
            do = _load_tile(DO, g, offs_m, offs_e, n, E)
            dv += _mm(w_t.to(do.dtype), do, PRECISION, UPCAST)
    res = -col
    if HAS_DV:
        val = _load_tile(V, g, offs_n, offs_e, m, E)
        res += tl.sum(dv * val.to(tl.float32), 1)
        _store_tile(DV, g, offs_n, offs_e, m, E, dv)
    _store_vector(COL_OUT, g, offs_n, m, res * col_factor)


@triton.jit
def _bwd_row_kernel(
    Q, K, ROWP, COLP, GCOL, ROW_INIT, ROW_OUT,
    n, m, n_blocks, scale,
    D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_INIT: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """``ROW_OUT_i = [HAS_INIT] ROW_INIT_i - sum_j exp(S_ij + ROWP_i + COLP_j) GCOL_j``."""
    pid = tl.program_id(0)
    g = (pid // n_blocks).to(tl.int64)
    offs_m = (pid % n_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_tile(Q, g, offs_m, offs_d, n, D)
    scale_log2 = scale * _LOG2E
    rowp = _load_log2(ROWP, g, offs_m, n)
    row = tl.zeros([BLOCK_M], tl.float32)
    for start in range(0, m, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        k = _load_tile(K, g, offs_n, offs_d, m, D)
        colp = _load_log2(COLP, g, offs_n, m)
        gcol = _load_vector(GCOL, g, offs_n, m)
        s = _mm(q, tl.trans(k), PRECISION, UPCAST) * scale_log2 + rowp[:, None]
        w = tl.exp2(s + colp[None, :])
        row += tl.sum(w * gcol[None, :], 1)
    res = -row
    if HAS_INIT:
        res += _load_vector(ROW_INIT, g, offs_m, n)
    _store_vector(ROW_OUT, g, offs_m, n, res)


@triton.jit
def _per_row(x, TRANSPOSED: tl.constexpr):
    """A query-indexed vector broadcast over the tile (its columns when ``TRANSPOSED``)."""
    if TRANSPOSED:
        return x[None, :]
    else:
        return x[:, None]


@triton.jit
def _per_col(x, TRANSPOSED: tl.constexpr):
    """A key-indexed vector broadcast over the tile (its rows when ``TRANSPOSED``)."""
    if TRANSPOSED:
        return x[:, None]
    else:
        return x[None, :]


@triton.jit
def _ds_tile(
    q, k, do, val, offs_m, offs_n, mask_m, mask_n, g, n, m, stride_u, stride_v, scale,
    US, VS, GU, GV, ROWF, COLF, n_u, n_v,
    ODD: tl.constexpr, FACTORED: tl.constexpr, N_TERMS: tl.constexpr, TRANSPOSED: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """``(P, dS)``, both float32, on the tile of queries ``offs_m`` and keys ``offs_n``.

    Recomputes the logits ``S = scale * q k^T`` and ``dP = dO V^T`` from the loaded tiles;
    the dQ and the dK/dV kernels share this whole inner step. With ``TRANSPOSED`` the
    tiles are ``(P^T, dS^T)`` (keys by queries). Each kernel puts the side it loops over on
    the tile's rows: a thread holds two rows but ``BLOCK_N / 4`` columns of a matrix
    product's result, so the potentials and factors it loads per iteration are then
    fewest: 1.0 to 1.6 times fewer sm_90 instructions per logit than the other way round,
    by tile size and Triton version (``benchmarks/triton_sass.py``; not yet timed).

    ``dS = P * (dP - g_T) - sum_{t < T odd} g^t_i A^t_ij - sum_{t < T even} h^t_j B^t_ij``;
    entries outside the ``n x m`` matrix are 0 (their potentials load as ``-inf``). With
    ``FACTORED``, from the packed factors of
    :func:`~pointsink.sinkhorn_attention.score_gradient_factors` (``ROWF``, ``COLF``):
    ``dS = E * (alpha_i beta_j dP_ij - sum_k a^k_i b^k_j)``, one exponential per element;
    else one exponential per matrix and element.
    """
    # The t-th saved vector starts t * G * n entries in: past 2**31 for large batches of
    # long sets, where 32-bit offsets (Triton's type for int arguments below 2**31) wrap.
    stride_u = stride_u.to(tl.int64)
    stride_v = stride_v.to(tl.int64)
    if TRANSPOSED:
        s = _mm(k, tl.trans(q), PRECISION, UPCAST) * (scale * _LOG2E)
        dp = _mm(val, tl.trans(do), PRECISION, UPCAST)
    else:
        s = _mm(q, tl.trans(k), PRECISION, UPCAST) * (scale * _LOG2E)
        dp = _mm(do, tl.trans(val), PRECISION, UPCAST)
    # In-range indices for the loads of factors, which only multiply exponentials: those
    # are 0 outside the matrix, where the exponents' potentials load as -inf.
    row_off = g * n + tl.where(mask_m, offs_m, 0)
    col_off = g * m + tl.where(mask_n, offs_n, 0)
    if FACTORED:
        c = _load_log2(ROWF, g, offs_m, n)
        d = _load_log2(COLF, g, offs_n, m)
        e = tl.exp2(s + _per_row(c, TRANSPOSED) + _per_col(d, TRANSPOSED))
        alpha = tl.load(ROWF + stride_u + row_off)
        beta = tl.load(COLF + stride_v + col_off)
        final_scale = _per_row(alpha, TRANSPOSED) * _per_col(beta, TRANSPOSED)
        p = e * final_scale
        acc = dp * final_scale
        for t in tl.static_range(N_TERMS):
            a = tl.load(ROWF + (2 + t) * stride_u + row_off)
            b = tl.load(COLF + (2 + t) * stride_v + col_off)
            acc -= _per_row(a, TRANSPOSED) * _per_col(b, TRANSPOSED)
        ds = e * acc
    else:
        u_fin = _load_log2(US + (n_u - 1) * stride_u, g, offs_m, n)
        v_fin = _load_log2(VS + n_v * stride_v, g, offs_n, m)
        p = tl.exp2(s + _per_row(u_fin, TRANSPOSED) + _per_col(v_fin, TRANSPOSED))
        if ODD:
            g_fin = tl.load(GU + (n_u - 1) * stride_u + row_off)
            ds = p * (dp - _per_row(g_fin, TRANSPOSED))
            n_a = n_u - 1
            n_b = n_v
        else:
            g_fin = tl.load(GV + n_v * stride_v + col_off)
            ds = p * (dp - _per_col(g_fin, TRANSPOSED))
            n_a = n_u
            n_b = n_v - 1
        for i in range(0, n_a):  # A^{2i+1} = exp(S + u^{2i+1} + v^{2i})
            ui = _load_log2(US + i * stride_u, g, offs_m, n)
            vi = _load_log2(VS + i * stride_v, g, offs_n, m)
            gi = tl.load(GU + i * stride_u + row_off)
            a_i = tl.exp2(s + _per_row(ui, TRANSPOSED) + _per_col(vi, TRANSPOSED))
            ds -= _per_row(gi, TRANSPOSED) * a_i
        for j in range(1, n_b + 1):  # B^{2j} = exp(S + u^{2j-1} + v^{2j})
            uj = _load_log2(US + (j - 1) * stride_u, g, offs_m, n)
            vj = _load_log2(VS + j * stride_v, g, offs_n, m)
            gj = tl.load(GV + j * stride_v + col_off)
            b_j = tl.exp2(s + _per_row(uj, TRANSPOSED) + _per_col(vj, TRANSPOSED))
            ds -= _per_col(gj, TRANSPOSED) * b_j
    return p, ds


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, DQ, US, VS, GU, GV, ROWF, COLF,
    n, m, n_blocks, n_u, n_v, stride_u, stride_v, scale,
    D: tl.constexpr, E: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
    ODD: tl.constexpr, FACTORED: tl.constexpr, N_TERMS: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """``dQ = scale * dS K`` for one query block."""
    pid = tl.program_id(0)
    g = (pid // n_blocks).to(tl.int64)
    offs_m = (pid % n_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_E)
    mask_m = offs_m < n
    q = _load_tile(Q, g, offs_m, offs_d, n, D)
    do = _load_tile(DO, g, offs_m, offs_e, n, E)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, m, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        mask_n = offs_n < m
        k = _load_tile(K, g, offs_n, offs_d, m, D)
        val = _load_tile(V, g, offs_n, offs_e, m, E)
        _, ds = _ds_tile(
            q, k, do, val, offs_m, offs_n, mask_m, mask_n, g, n, m, stride_u, stride_v, scale,
            US, VS, GU, GV, ROWF, COLF, n_u, n_v, ODD, FACTORED, N_TERMS, True,
            PRECISION, UPCAST,
        )  # fmt: skip
        dq += _mm(tl.trans(ds).to(k.dtype), k, PRECISION, UPCAST)
    _store_tile(DQ, g, offs_m, offs_d, n, D, dq * scale)


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, US, VS, GU, GV, ROWF, COLF,
    n, m, n_blocks, n_u, n_v, stride_u, stride_v, scale,
    D: tl.constexpr, E: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
    HAS_DV: tl.constexpr, ODD: tl.constexpr, FACTORED: tl.constexpr, N_TERMS: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """``dK = scale * dS^T Q`` (and ``dV = P^T dO`` with ``HAS_DV``) for one key block."""
    pid = tl.program_id(0)
    g = (pid // n_blocks).to(tl.int64)
    offs_n = (pid % n_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_E)
    mask_n = offs_n < m
    k = _load_tile(K, g, offs_n, offs_d, m, D)
    val = _load_tile(V, g, offs_n, offs_e, m, E)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_E], tl.float32)
    for start in range(0, n, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        mask_m = offs_m < n
        q = _load_tile(Q, g, offs_m, offs_d, n, D)
        do = _load_tile(DO, g, offs_m, offs_e, n, E)
        p, ds = _ds_tile(
            q, k, do, val, offs_m, offs_n, mask_m, mask_n, g, n, m, stride_u, stride_v, scale,
            US, VS, GU, GV, ROWF, COLF, n_u, n_v, ODD, FACTORED, N_TERMS, False,
            PRECISION, UPCAST,
        )  # fmt: skip
        dk += _mm(tl.trans(ds).to(q.dtype), q, PRECISION, UPCAST)
        if HAS_DV:
            dv += _mm(tl.trans(p).to(do.dtype), do, PRECISION, UPCAST)
    _store_tile(DK, g, offs_n, offs_d, m, D, dk * scale)
    if HAS_DV:
        _store_tile(DV, g, offs_n, offs_e, m, E, dv)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


# The kernels by launch configuration: "row" (_row_lse_kernel and _out_kernel, one program
# per query block), "col" (_col_lse_kernel), "bwd_col", "bwd_row", "dq" and "dkdv".
KERNELS = ("row", "col", "bwd_col", "bwd_row", "dq", "dkdv")
LaunchConfig = tuple[int, int, int, int]  # (BLOCK_M, BLOCK_N, num_warps, num_stages)


# Shared memory per program from which the larger bfloat16/float16 tiles are used: each of
# their programs takes up to 64 KiB (Triton 3.6 and 3.9, sm_90; checked by the sm_90 compile
# test), so from here two fit in an SM, as on A100, H100 and H200. On GPUs with 99 KiB (most
# consumer ones) a 64 KiB program would run alone in its SM; none of this is timed there.
_LARGE_TILES_SHARED_MEMORY = 144 * 1024


def _blocks_for(
    head_dim: int, itemsize: int = 2, shared_memory: int | None = None
) -> dict[str, LaunchConfig]:
    """Default launch configuration of each kernel (:data:`KERNELS`).

    ``(BLOCK_M, BLOCK_N, num_warps, num_stages)``: queries and keys per tile, warps per
    program and software-pipelining depth, by head dimension, input bytes per element and
    the shared memory one program may use (``None``: unknown, e.g. under the interpreter).
    None is timed yet against the others (``benchmarks/triton_tuning.py`` does that on a
    GPU). Head dim <= 64 in bfloat16/float16 with enough shared memory: of the tuning
    script's candidates, those with the fewest sm_90 instructions per logit and no register
    spills under Triton 3.6 and 3.9 (``benchmarks/triton_sass.py``; 0.66x the instructions
    of the smaller tiles below). Head dim <= 64 in float32: likewise for the tf32x3 products
    of sm_80 and up. The rest: chosen so that the kernels compile without spills (or almost
    none; float32 tiles take twice the registers). Pass ``block_m``/``block_n`` to
    :func:`triton_sinkhorn_attention` to override the tile sizes.
    """
    large_tiles_fit = shared_memory is None or shared_memory >= _LARGE_TILES_SHARED_MEMORY
    if head_dim <= 64 and itemsize <= 2 and large_tiles_fit:
        return {
            "row": (128, 128, 8, 2),
            "col": (128, 128, 4, 2),
            "bwd_col": (64, 128, 4, 3),
            "bwd_row": (128, 128, 4, 2),
            "dq": (64, 128, 8, 3),
            "dkdv": (128, 64, 8, 3),
        }
    if head_dim <= 64 and itemsize == 4:
        # float32 through tf32x3 products (_float32_precision): about the fewest sm_90
        # instructions per logit, with no or few spills under Triton 3.6 and 3.9, of the
        # configurations counted (transposed tiles where a kernel loops over queries).
        return {
            "row": (128, 64, 8, 2),
            "col": (64, 64, 4, 2),
            "bwd_col": (32, 64, 4, 3),
            "bwd_row": (64, 64, 4, 2),
            "dq": (64, 32, 4, 2),
            "dkdv": (32, 64, 4, 2),
        }
    if head_dim <= 64:
        fwd, bwd = (128, 64, 8, 3), (64, 32, 4, 3)
    elif head_dim <= 128:
        fwd, bwd = (64, 64, 8, 3), (32, 32, 4, 3)
    else:
        fwd, bwd = (32, 32, 4, 3), (16, 16, 4, 3)
    return {"row": fwd, "col": fwd, "bwd_col": bwd, "bwd_row": bwd, "dq": bwd, "dkdv": bwd}


@functools.cache
def _shared_memory_per_program(device_index: int | None) -> int:
    """Bytes of shared memory one program may use on a CUDA device (0 if torch can't say)."""
    props = torch.cuda.get_device_properties(device_index)
    return int(getattr(props, "shared_memory_per_block_optin", 0))


def _float32_precision(q: Tensor) -> str:
    """``tl.dot``'s ``input_precision`` for float32 inputs (others ignore it).

    ``"tf32"`` where torch allows TF32 matmuls (``torch.backends.cuda.matmul.allow_tf32``),
    as torch's own matmul does. Otherwise float32 accuracy: ``"tf32x3"`` on NVIDIA GPUs
    with TF32 tensor cores (compute capability 8.0 and up), three TF32 products per ``dot``
    (the operands split into a TF32 part and a TF32 remainder, the remainders' product
    dropped); ``"ieee"`` elsewhere, a loop of float32 fused multiply-adds. In an emulation
    on a CPU (``benchmarks/RESULTS.md``) ``"tf32x3"`` kept outputs and gradients as close
    to float64 as float32 matmuls did (largest error over ``1 + max |ref|``: 0.75-4.7e-7
    against 0.87-6.0e-7), where one TF32 product was 1,000 times further off. Compiled for
    sm_90 at the float32 tiles of :func:`_blocks_for`, the kernels take 0.22-0.32x the
    instructions per logit of ``"ieee"`` at the earlier tiles, whose backward spilled.
    """
    if q.dtype != torch.float32 or not q.is_cuda or torch.version.hip is not None:
        return "ieee"
    if torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "tf32x3" if _compute_capability(q.device.index) >= (8, 0) else "ieee"


@functools.cache
def _compute_capability(device_index: int | None) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


def _config(q: Tensor, m: int, e: int, block_m: int | None, block_n: int | None) -> dict:
    """Launch configurations and ``tl.dot`` settings for one call (``m`` keys)."""
    for name, value in (("block_m", block_m), ("block_n", block_n)):
        if value is not None and (value < 16 or value & (value - 1)):
            raise ValueError(f"{name} must be a power of two >= 16; got {value}.")
    block_d = max(16, triton.next_power_of_2(q.shape[-1]))
    block_e = max(16, triton.next_power_of_2(e))
    # A tile no larger than the matrix: with 16 inducing points (ISAB) the default 64-key
    # tile would be three quarters padding.
    max_m = max(16, triton.next_power_of_2(q.shape[1]))
    max_n = max(16, triton.next_power_of_2(m))
    blocks = {}
    shared_memory = _shared_memory_per_program(q.device.index) if q.is_cuda else None
    defaults = _blocks_for(max(block_d, block_e), q.element_size(), shared_memory)
    for kernel, (bm, bn, num_warps, num_stages) in defaults.items():
        bm, bn = min(block_m or bm, max_m), min(block_n or bn, max_n)
        # Fewer warps for a clamped tile: at least 512 logits per warp (a power of two).
        blocks[kernel] = (bm, bn, min(num_warps, max(1, bm * bn // 512)), num_stages)
    return {
        "blocks": blocks,
        "BLOCK_D": block_d,
        "BLOCK_E": block_e,
        "PRECISION": _float32_precision(q),
        # The interpreter computes bfloat16 tl.dot wrongly: multiply in float32 there.
        "UPCAST": q.dtype == torch.bfloat16 and _interpreting(),
    }


# Pipeline stages that fit, for launches whose configured number did not; keyed by kernel,
# device and launch arguments.
_STAGES_THAT_FIT: dict[tuple, int] = {}


def _run(kernel: triton.JITFunction, grid: tuple[int], *args: object, **kwargs: object) -> None:
    """Launches ``kernel[grid](*args, **kwargs)``, with fewer stages where shared memory is short.

    Each software-pipelining stage buffers one more set of tiles in shared memory. The
    configured stages can need more than a program may use: float32 tiles with tf32x3
    products (up to 128.2 KiB at head dim 64, 256.5 KiB at 128; sm_90, Triton 3.6) on GPUs
    with 99 KiB (most consumer ones), 163 KiB (A100) or 227 KiB (H100, H200). Triton then
    raises ``OutOfResources`` before launching, so the launch is retried with one stage
    fewer, down to one; the first that fits is remembered for this kernel, device and
    arguments.

    Args:
        kernel: A ``@triton.jit`` kernel.
        grid: Number of programs, ``(programs,)``.
        *args: Its positional arguments; the first is a tensor on the launch device.
        **kwargs: Its constexpr and launch arguments, ``num_stages`` included.

    Raises:
        RuntimeError: Even one stage needs more shared memory than the device has.
    """
    device = args[0].device  # type: ignore[attr-defined]
    key = (kernel, device, tuple(sorted(kwargs.items())))
    stages = _STAGES_THAT_FIT.get(key, kwargs["num_stages"])
    while True:
        try:
            with on_launch_device(device):
                kernel[grid](*args, **{**kwargs, "num_stages": stages})
        except OutOfResources as error:
            if stages <= 1 or error.name != "shared memory":
                raise RuntimeError(
                    f"{kernel.fn.__name__} does not fit this GPU ({error}); pass smaller "
                    "block_m/block_n to triton_sinkhorn_attention, or use "
                    'sinkhorn_attention(..., backend="chunked").'
                ) from error
            stages -= 1
            continue
        if stages != kwargs["num_stages"]:
            _STAGES_THAT_FIT[key] = stages
        return


def _launch(cfg: dict, kernel: str, n: int, m: int) -> tuple[int, int, dict]:
    """Numbers of query and key blocks and the common launch arguments of a kernel."""
    block_m, block_n, num_warps, num_stages = cfg["blocks"][kernel]
    common = {
        "BLOCK_M": block_m,
        "BLOCK_N": block_n,
        "BLOCK_D": cfg["BLOCK_D"],
        "PRECISION": cfg["PRECISION"],
        "UPCAST": cfg["UPCAST"],
        "num_warps": num_warps,
        "num_stages": num_stages,
        # Fused multiply-adds, as compiled, counted and tested so far: Triton 3.9 warns that
        # its default turns to no fusion in 3.10.
        "enable_fp_fusion": True,
    }
    return triton.cdiv(n, block_m), triton.cdiv(m, block_n), common


class _TritonSinkhornAttention(SinkhornAttentionFunction):
    """Autograd function of the Triton backend on contiguous ``(G, n, d)`` inputs."""

    @staticmethod
    def forward(  # type: ignore[override]
        q: Tensor,
        k: Tensor,
        v: Tensor,
        n_iter: int,
        scale: float,
        block_m: int | None,
        block_n: int | None,
        query_mask: Tensor | None = None,
        key_mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        g, n, d = q.shape
        m, e = v.shape[1], v.shape[2]
        cfg = _config(q, m, e, block_m, block_n)
        n_u, n_v = (n_iter + 1) // 2, n_iter // 2
        us = q.new_empty(n_u, g, n, dtype=torch.float32)
        vs = q.new_zeros(n_v + 1, g, m, dtype=torch.float32)
        out = q.new_empty(g, n, e)
        nbm, _, row = _launch(cfg, "row", n, m)
        _, nbn, col = _launch(cfg, "col", n, m)
        block_e = cfg["BLOCK_E"]
        masked = query_mask is not None or key_mask is not None
        log_rows, log_cols, v_init = log_marginals(
            query_mask, key_mask, n, m, torch.float32, MASKED_LOG_MASS
        )
        # With masks the kernel subtracts the logsumexp alone and log b is added after it.
        log_col_mass = 0.0 if masked else math.log(n / m)
        if masked:
            vs[0] += v_init
        for i in range(n_u):
            last = 2 * i + 1 == n_iter
            _run(
                _row_lse_kernel, (g * nbm,),
                q, k, v, vs[i], us[i], out, n, m, nbm, scale,
                D=d, E=e, BLOCK_E=block_e, HAS_OUT=last, **row,
            )  # fmt: skip
            if masked:
                us[i] += log_rows
            if not last:
                _run(
                    _col_lse_kernel, (g * nbn,),
                    q, k, us[i], vs[i + 1], n, m, nbn, scale, log_col_mass, D=d, **col,
                )  # fmt: skip
                if masked:
                    vs[i + 1] += log_cols
        if n_iter % 2 == 0:
            _run(
                _out_kernel, (g * nbm,),
                q, k, v, us[n_u - 1], vs[n_v], out, n, m, nbm, scale,
                D=d, E=e, BLOCK_E=block_e, **row,
            )  # fmt: skip
        elif query_mask is not None:  # the row kernel normalized padded rows too
            out.masked_fill_(~query_mask.unsqueeze(-1), 0.0)
        return out, us, vs

    @staticmethod
    def setup_context(ctx: FunctionCtx, inputs: tuple, output: tuple) -> None:
        SinkhornAttentionFunction.setup_context(ctx, inputs, output)
        q, v, block_m, block_n = inputs[0], inputs[2], inputs[5], inputs[6]
        # The forward's settings, read now: the TF32 switch may change before the backward.
        ctx.cfg = _config(q, v.shape[1], v.shape[2], block_m, block_n)  # type: ignore[attr-defined]

    @staticmethod
    def vmap(
        info: Any, in_dims: tuple, *inputs: Any
    ) -> tuple[tuple[Tensor, Tensor, Tensor], tuple[int, int, int]]:
        return vmap_by_folding(_TritonSinkhornAttention, info, in_dims, inputs)

    @staticmethod
    def tiled_backward(ctx: FunctionCtx, dout: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        n_iter: int = ctx.n_iter  # type: ignore[attr-defined]
        scale: float = ctx.scale  # type: ignore[attr-defined]
        q, k, v, out, us, vs, query_mask, key_mask = ctx.saved_tensors  # type: ignore[attr-defined]
        dout = dout.contiguous()
        g, n, d = q.shape
        m, e = v.shape[1], v.shape[2]
        cfg = ctx.cfg  # type: ignore[attr-defined]
        n_u, n_v = (n_iter + 1) // 2, n_iter // 2
        odd = n_iter % 2 == 1
        _, nbn_col, bwd_col = _launch(cfg, "bwd_col", n, m)
        nbm_row, _, bwd_row = _launch(cfg, "bwd_row", n, m)
        nbm_dq, _, dq_args = _launch(cfg, "dq", n, m)
        _, nbn_dkdv, dkdv_args = _launch(cfg, "dkdv", n, m)
        block_e = cfg["BLOCK_E"]
        # With masks m' / n' differs per set: the kernels scale by 1, and gv by it after them.
        set_factor = real_size_ratio(query_mask, key_mask, g, n, m, torch.float32)
        col_factor = m / n if set_factor is None else 1.0

        delta = (dout.float() * out.float()).sum(-1)  # D_i = dO_i . O_i, (G, n)
        gu = torch.zeros_like(us)
        gv = torch.zeros_like(vs)  # gradients w.r.t. v^{2j}, times m / n
        dq = torch.empty_like(q)
        dk = torch.empty_like(k)
        dv = torch.empty_like(v)
        if odd:
            gu[n_u - 1] = delta
        if n_v >= 1:
            # dV = P^T dO and gv[n_v] = (m/n) (dV_j . V_j - [T odd] sum_i D_i P_ij)
            _run(
                _bwd_col_kernel, (g * nbn_col,),
                q, k, v, dout, dv, us[n_u - 1], vs[n_v], delta, gv[n_v],
                n, m, nbn_col, scale, col_factor,
                D=d, E=e, BLOCK_E=block_e, HAS_DV=True, HAS_GROW=odd, **bwd_col,
            )  # fmt: skip
            if set_factor is not None:
                gv[n_v] *= set_factor
            for j in range(n_v, 0, -1):
                # gu[j-1] = [u^{2j-1} final] D - B^{2j} gv[j]
                _run(
                    _bwd_row_kernel, (g * nbm_row,),
                    q, k, us[j - 1], vs[j], gv[j], delta, gu[j - 1],
                    n, m, nbm_row, scale,
                    D=d, HAS_INIT=(not odd and j == n_v), **bwd_row,
                )  # fmt: skip
                if j > 1:
                    # gv[j-1] = -(m/n) sum_i gu[j-1]_i A^{2j-1}_ij
                    _run(
                        _bwd_col_kernel, (g * nbn_col,),
                        q, k, v, dout, dv, us[j - 1], vs[j - 1], gu[j - 1], gv[j - 1],
                        n, m, nbn_col, scale, col_factor,
                        D=d, E=e, BLOCK_E=block_e, HAS_DV=False, HAS_GROW=True, **bwd_col,
                    )  # fmt: skip
                    if set_factor is not None:
                        gv[j - 1] *= set_factor
        # dS from rank-T factors, one exponential per element, where E cannot overflow.
        factored = use_factored_ds(n, m, n_iter)
        rowf, colf = score_gradient_factors(us, vs, gu, gv, n_iter) if factored else (us, vs)
        terms = {"ODD": odd, "FACTORED": factored, "N_TERMS": n_iter}
        _run(
            _bwd_dq_kernel, (g * nbm_dq,),
            q, k, v, dout, dq, us, vs, gu, gv, rowf, colf,
            n, m, nbm_dq, n_u, n_v, g * n, g * m, scale,
            D=d, E=e, BLOCK_E=block_e, **terms, **dq_args,
        )  # fmt: skip
        _run(
            _bwd_dkdv_kernel, (g * nbn_dkdv,),
            q, k, v, dout, dk, dv, us, vs, gu, gv, rowf, colf,
            n, m, nbn_dkdv, n_u, n_v, g * n, g * m, scale,
            D=d, E=e, BLOCK_E=block_e, HAS_DV=n_iter == 1, **terms, **dkdv_args,
        )  # fmt: skip
        return dq, dk, dv


def _check_grouped_inputs(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    n_iter: int,
    query_mask: Tensor | None,
    key_mask: Tensor | None,
) -> None:
    """Checks :func:`triton_sinkhorn_attention`'s arguments: no broadcasting, exact shapes."""
    _check_inputs(q, k, v, n_iter)  # shapes that fit, one device and dtype, n_iter >= 1
    if not (q.dim() == k.dim() == v.dim() == 3 and q.shape[0] == k.shape[0] == v.shape[0]):
        raise ValueError(
            "triton_sinkhorn_attention takes q (G, n, d), k (G, m, d), v (G, m, e) with one G "
            f"(no broadcasting); got shapes {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}."
        )
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"the triton backend supports float32/float16/bfloat16; got {q.dtype}.")
    for name, mask, shape in (
        ("query_mask", query_mask, q.shape[:2]),
        ("key_mask", key_mask, k.shape[:2]),
    ):
        if mask is None:
            continue
        if mask.dtype != torch.bool:
            raise TypeError(f"{name} must be a bool tensor; got {mask.dtype}.")
        if mask.shape != shape or mask.device != q.device:
            raise ValueError(
                f"{name} must have shape {tuple(shape)} on {q.device}; got "
                f"{tuple(mask.shape)} on {mask.device}."
            )


def triton_sinkhorn_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    n_iter: int,
    scale: float,
    block_m: int | None = None,
    block_n: int | None = None,
    *,
    query_mask: Tensor | None = None,
    key_mask: Tensor | None = None,
) -> Tensor:
    """Sinkhorn attention with the fused Triton kernels.

    Args:
        q: Queries ``(G, n, d)``, float32/float16/bfloat16, on CUDA (or CPU under
            ``TRITON_INTERPRET=1``).
        k: Keys ``(G, m, d)``, same dtype and device.
        v: Values ``(G, m, e)``, same dtype and device.
        n_iter: Number of Sinkhorn normalizations (``>= 1``).
        scale: Logit scale.
        block_m: Queries per tile (power of two ``>= 16``) of every kernel; default per
            head dimension and dtype (:func:`_blocks_for`).
        block_n: Keys per tile, likewise.
        query_mask: ``(G, n)`` bool, True for real queries, or None (all real).
        key_mask: ``(G, m)`` bool, True for real keys, or None (all real). The masks are
            taken as prepared by :func:`~pointsink.sinkhorn_attention.sinkhorn_attention`,
            which calls this: every set has a real query and a real key, and padded
            inputs are finite (:func:`~pointsink.sinkhorn.prepare_masks`,
            :func:`~pointsink.sinkhorn.zero_padded`); else the output is NaN.

    Returns:
        Output ``(G, n, e)`` in the input dtype; 0 in padded query rows.

    Raises:
        ValueError: Shapes, devices or masks that do not fit, or ``n_iter`` below 1 (the
            kernels would read out of bounds or return garbage).
        TypeError: Inputs of other or different dtypes, or masks that are not bool.
    """
    _check_grouped_inputs(q, k, v, n_iter, query_mask, key_mask)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    return _TritonSinkhornAttention.apply(
        q, k, v, n_iter, float(scale), block_m, block_n, query_mask, key_mask
    )[0]
