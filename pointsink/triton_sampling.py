"""Farthest-point sampling in one Triton kernel launch (CUDA).

:func:`pointsink.embedding.farthest_point_sampling` adds one point per step, and each step
is 7 PyTorch operations over the whole batch (profiled on a CPU): choosing the recipe's 256
centres launches some 1,800 small kernels on a GPU, every training and evaluation step.
Here one program per point set holds the set's coordinates and distances in registers and
runs all the steps, so the choice costs one launch. The picks are those of the PyTorch
loop: the point farthest from the set's mean first, then each time the point farthest from
those chosen so far, the lowest index on exact ties, and the first point again once every
distinct point is taken. Distances are squared and summed in float32 without fused
multiply-adds, as the loop does; the set's mean (and, depending on
how the compiler lays out a point's coordinates, a distance's sum) may be added up in
another order, so a pick can differ from the loop's only between points whose distances
agree to the last bit or two. Under the interpreter the picks matched the loop's exactly
in every case of ``tests/test_triton_sampling.py``, padded sets (a ``mask``) included.

Imported only when Triton is installed; the embedding falls back to the PyTorch loop on
other devices, for more than :data:`MAX_POINTS` points, or without Triton.
"""

# ruff: noqa: N803  (Triton's convention: pointers and compile-time constants in capitals)

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from pointsink.sinkhorn_attention import on_launch_device
from pointsink.validation import check_set_mask

__all__ = ["MAX_DIM", "MAX_POINTS", "triton_farthest_point_sampling"]

#: Largest set one program holds in registers: 16 warps at 4,096 points, no spills (sm_90;
#: 8,192 points spill, tests/test_triton_sampling.py).
MAX_POINTS = 4096
#: Most coordinates per point.
MAX_DIM = 16


@triton.jit
def _farthest_point_sampling_kernel(
    POINTS, REAL, CHOSEN, n, num_samples,
    D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HAS_MASK: tl.constexpr,
):  # fmt: skip
    """Greedy farthest-point order of one set ``(n, D)`` into ``CHOSEN[b, :num_samples]``.

    With ``HAS_MASK``, ``REAL[b, :n]`` (uint8, nonzero for a real point) leaves padded
    points out: they are never loaded, never picked while a real one is left, and the mean
    is over the real points.
    """
    b = tl.program_id(0).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    valid = offs_n < n
    if HAS_MASK:
        valid = valid & (tl.load(REAL + b * n + offs_n, mask=valid, other=0) != 0)
    points = tl.load(
        POINTS + b * n * D + offs_n[:, None] * D + offs_d[None, :],
        mask=valid[:, None] & (offs_d[None, :] < D),
        other=0.0,
    ).to(tl.float32)
    center_mask = offs_d < D
    if HAS_MASK:
        count = tl.sum(valid.to(tl.float32), axis=0)
        mean = tl.sum(points, axis=0) / tl.maximum(count, 1.0)
        # A set without real points picks index 0, a padded point: its values are not read.
        center_mask = center_mask & (tl.zeros([BLOCK_D], dtype=tl.float32) + count > 0.0)
    else:
        mean = tl.sum(points, axis=0) / n
    offsets = points - mean[None, :]
    from_mean = tl.where(valid, tl.sum(offsets * offsets, axis=1), -float("inf"))
    current = tl.argmax(from_mean, axis=0, tie_break_left=True)
    start = current
    # Padding stays at -inf, so it is never the farthest.
    nearest = tl.where(valid, float("inf"), -float("inf"))
    for step in range(num_samples):
        tl.store(CHOSEN + b * num_samples + step, current.to(tl.int64))
        center = tl.load(POINTS + b * n * D + current * D + offs_d, mask=center_mask, other=0.0)
        offsets = points - center.to(tl.float32)[None, :]
        nearest = tl.minimum(nearest, tl.sum(offsets * offsets, axis=1))
        # One reduction for the value and its index (tl.argmax is this max, value dropped).
        farthest, current = tl.max(
            nearest, axis=0, return_indices=True, return_indices_tie_break_left=True
        )
        # Every distinct point taken: repeat the start, as the loop does.
        current = tl.where(farthest > 0.0, current, start)


def triton_farthest_point_sampling(
    points: Tensor, num_samples: int, mask: Tensor | None = None
) -> Tensor:
    """Indices of ``num_samples`` points of each set, in farthest-point order.

    Args:
        points: Coordinates ``(B, N, D)`` on a CUDA device (or any device under
            ``TRITON_INTERPRET=1``), ``N <=`` :data:`MAX_POINTS`, ``D <=`` :data:`MAX_DIM`.
        num_samples: ``M``, between 1 and ``N`` (any ``M >= 1`` with a mask).
        mask: ``(B, N)`` bool, True for real points, or None; as in
            :func:`pointsink.embedding.farthest_point_sampling`.

    Returns:
        ``(B, M)`` int64 indices into the ``N`` points, in the order they were chosen.
    """
    batch, num_points, dim = points.shape
    most_samples = num_points if mask is None else num_samples
    if not 1 <= num_samples <= most_samples or num_points > MAX_POINTS or dim > MAX_DIM:
        samples = "1 <= num_samples <= N" if mask is None else "num_samples >= 1, N"
        raise ValueError(
            f"triton_farthest_point_sampling takes {samples} <= {MAX_POINTS} and "
            f"D <= {MAX_DIM}; got num_samples={num_samples}, points of shape {tuple(points.shape)}."
        )
    if mask is not None:  # read as raw bytes below: a float mask would pick padding
        check_set_mask("mask", mask, points, "num_points")
    points = points.contiguous()
    chosen = torch.empty(batch, num_samples, dtype=torch.long, device=points.device)
    # A pointer even without a mask (the kernel does not read it then).
    real = points if mask is None else mask.contiguous().view(torch.uint8)
    block_n = triton.next_power_of_2(num_points)
    with on_launch_device(points.device):
        _farthest_point_sampling_kernel[(batch,)](
            points, real, chosen, num_points, num_samples,
            D=dim, BLOCK_N=block_n, BLOCK_D=triton.next_power_of_2(dim),
            HAS_MASK=mask is not None,
            num_warps=min(16, max(1, block_n // 256)),
            enable_fp_fusion=False,  # d_x^2 + d_y^2 + d_z^2 rounded as in the PyTorch loop
        )  # fmt: skip
    return chosen
