"""Tests of the memory-efficient Sinkhorn attention (pointsink.sinkhorn_attention).

The chunked backend is compared with autograd through the dense reference in float64. The
Triton kernels run under Triton's CPU interpreter and are compiled for sm_90 with the ptxas
that ships with triton, each in a subprocess (skipped without triton; no GPU needed); with a
CUDA GPU the same checks, plus larger shapes, also run compiled on it.
"""

from __future__ import annotations

import importlib.util
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from _triton_utils import BENCHMARKS, HAS_TRITON, bundled_ptxas, run_python

from pointsink.sinkhorn import sinkhorn
from pointsink.sinkhorn_attention import (
    FINAL_SCALE,
    FIRST_FACTOR,
    SHIFT,
    dense_sinkhorn_attention,
    factored_ds_log_bound,
    score_gradient_factors,
    sinkhorn_attention,
    use_factored_ds,
)

# The module itself: ``pointsink.sinkhorn_attention`` is also the package's function.
attention_module = importlib.import_module("pointsink.sinkhorn_attention")


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors gain nothing from threads, and on a busy 2-core machine intra-op thread
    pools stall on every small op; restore the setting afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _qkv(
    batch: tuple[int, ...],
    n: int,
    m: int,
    d: int = 4,
    e: int = 3,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    spread: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(*batch, n, d, generator=gen, dtype=torch.float64) * spread
    k = torch.randn(*batch, m, d, generator=gen, dtype=torch.float64)
    v = torch.randn(*batch, m, e, generator=gen, dtype=torch.float64)
    return tuple(t.to(dtype).requires_grad_() for t in (q, k, v))  # type: ignore[return-value]


def _value_and_grads(
    fn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seed: int = 1
) -> tuple[torch.Tensor, ...]:
    out = fn(q, k, v)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out)
    return (out.detach(), *torch.autograd.grad(out, (q, k, v), grad_out))


def _assert_matches_dense(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    n_iter: int,
    atol: float,
    rtol: float = 0.0,
    **kwargs,
) -> None:
    got = _value_and_grads(lambda *a: sinkhorn_attention(*a, n_iter, **kwargs), q, k, v)
    ref = _value_and_grads(lambda *a: dense_sinkhorn_attention(*a, n_iter), q, k, v)
    for name, x, y in zip(("out", "dq", "dk", "dv"), got, ref, strict=True):
        torch.testing.assert_close(x, y, atol=atol, rtol=rtol, msg=lambda s, n=name: f"{n}: {s}")


@pytest.mark.parametrize("n_iter", range(1, 10))
@pytest.mark.parametrize(("n", "m"), [(12, 12), (17, 5), (5, 17)])
def test_chunked_matches_dense_float64(n_iter: int, n: int, m: int) -> None:
    q, k, v = _qkv((2, 3), n, m)
    # Default tiles (all keys in one tile), then tiles that divide neither n nor m.
    _assert_matches_dense(q, k, v, n_iter, atol=1e-12, backend="chunked")
    _assert_matches_dense(q, k, v, n_iter, atol=1e-12, backend="chunked", chunk_size=(4, 3))


@pytest.mark.parametrize("n_iter", [1, 2, 5])
@pytest.mark.parametrize(("n", "m", "chunks"), [(1024, 16, (300, 7)), (16, 1024, (7, 300))])
def test_chunked_isab_shapes(n_iter: int, n: int, m: int, chunks: tuple[int, int]) -> None:
    q, k, v = _qkv((2, 2), n, m, d=8, e=4)
    _assert_matches_dense(q, k, v, n_iter, atol=1e-11, backend="chunked")
    _assert_matches_dense(q, k, v, n_iter, atol=1e-11, backend="chunked", chunk_size=chunks)


@pytest.mark.parametrize(
    ("q_batch", "kv_batch"),
    [((), ()), ((1,), (1,)), ((3,), (3,)), ((2, 4), (2, 4)), ((2, 4), (2, 1)), ((5, 1, 2), (3, 1))],
)
def test_chunked_batch_and_head_shapes(q_batch: tuple[int, ...], kv_batch: tuple[int, ...]) -> None:
    q = _qkv(q_batch, 9, 6)[0]
    _, k, v = _qkv(kv_batch, 9, 6, seed=1)
    _assert_matches_dense(q, k, v, 4, atol=1e-12, backend="chunked", chunk_size=(4, 4))
    expected = (*torch.broadcast_shapes(q_batch, kv_batch), 9, 3)
    assert sinkhorn_attention(q, k, v, 3).shape == expected


@pytest.mark.parametrize(
    ("check", "n_iter"),
    [
        (torch.autograd.gradcheck, 3),
        (torch.autograd.gradcheck, 4),
        (torch.autograd.gradgradcheck, 1),  # second order: a gradient penalty's gradient
        (torch.autograd.gradgradcheck, 4),
    ],
)
def test_chunked_gradcheck(check, n_iter: int) -> None:
    q, k, v = _qkv((2,), 5, 4, d=3, e=2)
    assert check(
        lambda a, b, c: sinkhorn_attention(a, b, c, n_iter, backend="chunked", chunk_size=(2, 3)),
        (q, k, v),
    )


def test_gradient_penalty_matches_dense() -> None:
    # A gradient penalty (create_graph=True) through the chunked backend, inputs that do not
    # all need gradients, and leading dimensions that broadcast.
    q, k, v = _qkv((2, 3), 7, 5)
    k = k[:1].detach()

    def penalty_grads(backend: str) -> tuple[torch.Tensor, ...]:
        out = sinkhorn_attention(q, k, v, 5, backend=backend, chunk_size=(3, 2))
        grads = torch.autograd.grad((out * out.detach().cos()).sum(), (q, v), create_graph=True)
        return torch.autograd.grad(sum(g.square().sum() for g in grads), (q, v))

    for got, want in zip(penalty_grads("chunked"), penalty_grads("dense"), strict=True):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)


def _masks(batch: tuple[int, ...], n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Padding masks with a few padded queries and keys per set, none empty."""
    gen = torch.Generator().manual_seed(3)
    query_mask = torch.rand(*batch, n, generator=gen) > 0.3
    key_mask = torch.rand(*batch, m, generator=gen) > 0.3
    query_mask[..., 0] = key_mask[..., 0] = True
    return query_mask, key_mask


@pytest.mark.parametrize("masked", [False, True])
def test_torch_func_transforms_match_a_loop_of_dense_attention(masked: bool) -> None:
    # grad, vmap, jacrev and per-sample gradients (vmap of grad) through the chunked
    # backend, the CPU's default, with the vmapped dimension not in front and a key shared
    # by all samples; references: dense attention and plain autograd, one sample at a time.
    from torch.func import grad, jacrev, vmap

    q, k, v = (t.detach() for t in _qkv((4, 2), 6, 5))
    query_mask, key_mask = _masks((4, 2), 6, 5) if masked else (None, None)
    samples = range(q.shape[0])
    mask_dim = 0 if masked else None

    def mask_of(mask: torch.Tensor | None, i: int) -> torch.Tensor | None:
        return None if mask is None else mask[i]

    def chunked(q, k, v, query_mask, key_mask):
        return sinkhorn_attention(
            q, k, v, 4, chunk_size=(2, 2), query_mask=query_mask, key_mask=key_mask
        )

    def dense(q, k, v, query_mask, key_mask):
        return dense_sinkhorn_attention(q, k, v, 4, query_mask=query_mask, key_mask=key_mask)

    def loss(q, k, query_mask, key_mask, attention=chunked):
        return attention(q, k, v[0], query_mask, key_mask).square().sum()

    # vmap over dimension 2 of q (samples moved behind heads and queries), the query mask
    # over 1, the key mask shared by all samples (masked), k and v not at all.
    shared_key_mask = mask_of(key_mask, 0)
    got = vmap(chunked, in_dims=(2, None, None, None if mask_dim is None else 1, None))(
        q.movedim(0, 2),
        k[0],
        v[0],
        None if query_mask is None else query_mask.movedim(0, 1),
        shared_key_mask,
    )
    want = torch.stack(
        [dense(q[i], k[0], v[0], mask_of(query_mask, i), shared_key_mask) for i in samples]
    )
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)

    per_sample = vmap(grad(loss, argnums=(0, 1)), in_dims=(0, None, mask_dim, mask_dim))(
        q, k[0], query_mask, key_mask
    )
    for i in samples:
        qi, ki = q[i].clone().requires_grad_(), k[0].clone().requires_grad_()
        want_grads = torch.autograd.grad(
            loss(qi, ki, mask_of(query_mask, i), mask_of(key_mask, i), dense), (qi, ki)
        )
        for got_grad, want_grad in zip(per_sample, want_grads, strict=True):
            torch.testing.assert_close(got_grad[i], want_grad, atol=1e-12, rtol=1e-10)

    jacobian = jacrev(lambda v: chunked(q[0], k[0], v, mask_of(query_mask, 0), None))(v[0])
    want_jacobian = torch.autograd.functional.jacobian(
        lambda v: dense(q[0], k[0], v, mask_of(query_mask, 0), None), v[0]
    )
    torch.testing.assert_close(jacobian, want_jacobian, atol=1e-12, rtol=0)


@pytest.mark.parametrize("masked", [False, True])
def test_forward_mode_matches_dense_attention(masked: bool) -> None:
    # jvp, jacfwd and hessian (forward over reverse) through the chunked backend, against
    # the same transforms of dense attention and against reverse mode.
    from torch.func import hessian, jacfwd, jacrev, jvp

    q, k, v = (t.detach() for t in _qkv((2,), 7, 6))
    query_mask, key_mask = _masks((2,), 7, 6) if masked else (None, None)
    masks = {"query_mask": query_mask, "key_mask": key_mask}

    def chunked(q, k, v):
        return sinkhorn_attention(q, k, v, 4, chunk_size=(2, 2), **masks)

    def dense(q, k, v):
        return dense_sinkhorn_attention(q, k, v, 4, **masks)

    def tangent_of(attention) -> torch.Tensor:  # v held constant
        return jvp(lambda q, k: attention(q, k, v), (q, k), (torch.ones_like(q), k.sin()))[1]

    torch.testing.assert_close(tangent_of(chunked), tangent_of(dense), atol=1e-12, rtol=0)
    jacobian = jacfwd(lambda k: chunked(q, k, v))(k)
    torch.testing.assert_close(jacobian, jacrev(lambda k: dense(q, k, v))(k), atol=1e-12, rtol=0)
    got = hessian(lambda v: chunked(q, k, v).square().sum())(v)
    want = hessian(lambda v: dense(q, k, v).square().sum())(v)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)
    # Half-precision inputs: the tangent has the output's dtype, as torch.func requires of
    # its own operators (the dense reference computes it in float32).
    q16, k16, v16 = (t.bfloat16() for t in (q, k, v))
    out, tangent = jvp(lambda q: chunked(q, k16, v16), (q16,), (torch.ones_like(q16),))
    assert out.dtype == tangent.dtype == torch.bfloat16


def test_vmap_rule_of_the_chunked_function_keeps_each_samples_potentials() -> None:
    # The tiled backward reads the saved potentials, so the vmap rule must return them with
    # their sample dimension in place (it is dimension 1 of (T', G, n)), as one call per
    # sample would.
    from torch.func import vmap

    apply = attention_module._ChunkedSinkhornAttention.apply
    q, k, v = (t.detach() for t in _qkv((3, 2), 6, 5))
    query_mask, key_mask = _masks((3, 2), 6, 5)
    # q vmapped over its dimension 2, the key mask shared by every sample.
    got = vmap(lambda *a: apply(*a[:3], 4, 0.5, 2, 2, *a[3:]), in_dims=(2, 0, 0, 0, None))(
        q.movedim(0, 2), k, v, query_mask, key_mask[0]
    )
    for i in range(q.shape[0]):
        want = apply(q[i], k[i], v[i], 4, 0.5, 2, 2, query_mask[i], key_mask[0])
        for name, x, y in zip(("out", "us", "vs"), got, want, strict=True):
            torch.testing.assert_close(x[i], y, atol=1e-12, rtol=0, msg=name)


def test_chunked_float32_close_to_dense() -> None:
    q, k, v = _qkv((2, 2), 64, 48, d=16, e=8, dtype=torch.float32)
    _assert_matches_dense(q, k, v, 5, atol=2e-5, rtol=1e-4, backend="chunked")


@pytest.mark.parametrize("scale", [None, 0.3])
def test_one_iteration_is_softmax_attention(scale: float | None) -> None:
    q, k, v = _qkv((2, 3), 20, 11, d=8, e=5, dtype=torch.float32)
    for backend in ("chunked", "dense"):
        out = sinkhorn_attention(q, k, v, 1, scale=scale, backend=backend, chunk_size=(6, 4))
        expected = F.scaled_dot_product_attention(q, k, v, scale=scale)
        torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)


def test_scale_override_matches_dense() -> None:
    q, k, v = _qkv((2,), 10, 7)
    got = sinkhorn_attention(q, k, v, 3, scale=0.37, chunk_size=3)
    ref = sinkhorn(q @ k.transpose(-2, -1) * 0.37, 3) @ v
    torch.testing.assert_close(got, ref, atol=1e-12, rtol=0)


def test_large_logits_stay_finite() -> None:
    # Logits of order 1e3..1e4, far beyond exp's float32 range.
    q, k, v = _qkv((2,), 16, 12, dtype=torch.float32, spread=2e3)
    out = sinkhorn_attention(q, k, v, 5, chunk_size=(5, 5))
    out.sum().backward()
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    ref = dense_sinkhorn_attention(*(t.detach().double() for t in (q, k, v)), 5)
    torch.testing.assert_close(out.double(), ref, atol=1e-3, rtol=0)


def test_chunked_half_precision_inputs_are_normalized_in_float32() -> None:
    # bfloat16 q, k, v with large logits: the potentials and logsumexps stay float32, so the
    # output is off by bfloat16's rounding of the output (about 4e-3), not of every step.
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 32, 8, generator=gen) * 10
    k, v = torch.randn(2, 24, 8, generator=gen), torch.randn(2, 24, 4, generator=gen)
    q, k, v = (t.bfloat16() for t in (q, k, v))
    out = sinkhorn_attention(q, k, v, 5, backend="chunked")
    assert out.dtype == torch.bfloat16
    ref = dense_sinkhorn_attention(*(t.double() for t in (q, k, v)), 5)
    torch.testing.assert_close(out.double(), ref, atol=1e-2, rtol=0)


def test_float16_products_beyond_its_range_with_logits_inside_it() -> None:
    # d = 64: raw q.k of 102400 overflows float16 (65504); the logits (/ 8) do not. The dense
    # path multiplied before scaling and gave NaN, the chunked path (and the monitor's
    # marginals, always dense) must agree with the float64 reference.
    from pointsink.attention import attention_marginals

    q = torch.full((1, 3, 64), 40.0)
    k = torch.tensor([40.0, -40.0, 40.0, -40.0])[None, :, None].expand(1, 4, 64)
    v = torch.randn(1, 4, 8)
    ref = dense_sinkhorn_attention(q.double(), k.double(), v.double(), 5)
    for backend in ("dense", "chunked"):
        out = sinkhorn_attention(q.half(), k.half(), v.half(), 5, backend=backend)
        torch.testing.assert_close(out.double(), ref, atol=1e-2, rtol=0)
    rows, columns = attention_marginals(q.half()[:, None], k.half()[:, None])
    assert torch.isfinite(rows).all() and torch.isfinite(columns).all()


@pytest.mark.parametrize("n_iter", [2, 3, 4, 5, 9])
def test_score_gradient_factors_rebuild_ds(n_iter: int) -> None:
    # dS = P * dP - sum_t g^t A^t - sum_t h^t B^t, each matrix exponentiated on its own,
    # against E * (alpha beta dP - a b^T) from the factors, on random potentials.
    gen = torch.Generator().manual_seed(n_iter)
    g, n, m = 2, 7, 5
    n_u, n_v = (n_iter + 1) // 2, n_iter // 2
    s = torch.randn(g, n, m, generator=gen, dtype=torch.float64) * 3
    us = torch.randn(n_u, g, n, generator=gen, dtype=torch.float64) * 4
    vs = torch.randn(n_v + 1, g, m, generator=gen, dtype=torch.float64) * 4
    vs[0] = 0
    gu = torch.randn(us.shape, generator=gen, dtype=torch.float64)
    gv = torch.randn(vs.shape, generator=gen, dtype=torch.float64)
    dp = torch.randn(g, n, m, generator=gen, dtype=torch.float64)

    def matrix(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return (s + u[..., :, None] + v[..., None, :]).exp()

    p = matrix(us[-1], vs[-1])
    final_grad = gu[-1][..., :, None] if n_iter % 2 else gv[-1][..., None, :]
    expected = p * (dp - final_grad)
    for t in range(1, n_iter):
        if t % 2:  # A^t = exp(S + u^t + v^{t-1})
            i = (t - 1) // 2
            expected -= gu[i][..., :, None] * matrix(us[i], vs[i])
        else:  # B^t = exp(S + u^{t-1} + v^t)
            j = t // 2
            expected -= gv[j][..., None, :] * matrix(us[j - 1], vs[j])

    rows, cols = score_gradient_factors(us, vs, gu, gv, n_iter)
    assert rows.shape == (n_iter + 2, g, n) and cols.shape == (n_iter + 2, g, m)
    e = matrix(rows[SHIFT], cols[SHIFT])
    rank_terms = torch.einsum("kgi,kgj->gij", rows[FIRST_FACTOR:], cols[FIRST_FACTOR:])
    got = e * (rows[FINAL_SCALE][..., :, None] * cols[FINAL_SCALE][..., None, :] * dp - rank_terms)
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(
        e * rows[FINAL_SCALE][..., :, None] * cols[FINAL_SCALE][..., None, :], p
    )
    # The shifts are the largest potentials, so no exponential factor exceeds 1.
    assert (rows[FINAL_SCALE] <= 1).all() and (cols[FINAL_SCALE] <= 1).all()


@pytest.mark.parametrize("factored", [True, False])
@pytest.mark.parametrize("n_iter", [2, 5])
def test_chunked_factored_and_per_matrix_ds_both_match_dense(
    monkeypatch: pytest.MonkeyPatch, factored: bool, n_iter: int
) -> None:
    # Forces each way of assembling dS: factored, or one exponential per matrix.
    monkeypatch.setattr(attention_module, "use_factored_ds", lambda n, m, t: factored)
    q, k, v = _qkv((2, 3), 17, 5)
    _assert_matches_dense(q, k, v, n_iter, atol=1e-12, backend="chunked", chunk_size=(4, 3))


@pytest.mark.parametrize(("n", "m"), [(40, 40), (60, 7), (7, 60)])
@pytest.mark.parametrize("n_iter", [3, 5, 9])
def test_factored_shift_bound_holds_for_extreme_logits(n: int, n_iter: int, m: int) -> None:
    # log E = S_ij + max_t u^t_i + max_t v^t_j never exceeds the bound that
    # use_factored_ds relies on, even for logits of order 1e3 whose potentials rise by
    # hundreds of nats between iterations.
    bound = factored_ds_log_bound(n, m, n_iter)
    for seed, spread in ((0, 1.0), (1, 30.0), (2, 1e3)):
        q, k, v = (t.detach() for t in _qkv((3,), n, m, seed=seed, spread=spread))
        _, us, vs = attention_module._chunked_forward(q, k, v, n_iter, n, m)
        s = q @ k.transpose(1, 2)
        log_e = s + us.amax(0)[..., :, None] + vs.amax(0)[..., None, :]
        assert log_e.max() <= bound + 1e-9
        if spread == 1e3:  # the potentials' ranges alone would allow overflow
            ranges = (us.amax(0) - us.amin(0)).amax() + (vs.amax(0) - vs.amin(0)).amax()
            assert ranges > 100
    # P <= n / m when n > m: one row normalization leaves log(n / m), not 0.
    assert factored_ds_log_bound(60, 7, 1) == pytest.approx(math.log(60 / 7))
    assert factored_ds_log_bound(7, 60, 1) == 0.0
    assert use_factored_ds(16384, 16384, 9) and use_factored_ds(8192, 16, 9)
    assert not use_factored_ds(65536, 65536, 9)
    assert not use_factored_ds(n, m, 1)  # a single matrix: nothing to factor


def test_no_saved_tensor_of_size_n_by_m() -> None:
    batch, n, m, n_iter = (2, 2), 64, 48, 9
    heads = batch[0] * batch[1]
    q, k, v = _qkv(batch, n, m, d=8, e=8, dtype=torch.float32)

    def largest_saved_per_head(fn) -> int:
        sizes: list[int] = []

        def pack(t: torch.Tensor) -> torch.Tensor:
            sizes.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = fn(q, k, v, n_iter)
        out.sum().backward()
        return max(sizes) // heads

    # The check can fail: autograd through the dense reference saves n x m matrices.
    assert largest_saved_per_head(dense_sinkhorn_attention) >= n * m
    largest = largest_saved_per_head(sinkhorn_attention)
    assert largest < n * m
    # Saved: q, k, v, output and (n_iter // 2 + 1) potentials of each side per head.
    assert largest <= max(n, m) * max(8, n_iter // 2 + 1)


def test_autocast_bfloat16_on_cpu() -> None:
    q, k, v = _qkv((2,), 24, 10, d=8, e=4, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sinkhorn_attention(q, k, v, 4)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert q.grad is not None and q.grad.dtype == torch.float32
    ref = dense_sinkhorn_attention(*(t.detach().to(torch.bfloat16).float() for t in (q, k, v)), 4)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


def test_inputs_without_grad_and_dense_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    q, k, v = (t.detach() for t in _qkv((3,), 7, 9))
    ref = dense_sinkhorn_attention(q, k, v, 6)
    torch.testing.assert_close(sinkhorn_attention(q, k, v, 6), ref, atol=1e-12, rtol=0)
    # The chunked result would pass the comparison too: make sure it is not what runs.
    monkeypatch.setattr(
        attention_module._ChunkedSinkhornAttention,
        "apply",
        lambda *args: pytest.fail("backend='dense' ran the chunked kernel"),
    )
    torch.testing.assert_close(sinkhorn_attention(q, k, v, 6, backend="dense"), ref)


def test_invalid_arguments() -> None:
    q, k, v = (t.detach() for t in _qkv((2,), 4, 3))
    with pytest.raises(ValueError, match="n_iter"):
        sinkhorn_attention(q, k, v, 0)
    with pytest.raises(ValueError, match="shapes"):
        sinkhorn_attention(q, k[..., :2], v, 1)
    with pytest.raises(ValueError, match="shapes"):
        sinkhorn_attention(q, k, v[:, :2], 1)
    with pytest.raises(ValueError, match="shapes"):
        sinkhorn_attention(q[0, 0], k, v, 1)
    for backend in ("chunked", "dense"):  # leading dimensions that do not broadcast
        with pytest.raises(ValueError, match="broadcast; got shapes"):
            sinkhorn_attention(q, torch.cat([k, k, k]), torch.cat([v, v, v]), 1, backend=backend)
    with pytest.raises(TypeError, match="dtype"):
        sinkhorn_attention(q, k.float(), v, 1)
    with pytest.raises(ValueError, match="backend"):
        sinkhorn_attention(q, k, v, 1, backend="flash")  # type: ignore[arg-type]
    # Chunk sizes go through check_int, like every integer argument of the package.
    with pytest.raises(ValueError, match="chunk_size must be at least 1"):
        sinkhorn_attention(q, k, v, 1, chunk_size=(0, 2))
    with pytest.raises(ValueError, match="chunk_size must be an integer"):
        sinkhorn_attention(q, k, v, 1, chunk_size=2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="chunk_size must be an integer"):
        sinkhorn_attention(q, k, v, 1, chunk_size=(2, True))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="chunk_size"):
        sinkhorn_attention(q, k, v, 1, chunk_size=(2, 2, 2))  # type: ignore[arg-type]
    # A list pair is a pair, as a tuple is.
    torch.testing.assert_close(
        sinkhorn_attention(q, k, v, 3, chunk_size=[2, 1]),
        sinkhorn_attention(q, k, v, 3, chunk_size=(2, 1)),
    )
    # A learnable scale would silently get no gradient.
    with pytest.raises(TypeError, match="multiply q"):
        sinkhorn_attention(q, k, v, 1, scale=torch.tensor(0.5, requires_grad=True))  # type: ignore[arg-type]
    torch.testing.assert_close(
        sinkhorn_attention(q, k, v, 3, scale=torch.tensor(0.5)),  # type: ignore[arg-type]
        sinkhorn_attention(q, k, v, 3, scale=0.5),
    )
    with torch.no_grad():  # no graph to be cut from: a parameter is just its value
        scale = torch.nn.Parameter(torch.tensor(0.5))
        out = sinkhorn_attention(q, k, v, 3, scale=scale)  # type: ignore[arg-type]
    torch.testing.assert_close(out, sinkhorn_attention(q, k, v, 3, scale=0.5))


def test_numpy_integer_chunk_sizes() -> None:
    q, k, v = (t.detach() for t in _qkv((2,), 9, 7))
    expected = sinkhorn_attention(q, k, v, 3, backend="chunked", chunk_size=(4, 3))
    got = sinkhorn_attention(q, k, v, 3, backend="chunked", chunk_size=(np.int64(4), np.int32(3)))
    assert torch.equal(got, expected)
    expected = sinkhorn_attention(q, k, v, 3, backend="chunked", chunk_size=4)
    assert torch.equal(sinkhorn_attention(q, k, v, 3, chunk_size=np.int64(4)), expected)


def test_inputs_on_different_devices_are_rejected() -> None:
    q, k, v = (t.detach() for t in _qkv((2,), 4, 3))
    meta = torch.device("meta")
    for args in ((q, k.to(meta), v), (q, k, v.to(meta)), (q.to(meta), k, v)):
        with pytest.raises(ValueError, match="one device"):
            sinkhorn_attention(*args, 2)


@pytest.mark.parametrize("backend", ["chunked", "dense"])
def test_meta_tensors_give_meta_results_and_gradients(backend: str) -> None:
    """torch.autocast raises for the meta device: the forward and the backward (which
    recomputes tiles without autocast) must not enter an autocast guard there."""
    q, k = (torch.empty(1, 2, size, 8, device="meta", requires_grad=True) for size in (5, 3))
    out = sinkhorn_attention(q, k, k, 3, backend=backend)
    assert (out.device.type, out.shape) == ("meta", (1, 2, 5, 8))
    out.sum().backward()
    assert q.grad.device.type == k.grad.device.type == "meta"
    assert (q.grad.shape, k.grad.shape) == ((1, 2, 5, 8), (1, 2, 3, 8))


@pytest.mark.parametrize("backend", ["chunked", "dense"])
def test_autocast_leaves_float64_alone(backend: str) -> None:
    """Like matmul and sdpa under autocast: float64 inputs are not cast to bfloat16."""
    q, k, v = _qkv((2,), 24, 10, d=8, e=4)
    expected = sinkhorn_attention(q, k, v, 4, backend=backend)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sinkhorn_attention(q, k, v, 4, backend=backend)
    assert out.dtype == torch.float64
    # bfloat16 inputs would be off by about 1e-2.
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)
    out.sum().backward()
    assert q.grad is not None and q.grad.dtype == torch.float64


@pytest.mark.parametrize("backend", ["chunked", "dense"])
def test_autocast_casts_float32_inputs_to_the_autocast_dtype(backend: str) -> None:
    q, k, v = (t.detach() for t in _qkv((2,), 24, 10, d=8, e=4, dtype=torch.float32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sinkhorn_attention(q, k, v, 4, backend=backend)
        from_bf16 = sinkhorn_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), 4, backend=backend)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, from_bf16)
    # Inputs of several dtypes are cast one by one, as matmul and sdpa cast them.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = sinkhorn_attention(q, k.bfloat16(), v, 4, backend=backend)
    assert torch.equal(mixed, from_bf16)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("n", "m"), [(4096, 4096), (1000, 16), (16, 1000), (20, 9)])
def test_triton_tiles_never_exceed_the_matrix(n: int, m: int, dtype: torch.dtype) -> None:
    from pointsink import triton_sinkhorn

    q = torch.empty(2, n, 64, dtype=dtype)
    blocks = triton_sinkhorn._config(q, m, 64, None, None)["blocks"]
    defaults = triton_sinkhorn._blocks_for(64, q.element_size())
    assert set(blocks) == set(triton_sinkhorn.KERNELS)
    for kernel, (block_m, block_n, num_warps, num_stages) in blocks.items():
        default_m, default_n, default_warps, default_stages = defaults[kernel]
        # The default, or the smallest power of two >= 16 that covers the side.
        assert block_m == min(default_m, max(16, 1 << (n - 1).bit_length()))
        assert block_n == min(default_n, max(16, 1 << (m - 1).bit_length()))
        assert num_warps == min(default_warps, max(1, block_m * block_n // 512))
        assert num_stages == default_stages


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_large_tiles_only_where_they_fit() -> None:
    from pointsink import triton_sinkhorn

    small = triton_sinkhorn._blocks_for(64, 2, 99 * 1024)  # e.g. an RTX 4090
    assert triton_sinkhorn._blocks_for(64, 2, 0) == small  # torch could not say
    large = triton_sinkhorn._blocks_for(64, 2, 227 * 1024)  # H100, H200
    assert large == triton_sinkhorn._blocks_for(64, 2)  # unknown: the interpreter
    assert all(large[k][0] * large[k][1] > small[k][0] * small[k][1] for k in ("dq", "dkdv"))
    # float32 (tf32x3 products) has tiles of its own, whatever the shared memory: _run takes
    # fewer stages where it is short.
    float32 = triton_sinkhorn._blocks_for(64, 4)
    assert float32 == triton_sinkhorn._blocks_for(64, 4, 99 * 1024)
    assert float32 == triton_sinkhorn._blocks_for(64, 4, 227 * 1024)
    assert float32 not in (small, large)
    assert triton_sinkhorn._blocks_for(128, 2) == triton_sinkhorn._blocks_for(128, 4)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_entry_point_checks_its_inputs() -> None:
    """The public Triton function takes (G, n, d) inputs as they are: any mismatch is refused
    before a kernel reads out of bounds (keys of another head dimension, fewer sets)."""
    from pointsink.triton_sinkhorn import triton_sinkhorn_attention

    q, k, v = torch.randn(2, 9, 4), torch.randn(2, 7, 4), torch.randn(2, 7, 3)
    mask = torch.ones(2, 9, dtype=torch.bool)
    cases = [
        ((q, torch.randn(2, 7, 8), v, 3, {}), ValueError, "needs q"),
        ((q, k[:1], v[:1], 3, {}), ValueError, "with one G"),
        ((q[0], k[0], v[0], 3, {}), ValueError, "with one G"),
        ((q[:, :0], k, v, 3, {}), ValueError, "at least one query"),
        ((q, k, v, 0, {}), ValueError, "n_iter must be at least 1"),
        ((q, k.bfloat16(), v, 3, {}), TypeError, "share one floating dtype"),
        ((q.double(), k.double(), v.double(), 3, {}), TypeError, "float32/float16/bfloat16"),
        ((q, k, v, 3, {"query_mask": mask[:, :7]}), ValueError, "query_mask must have shape"),
        ((q, k, v, 3, {"key_mask": mask[:, :7].float()}), TypeError, "key_mask must be a bool"),
    ]
    for (q_, k_, v_, n_iter, masks), error, message in cases:
        with pytest.raises(error, match=message):
            triton_sinkhorn_attention(q_, k_, v_, n_iter, 0.5, **masks)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_backend_needs_cuda_or_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v = (t.detach().float() for t in _qkv((2,), 4, 3))
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        sinkhorn_attention(q, k, v, 2, backend="triton")


def test_triton_backend_without_triton_says_how_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(attention_module, "triton_available", lambda: False)
    q, k, v = (t.detach().float() for t in _qkv((2,), 4, 3))
    with pytest.raises(RuntimeError, match="needs the triton package"):
        sinkhorn_attention(q, k, v, 2, backend="triton")


def test_package_imports_and_runs_without_triton() -> None:
    result = run_python(
        """
        import sys
        sys.modules["triton"] = None  # "import triton" now raises ImportError
        import torch
        import pointsink
        from pointsink.sinkhorn_attention import triton_available
        assert not triton_available()
        q = torch.randn(2, 5, 4)
        out = pointsink.sinkhorn_attention(q, q, q, 3)  # auto backend -> chunked on CPU
        assert out.shape == (2, 5, 4)
        assert "pointsink.triton_sinkhorn" not in sys.modules
        print("ok")
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")


# Run on DEVICE ("cpu" under the interpreter, or "cuda"); inputs are drawn on the CPU.
_TRITON_KERNELS_SCRIPT = """
import json
import torch
DEVICE = "__DEVICE__"
from pointsink.sinkhorn import sinkhorn
from pointsink.sinkhorn_attention import dense_sinkhorn_attention, sinkhorn_attention
from pointsink.triton_sinkhorn import triton_sinkhorn_attention

def errors(fn, q, k, v, n_iter):
    gen = torch.Generator().manual_seed(1)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves)
    grad_out = torch.randn(out.shape, generator=gen).to(out.device)
    grads = torch.autograd.grad(out, leaves, grad_out.to(out.dtype))
    ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = dense_sinkhorn_attention(*ref_leaves, n_iter)
    ref_grads = torch.autograd.grad(ref, ref_leaves, grad_out.to(out.dtype).double())
    got = [out, *grads]
    want = [ref, *ref_grads]
    assert all(g.dtype == q.dtype for g in got)
    return [(g.double() - w).abs().max().item() / (1 + w.abs().max().item())
            for g, w in zip(got, want)]

gen = torch.Generator().manual_seed(0)
results = []
# Float32, block 16: rectangular shapes and head dims that need padding (d=8, e=5).
for n_iter in (1, 2, 3, 4, 5, 9):
    for n, m in ((20, 9), (9, 20)):
        q, k, v = (torch.randn(2, s, c, generator=gen).to(DEVICE)
                   for s, c in ((n, 8), (m, 8), (m, 5)))
        err = errors(lambda a, b, c: triton_sinkhorn_attention(a, b, c, n_iter, 8 ** -0.5,
                                                               block_m=16, block_n=16),
                     q, k, v, n_iter)
        results.append(["float32", n_iter, n, m, max(err)])
# The same with dS assembled per matrix, the path beyond use_factored_ds's bound.
import pointsink.triton_sinkhorn as triton_module
use_factored_ds = triton_module.use_factored_ds
triton_module.use_factored_ds = lambda n, m, n_iter: False
for n_iter in (4, 5):
    q, k, v = (torch.randn(2, s, c, generator=gen).to(DEVICE) for s, c in ((20, 8), (9, 8), (9, 5)))
    err = errors(lambda a, b, c: triton_sinkhorn_attention(a, b, c, n_iter, 8 ** -0.5,
                                                           block_m=16, block_n=16),
                 q, k, v, n_iter)
    results.append(["float32", n_iter, 20, 9, max(err)])
triton_module.use_factored_ds = use_factored_ds
# Values wider than the keys are many (e = 64 > m = 16): the backward's launch settings must
# be those of this call's value width, not of its key count.
q, k, v = (torch.randn(2, s, c, generator=gen).to(DEVICE) for s, c in ((20, 8), (16, 8), (16, 64)))
err = errors(lambda a, b, c: triton_sinkhorn_attention(a, b, c, 3, 8 ** -0.5), q, k, v, 3)
results.append(["float32", 3, 20, 16, max(err)])
# ISAB-like shapes through the public entry point, default blocks, leading dims.
for n, m in ((200, 16), (16, 200)):
    q, k, v = (torch.randn(1, 2, s, 16, generator=gen).to(DEVICE) for s in (n, m, m))
    err = errors(lambda a, b, c: sinkhorn_attention(a, b, c, 3, backend="triton"), q, k, v, 3)
    results.append(["float32", 3, n, m, max(err)])
# Half precisions.
for dtype in (torch.float16, torch.bfloat16):
    for n_iter in (1, 4, 5):
        q, k, v = (torch.randn(2, s, 16, generator=gen).to(DEVICE, dtype) for s in (20, 9, 9))
        err = errors(lambda a, b, c: sinkhorn_attention(a, b, c, n_iter, backend="triton"),
                     q, k, v, n_iter)
        results.append([str(dtype).removeprefix("torch."), n_iter, 20, 9, max(err)])
if DEVICE == "cuda":
    # Sizes the interpreter is too slow for: default blocks, head dim 64, several blocks
    # of queries and keys, the model's automatic choice included.
    for dtype in (torch.float32, torch.bfloat16):
        for n, m in ((1024, 1024), (1000, 16), (16, 1000), (2048, 777)):
            q, k, v = (torch.randn(2, 4, s, 64, generator=gen).to(DEVICE, dtype)
                       for s in (n, m, m))
            err = errors(lambda a, b, c: sinkhorn_attention(a, b, c, 5), q, k, v, 5)
            results.append([str(dtype).removeprefix("torch."), 5, n, m, max(err)])
# Second order (create_graph=True, e.g. a gradient penalty) through the Triton function.
q, k, v = (torch.randn(2, s, 8, generator=gen).to(DEVICE) for s in (20, 9, 9))
second = []
for backend, dtype in (("triton", torch.float32), ("dense", torch.float64)):
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    out = sinkhorn_attention(*leaves, 3, backend=backend)
    grads = torch.autograd.grad(out.square().sum(), leaves, create_graph=True)
    second.append(torch.autograd.grad(sum(g.square().sum() for g in grads), leaves))
err = max((a.double() - b).abs().max().item() / (1 + b.abs().max().item())
          for a, b in zip(*second))
results.append(["float32", 3, 20, 9, err])
# Padded sets: masks against the masked dense reference, with whole tiles of padding
# (40 queries, 20 keys, blocks of 16) and sets with one real element.
def masked_errors(fn, q, k, v, n_iter, query_mask, key_mask):
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves)
    grad_out = torch.randn(out.shape, generator=gen).to(out.device, out.dtype)
    grads = torch.autograd.grad(out, leaves, grad_out)
    ref_leaves = [t.detach().cpu().double().requires_grad_() for t in (q, k, v)]
    ref = dense_sinkhorn_attention(*ref_leaves, n_iter, query_mask=query_mask.cpu(),
                                   key_mask=key_mask.cpu())
    ref_grads = torch.autograd.grad(ref, ref_leaves, grad_out.cpu().double())
    return max((g.cpu().double() - w).abs().max().item() / (1 + w.abs().max().item())
               for g, w in zip([out, *grads], [ref, *ref_grads]))

for dtype, n_iter in [(torch.float32, t) for t in (1, 2, 3, 5)] + [(torch.bfloat16, 5)]:
    for n, m in ((40, 20), (20, 40)):
        q, k, v = (torch.randn(3, s, 8, generator=gen).to(DEVICE, dtype) for s in (n, m, m))
        real_n, real_m = torch.tensor([n, 17, 1]), torch.tensor([2, m, 19])
        query_mask = (torch.randperm(n, generator=gen)[None] < real_n[:, None]).to(DEVICE)
        key_mask = (torch.randperm(m, generator=gen)[None] < real_m[:, None]).to(DEVICE)
        err = masked_errors(
            lambda a, b, c: triton_sinkhorn_attention(a, b, c, n_iter, 8 ** -0.5, 16, 16,
                                                      query_mask=query_mask,
                                                      key_mask=key_mask),
            q, k, v, n_iter, query_mask, key_mask)
        results.append([str(dtype).removeprefix("torch."), n_iter, n, m, err])
# Through the public entry point: a set without real queries (output 0) and NaN padding.
q, k, v = (torch.randn(3, s, 8, generator=gen).to(DEVICE) for s in (20, 9, 9))
query_mask = (torch.arange(20)[None] < torch.tensor([20, 0, 7])[:, None]).to(DEVICE)
key_mask = (torch.arange(9)[None] < torch.tensor([4, 9, 9])[:, None]).to(DEVICE)
q, k, v = (t.masked_fill(~mask[..., None], float("nan"))
           for t, mask in ((q, query_mask), (k, key_mask), (v, key_mask)))
err = masked_errors(
    lambda a, b, c: sinkhorn_attention(a, b, c, 5, backend="triton", query_mask=query_mask,
                                       key_mask=key_mask),
    q, k, v, 5, query_mask, key_mask)
results.append(["float32", 5, 20, 9, err])
# torch.func: per-sample gradients (vmap of grad) with per-sample masks and a key shared by
# all samples, through the Function's vmap rule, against one float64 dense pass per sample.
from torch.func import grad, vmap
q, k, v = (torch.randn(3, 2, s, 8, generator=gen).to(DEVICE) for s in (20, 9, 9))
# (3, 1, n): one mask per sample for both heads.
query_mask = (torch.arange(20)[None] < torch.tensor([20, 5, 11])[:, None])[:, None].to(DEVICE)
key_mask = (torch.arange(9)[None] < torch.tensor([9, 3, 6])[:, None])[:, None].to(DEVICE)

def per_sample_loss(q, k, query_mask, key_mask, backend="triton", v=v[0]):
    return sinkhorn_attention(q, k, v, 4, backend=backend, query_mask=query_mask,
                              key_mask=key_mask).square().sum()

got = vmap(grad(per_sample_loss, argnums=(0, 1)), in_dims=(0, None, 0, 0))(
    q, k[0], query_mask, key_mask)
err = 0.0
for i in range(3):
    leaves = [q[i].cpu().double().requires_grad_(), k[0].cpu().double().requires_grad_()]
    want = torch.autograd.grad(
        per_sample_loss(*leaves, query_mask[i].cpu(), key_mask[i].cpu(), "dense",
                        v[0].cpu().double()), leaves)
    err = max(err, *((g[i].cpu().double() - w).abs().max().item() / (1 + w.abs().max().item())
                     for g, w in zip(got, want)))
results.append(["float32", 4, 20, 9, err])
print(json.dumps(results))
"""


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_kernels_under_interpreter(triton_interpreter: None) -> None:
    _check_triton_kernels(
        "cpu", {"TRITON_INTERPRET": "1"}, expected_rows=12 + 1 + 2 + 2 + 6 + 1 + 10 + 1 + 1
    )


@pytest.mark.skipif(
    not (HAS_TRITON and torch.cuda.is_available()), reason="needs triton and a CUDA GPU"
)
def test_triton_kernels_on_cuda() -> None:
    _check_triton_kernels(
        "cuda", {"TRITON_INTERPRET": "0"}, expected_rows=12 + 1 + 2 + 2 + 6 + 1 + 10 + 1 + 1 + 8
    )


def _check_triton_kernels(device: str, env: dict[str, str], expected_rows: int) -> None:
    script = _TRITON_KERNELS_SCRIPT.replace("__DEVICE__", device)
    result = run_python(script, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    # Largest error relative to (1 + max |reference|), against float64 dense autograd.
    tolerance = {"float32": 1e-5, "float16": 5e-3, "bfloat16": 3e-2}
    if device == "cuda":
        # float32-accurate tl.dot (tf32x3 products, or IEEE before sm_80; TF32 is off by
        # default), but sums over up to 2048 keys.
        tolerance["float32"] = 1e-4
    rows = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(rows) == expected_rows
    for dtype, n_iter, n, m, err in rows:
        assert err < tolerance[dtype], (dtype, n_iter, n, m, err)


_TRITON_COMPILE_SCRIPT = """
import json
import sys
import triton
import pointsink.triton_sinkhorn as ts
sys.path.insert(0, "__BENCHMARKS__")
try:  # Triton-internal API (as of triton 3.9)
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    ASTSource(ts._col_lse_kernel, {}, {})
except (ImportError, AttributeError, TypeError) as error:  # only an API change skips
    print("SKIP", "triton", triton.__version__, type(error).__name__, error)
    sys.exit(0)
from triton_sass import compile_sm90, signature_for

VARIANTS = [
    ("row", ts._row_lse_kernel, {"HAS_OUT": True}),
    ("row", ts._row_lse_kernel, {"HAS_OUT": False}),
    ("col", ts._col_lse_kernel, {}),
    ("row", ts._out_kernel, {}),
    ("bwd_col", ts._bwd_col_kernel, {"HAS_DV": True, "HAS_GROW": True}),
    ("bwd_col", ts._bwd_col_kernel, {"HAS_DV": True, "HAS_GROW": False}),
    ("bwd_col", ts._bwd_col_kernel, {"HAS_DV": False, "HAS_GROW": True}),
    ("bwd_row", ts._bwd_row_kernel, {"HAS_INIT": True}),
    ("bwd_row", ts._bwd_row_kernel, {"HAS_INIT": False}),
    ("dq", ts._bwd_dq_kernel, {"ODD": True, "FACTORED": True, "N_TERMS": 5}),
    ("dq", ts._bwd_dq_kernel, {"ODD": True, "FACTORED": False, "N_TERMS": 5}),
    ("dq", ts._bwd_dq_kernel, {"ODD": False, "FACTORED": True, "N_TERMS": 4}),
    ("dkdv", ts._bwd_dkdv_kernel, {"HAS_DV": True, "ODD": True, "FACTORED": False, "N_TERMS": 1}),
    ("dkdv", ts._bwd_dkdv_kernel, {"HAS_DV": False, "ODD": True, "FACTORED": True, "N_TERMS": 5}),
    ("dkdv", ts._bwd_dkdv_kernel, {"HAS_DV": False, "ODD": False, "FACTORED": False, "N_TERMS": 4}),
]
import torch
head_dim = 64
assert set(ts._blocks_for(head_dim)) == set(ts.KERNELS)
# bfloat16: the default configurations, and those clamped to ISAB shapes (16 keys or 16
# queries); float32: the defaults, with the tf32x3 products used on sm_80 and up.
cases = [(torch.bfloat16, "bf16", "ieee", n, m) for n, m in ((4096, 4096), (1000, 16), (16, 1000))]
cases.append((torch.float32, "fp32", "tf32x3", 4096, 4096))
compiled = []
for dtype, dtype_name, precision, n, m in cases:
    blocks = ts._config(torch.empty(1, n, head_dim, dtype=dtype), m, head_dim, None,
                        None)["blocks"]
    for name, kernel, flags in VARIANTS:
        block_m, block_n, num_warps, num_stages = blocks[name]
        consts = {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_D": head_dim,
                  "BLOCK_E": head_dim, "D": head_dim, "E": head_dim, "PRECISION": precision,
                  "UPCAST": False, **flags}
        consts = {k: v for k, v in consts.items() if k in kernel.arg_names}
        binary, _, _ = compile_sm90(kernel, signature_for(kernel, consts, dtype_name), consts,
                                    {"num_warps": num_warps, "num_stages": num_stages,
                                     "enable_fp_fusion": True}, disassemble=False)
        compiled.append([kernel.fn.__name__, dtype_name, len(binary.asm["cubin"]),
                         binary.metadata.shared])
print(json.dumps(compiled))
"""


@pytest.mark.skipif(not bundled_ptxas(), reason="triton with its bundled ptxas is not installed")
def test_triton_kernels_compile_for_sm90() -> None:
    # The interpreter accepts code that the compiler rejects: compile every kernel variant
    # (head dim 64; bfloat16 with the default blocks and those of ISAB shapes, float32 with
    # tf32x3 products) to a cubin for H100; no GPU needed.
    script = _TRITON_COMPILE_SCRIPT.replace("__BENCHMARKS__", str(BENCHMARKS))
    result = run_python(script, env={"TRITON_INTERPRET": "0"})
    assert result.returncode == 0, result.stderr[-3000:]
    if result.stdout.startswith("SKIP"):
        pytest.skip(f"this triton's compiler API differs: {result.stdout.strip()}")
    compiled = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(compiled) == 4 * 15
    assert all(size > 0 for _, _, size, _ in compiled)
    # The larger bfloat16 tiles are chosen where two of their programs fit in an SM.
    from pointsink.triton_sinkhorn import _LARGE_TILES_SHARED_MEMORY

    bf16 = [shared for _, dtype, _, shared in compiled if dtype == "bf16"]
    assert max(bf16) <= _LARGE_TILES_SHARED_MEMORY // 2


class _KernelShortOfSharedMemory:
    """Stands in for a ``@triton.jit`` kernel whose launches need ``need[stages]`` bytes."""

    def __init__(self, need: dict[int, int], limit: int) -> None:
        self.need, self.limit, self.tried = need, limit, []
        self.fn = self  # the error message names kernel.fn.__name__
        self.__name__ = "_fake_kernel"

    def __getitem__(self, grid: tuple[int]):
        def launch(*args: object, num_stages: int, **kwargs: object) -> None:
            from triton.runtime.errors import OutOfResources

            self.tried.append(num_stages)
            if self.need[num_stages] > self.limit:
                raise OutOfResources(self.need[num_stages], self.limit, "shared memory")

        return launch


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_launch_takes_fewer_stages_where_shared_memory_is_short(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from pointsink import triton_sinkhorn

    monkeypatch.setattr(triton_sinkhorn, "_STAGES_THAT_FIT", {})
    x = torch.zeros(1)
    # float32 row LSE with output at head dim 64, 128 x 64 tiles (sm_90): 3, 2, 1 stages
    # need 128.5, 96.2 and 80 KiB; a consumer GPU allows 99 KiB.
    kernel = _KernelShortOfSharedMemory({3: 131584, 2: 98560, 1: 81920}, 99 * 1024)
    triton_sinkhorn._run(kernel, (4,), x, BLOCK_M=128, num_stages=3)
    assert kernel.tried == [3, 2]
    triton_sinkhorn._run(kernel, (4,), x, BLOCK_M=128, num_stages=3)
    assert kernel.tried == [3, 2, 2]  # remembered: no second failure
    triton_sinkhorn._run(kernel, (4,), x, BLOCK_M=64, num_stages=3)  # other arguments
    assert kernel.tried == [3, 2, 2, 3, 2]
    roomy = _KernelShortOfSharedMemory({3: 131584}, 227 * 1024)  # H100: as configured
    triton_sinkhorn._run(roomy, (4,), x, BLOCK_M=128, num_stages=3)
    assert roomy.tried == [3]

    tiny = _KernelShortOfSharedMemory({2: 98560, 1: 81920}, 64 * 1024)
    with pytest.raises(RuntimeError, match=r"does not fit this GPU.*block_m/block_n"):
        triton_sinkhorn._run(tiny, (4,), x, BLOCK_M=128, num_stages=2)
    assert tiny.tried == [2, 1]


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_float32_dot_precision(monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from pointsink import triton_sinkhorn

    def tensor(dtype: torch.dtype = torch.float32, is_cuda: bool = True) -> SimpleNamespace:
        return SimpleNamespace(dtype=dtype, is_cuda=is_cuda, device=SimpleNamespace(index=0))

    capability = {"value": (9, 0)}
    monkeypatch.setattr(triton_sinkhorn, "_compute_capability", lambda index: capability["value"])
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    precision = triton_sinkhorn._float32_precision
    # float32 accuracy from TF32 tensor cores where they exist (sm_80 and up)...
    assert precision(tensor()) == "tf32x3"
    capability["value"] = (8, 0)
    assert precision(tensor()) == "tf32x3"
    # ...a float32 FMA loop where they do not, and on CPUs (the interpreter)...
    capability["value"] = (7, 5)
    assert precision(tensor()) == "ieee"
    assert precision(tensor(is_cuda=False)) == "ieee"
    # ...and one TF32 product where torch allows it, as torch's matmul does.
    capability["value"] = (9, 0)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    assert precision(tensor()) == "tf32"
    # Half-precision inputs ignore it; ROCm keeps IEEE.
    assert precision(tensor(torch.bfloat16)) == "ieee"
    monkeypatch.setattr(torch.version, "hip", "6.0")
    assert precision(tensor()) == "ieee"


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_launch_runs_on_the_tensors_cuda_device(monkeypatch: pytest.MonkeyPatch) -> None:
    # Triton launches on the current CUDA device; tensors on cuda:1 need it to be cuda:1.
    from types import SimpleNamespace

    from pointsink import triton_sinkhorn

    events: list[object] = []

    class RecordingDevice:
        def __init__(self, device: torch.device) -> None:
            self.device = device

        def __enter__(self) -> None:
            events.append(("enter", self.device))

        def __exit__(self, *exc: object) -> None:
            events.append("exit")

    class Kernel:
        fn = SimpleNamespace(__name__="_stand_in_kernel")

        def __getitem__(self, grid: tuple[int]):
            return lambda *args, **kwargs: events.append("launch")

    monkeypatch.setattr(torch.cuda, "device", RecordingDevice)
    on_cuda_1 = SimpleNamespace(device=torch.device("cuda", 1))
    triton_sinkhorn._run(Kernel(), (1,), on_cuda_1, num_stages=2)
    assert events == [("enter", torch.device("cuda", 1)), "launch", "exit"]
    events.clear()
    triton_sinkhorn._run(Kernel(), (1,), torch.zeros(1), num_stages=2)  # CPU: interpreter
    assert events == ["launch"]
