import math

import pytest
import torch
from _sinkhorn_reference import alternating_scaling

from pointsink import log_sinkhorn, sinkhorn, sinkhorn_potentials


@pytest.fixture
def logits() -> torch.Tensor:
    return torch.randn(3, 2, 7, 5, generator=torch.Generator().manual_seed(0)) * 3


def test_one_iteration_is_softmax(logits: torch.Tensor) -> None:
    torch.testing.assert_close(sinkhorn(logits, 1), logits.softmax(-1), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("n_iter", [1, 3, 5, 9])
def test_odd_iterations_rows_sum_to_one(logits: torch.Tensor, n_iter: int) -> None:
    rows = sinkhorn(logits, n_iter).sum(-1)
    torch.testing.assert_close(rows, torch.ones_like(rows))


@pytest.mark.parametrize("n_iter", [2, 4, 8])
def test_even_iterations_columns_sum_to_n_over_m(logits: torch.Tensor, n_iter: int) -> None:
    n, m = logits.shape[-2:]
    cols = sinkhorn(logits, n_iter).sum(-2)
    torch.testing.assert_close(cols, torch.full_like(cols, n / m))


def test_converges_to_doubly_stochastic(logits: torch.Tensor) -> None:
    n, m = logits.shape[-2:]
    weights = sinkhorn(logits, 201)
    torch.testing.assert_close(weights.sum(-1), torch.ones(3, 2, n), atol=1e-5, rtol=0)
    torch.testing.assert_close(weights.sum(-2), torch.full((3, 2, m), n / m), atol=1e-5, rtol=0)
    # Few iterations are far from doubly stochastic for such peaked logits.
    assert (sinkhorn(logits, 1).sum(-2) - n / m).abs().max() > 0.1


def test_matches_naive_matrix_scaling() -> None:
    """The log-domain iterations equal plain alternating row/column rescaling of exp(S)."""
    logits = torch.randn(6, 4, dtype=torch.float64)
    kernel = alternating_scaling(logits, 6)
    torch.testing.assert_close(sinkhorn(logits, 6), kernel)
    torch.testing.assert_close(log_sinkhorn(logits, 6).exp(), kernel)
    # The potentials are the logs of the row and column scalings a, b of
    # diag(a) exp(S) diag(b), updated in turn from b = 1 as in the brief's recursion.
    a, b = torch.ones(6, 1, dtype=torch.float64), torch.ones(1, 4, dtype=torch.float64)
    for _ in range(3):
        a = 1 / (logits.exp() * b).sum(-1, keepdim=True)
        b = (6 / 4) / (a * logits.exp()).sum(-2, keepdim=True)
    u, v = sinkhorn_potentials(logits, 6)
    torch.testing.assert_close(u, a.log())
    torch.testing.assert_close(v, b.log())


def test_gradcheck_float64() -> None:
    logits = torch.randn(2, 5, 4, dtype=torch.float64, requires_grad=True)
    for n_iter in (1, 2, 5):
        assert torch.autograd.gradcheck(lambda x, k=n_iter: sinkhorn(x, k), (logits,))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_extreme_logits_in_half_precision(dtype: torch.dtype) -> None:
    logits = (torch.randn(2, 8, 6) * 1e4).clamp(-1e4, 1e4).to(dtype)
    logits[0, 0] = 1e4
    logits[0, 1] = -1e4
    weights = sinkhorn(logits, 7)
    assert weights.dtype == dtype
    assert torch.isfinite(weights).all()
    torch.testing.assert_close(weights.float().sum(-1), torch.ones(2, 8), atol=1e-2, rtol=0)


def test_half_precision_logits_are_normalized_in_float32() -> None:
    """The documented "computation in at least float32": bf16 in, float32 inside, bf16 out."""
    logits = (torch.randn(2, 16, 8) * 30).bfloat16()
    weights = sinkhorn(logits, 5)
    assert weights.dtype == torch.bfloat16
    expected = sinkhorn(logits.float(), 5).bfloat16()
    assert torch.equal(weights, expected)
    # Normalizing in bf16 itself gives other weights, so the check above can fail.
    in_bf16 = _bf16_sinkhorn(logits, 5)
    assert not torch.equal(in_bf16, expected)


def _bf16_sinkhorn(logits: torch.Tensor, n_iter: int) -> torch.Tensor:
    """The log-domain iteration of the module docstring, every step in ``logits``' dtype."""
    n, m = logits.shape[-2:]
    u = logits.new_zeros(*logits.shape[:-2], n, 1)
    v = logits.new_zeros(*logits.shape[:-2], 1, m)
    for iteration in range(n_iter):
        if iteration % 2 == 0:
            u = -torch.logsumexp(logits + v, dim=-1, keepdim=True)
        else:
            v = math.log(n / m) - torch.logsumexp(logits + u, dim=-2, keepdim=True)
    return torch.exp(logits + u + v)


def test_rectangular_column_mass() -> None:
    """ISAB shapes: 16 inducing points over 1024 points and the transpose."""
    for n, m in ((16, 1024), (1024, 16)):
        weights = sinkhorn(torch.randn(n, m), 50)
        torch.testing.assert_close(weights.sum(-2), torch.full((m,), n / m), rtol=1e-3, atol=0)
        assert math.isclose(weights.sum().item(), n, rel_tol=1e-4)


@pytest.mark.parametrize("n_iter", [0, -1, 1.5, True])
def test_rejects_bad_n_iter(n_iter: object) -> None:
    with pytest.raises(ValueError, match="n_iter"):
        sinkhorn(torch.randn(3, 3), n_iter)  # type: ignore[arg-type]


def test_rejects_vector() -> None:
    with pytest.raises(ValueError, match=r"\(\.\.\., n, m\)"):
        sinkhorn(torch.randn(3), 1)


def test_meta_tensors_give_meta_results() -> None:
    """torch.autocast raises for the meta device: no autocast guard may be entered there."""
    logits = torch.empty(2, 3, 4, device="meta")
    weights = sinkhorn(logits, 3)
    assert weights.device.type == "meta"
    assert weights.shape == (2, 3, 4)
    assert weights.dtype == torch.float32
    u, v = sinkhorn_potentials(logits, 2)
    assert (u.shape, v.shape) == ((2, 3, 1), (2, 1, 4))
    assert u.device.type == v.device.type == "meta"


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
def test_rejects_non_floating_logits(dtype: torch.dtype) -> None:
    with pytest.raises(TypeError, match="floating-point logits"):
        sinkhorn(torch.ones(3, 3).to(dtype), 3)
    with pytest.raises(TypeError, match="floating-point logits"):
        log_sinkhorn(torch.ones(3, 3).to(dtype), 1)


@pytest.mark.parametrize("shape", [(0, 3), (3, 0), (2, 0, 0)])
def test_rejects_no_queries_or_no_keys(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=r"at least one query and one key"):
        sinkhorn(torch.randn(shape), 2)


def test_empty_batch_is_fine() -> None:
    """Only n and m must be positive: an empty leading batch gives empty weights."""
    assert sinkhorn(torch.randn(0, 3, 4), 3).shape == (0, 3, 4)
