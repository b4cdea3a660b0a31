"""Per-point input embeddings that see each point's neighbourhood (plain PyTorch).

The Set Transformer's first block projects each point's raw coordinates on their own;
its attention then has to recover local shape from ``(x, y, z)`` alone. An EdgeConv
embedding (Wang et al., "Dynamic Graph CNN for Learning on Point Clouds", 2019) gives each
point a feature of its ``k`` nearest neighbours first; like the blocks after it, the
embedding is permutation-equivariant.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx

from pointsink.batching import fold_vmapped
from pointsink.sinkhorn_attention import require_triton, triton_available
from pointsink.validation import check_bool, check_int, check_set_mask

__all__ = [
    "EdgeConvEmbedding",
    "SetAbstraction",
    "farthest_point_sampling",
    "gather_neighbors",
    "knn_indices",
    "leading_mask",
    "masked_mean",
    "neighbor_mask",
    "real_counts",
]


@torch.no_grad()  # indices only
def knn_indices(
    points: Tensor,
    num_neighbors: int,
    queries: Tensor | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """Indices of the ``k`` points nearest each query (each point itself by default).

    Dense pairwise distances, ``O(B N^2)`` memory: about 4 MiB per shape at ``N = 1024``.
    Ties (duplicate points) are broken by ``topk``'s order, which is deterministic for a
    given input but not guaranteed to be permutation-equivariant.

    Args:
        points: Coordinates ``(B, N, D)``.
        num_neighbors: ``k``, at most ``N``.
        queries: ``(B, M, D)``, the points whose neighbours are wanted; ``None`` for
            ``points`` themselves, each then first among its own ``k`` nearest (its own
            distance is taken below every other, so that a coincident copy, at the same
            distance 0, cannot take its place in ``topk``).
        mask: ``(B, N)`` bool, True for real points, or None (all real). Padded points
            come after every real one, so a set with ``n'`` real points has real
            neighbours in its first ``min(k, n')`` columns (:func:`neighbor_mask`), the
            neighbours it has alone up to exact distance ties (``topk`` may order tied
            points differently in a longer row).

    Returns:
        ``(B, M, k)`` indices into the ``N`` points, nearest first (``M = N`` by default).
    """
    if not 1 <= num_neighbors <= points.shape[1]:
        raise ValueError(
            f"num_neighbors must be between 1 and the number of points ({points.shape[1]}); "
            f"got {num_neighbors}."
        )
    themselves = queries is None
    queries = points if queries is None else queries
    if points.dtype in (torch.float16, torch.bfloat16):
        # In float32: cdist has no CPU kernel for half types (bf16-true / 16-true training),
        # and their short mantissas would tie or misorder close neighbours.
        points, queries = points.float(), queries.float()
    # Differences, not cdist's |x|^2 + |y|^2 - 2 x.y shortcut (taken above 25 points): that
    # cancels on clouds away from the origin, and would give a padded set (longer rows)
    # other neighbours than the same set alone. Detached: indices need no derivative, and
    # cdist has none in forward mode (torch.func.jvp, jacfwd).
    distances = torch.cdist(
        queries.detach(), points.detach(), compute_mode="donot_use_mm_for_euclid_dist"
    )
    if themselves:
        distances.diagonal(dim1=-2, dim2=-1).fill_(-1.0)
    if mask is not None:
        distances = distances.masked_fill(~mask.unsqueeze(1), float("inf"))
    return distances.topk(num_neighbors, dim=-1, largest=False, sorted=True).indices


def gather_neighbors(features: Tensor, indices: Tensor) -> Tensor:
    """Rows of ``features`` ``(B, N, C)`` picked by ``indices`` ``(B, ...)``: ``(B, ..., C)``.

    With indices ``(B, N, k)`` these are each point's neighbour features ``(B, N, k, C)``.
    """
    batch, num_points, channels = features.shape
    shape = (batch,) + (1,) * (indices.dim() - 1)
    offsets = torch.arange(batch, device=features.device).view(shape) * num_points
    flat = features.reshape(batch * num_points, channels)
    return flat[indices + offsets]


def real_counts(mask: Tensor) -> Tensor:
    """Real points per set, ``(B,)`` long, from a ``(B, N)`` padding mask (no host sync)."""
    return mask.sum(dim=1)


def masked_mean(
    values: Tensor, mask: Tensor | None, dim: int | tuple[int, ...], keepdim: bool = False
) -> Tensor:
    """Mean of ``values`` over ``dim`` where ``mask`` (broadcast to them) is True.

    None averages everything, as ``values.mean``. A slice without a True element gives 0.
    Values where ``mask`` is False are never read (NaN there stays out).
    """
    if mask is None:
        return values.mean(dim=dim, keepdim=keepdim)
    total = torch.where(mask, values, 0.0).sum(dim=dim, keepdim=keepdim)
    return total / mask.sum(dim=dim, keepdim=keepdim).clamp_min(1).to(total.dtype)


def leading_mask(counts: Tensor, size: int) -> Tensor:
    """``(B, size)`` bool: True in the first ``counts[b]`` positions of each row.

    With masks, the embeddings put each set's real elements first: farthest-point sampling
    picks real points before it repeats any, and nearest-neighbour lists rank padded points
    last. So which tokens or neighbours are real follows from the counts alone.
    """
    return torch.arange(size, device=counts.device) < counts.unsqueeze(-1)


def neighbor_mask(counts: Tensor, num_neighbors: int) -> Tensor:
    """``(B, 1, k)`` bool: which columns of :func:`knn_indices` with a mask are real points."""
    return leading_mask(counts, num_neighbors).unsqueeze(1)


def repeat_nearest(indices: Tensor, real_neighbors: Tensor) -> Tensor:
    """Neighbour lists ``(B, M, k)`` whose padded columns repeat the nearest (first) one.

    A max over a neighbourhood is the same with a member repeated, in value and gradient
    (the repeat is the same point), so after this the max needs no mask over the
    ``(B, M, k, C)`` edge features. Filling those with ``-inf`` had made the recipe's masked
    set abstraction 17-20 % slower than the unmasked one on a CPU (``benchmarks/RESULTS.md``).
    """
    return torch.where(real_neighbors, indices, indices[..., :1])


def farthest_point_sampling(
    points: Tensor,
    num_samples: int,
    backend: Literal["auto", "loop", "triton"] = "auto",
    mask: Tensor | None = None,
) -> Tensor:
    """Indices of ``num_samples`` points spread over each set by farthest-point sampling.

    Starts from the point farthest from the set's mean rather than from index 0, so the
    chosen subset does not depend on the order of the points (up to exact distance ties).
    Each step adds the point farthest from those chosen so far: ``O(B N)`` work per sample.

    Args:
        points: Coordinates ``(B, N, D)``.
        num_samples: ``M``, at most ``N``.
        backend: ``"loop"``: a few PyTorch operations per step, on any device;
            ``"triton"``: all steps in one kernel launch (:mod:`pointsink.triton_sampling`;
            CUDA, up to 4,096 points of up to 16 coordinates, computed in float32), the
            same picks for float32 and half-precision points (the loop computes float64
            points in float64, so their picks can differ where float32 would round a
            distance); ``"auto"``: Triton where it applies and is installed, else the loop.
        mask: ``(B, N)`` bool, True for real points, or None (all real). Padded points are
            never picked while a real one is left, and the start is the real point farthest
            from the real points' mean: a set with ``n'`` real points gets the picks it gets
            alone in its first ``min(M, n')`` entries, up to exact distance ties (as on a
            grid). The rest repeat real points (index 0 in a set without any), and ``M``
            may exceed ``N``.

    Once every distinct point is taken (a cloud of repeated points), the start point is
    repeated, so the picks do not depend on the order of the points.

    Returns:
        ``(B, M)`` indices into the ``N`` points, in the order they were chosen.
    """
    _, num_points, dim = points.shape
    if mask is None and not 1 <= num_samples <= num_points:
        raise ValueError(
            f"num_samples must be between 1 and the number of points ({num_points}); "
            f"got {num_samples}."
        )
    if mask is not None and num_samples < 1:
        raise ValueError(f"num_samples must be at least 1 with a mask; got {num_samples}.")
    if backend not in ("auto", "loop", "triton"):
        raise ValueError(f"unknown backend {backend!r}; use auto, loop or triton.")
    if mask is not None:
        check_set_mask("mask", mask, points, "num_points")
    if backend == "auto":
        backend = "loop"
        if points.is_cuda and triton_available():
            from pointsink import triton_sampling

            if num_points <= triton_sampling.MAX_POINTS and dim <= triton_sampling.MAX_DIM:
                backend = "triton"
    if backend == "triton":
        require_triton(points, "loop")
    return _FarthestPointSampling.apply(points, num_samples, backend, mask)


class _FarthestPointSampling(torch.autograd.Function):
    """The backends of :func:`farthest_point_sampling` behind a ``vmap`` rule.

    Indices have no gradient; this Function exists for ``torch.func.vmap`` (per-sample
    gradients of a model with a set abstraction): the loop's preallocated buffers and the
    Triton kernel cannot run on vmapped tensors, so the rule folds the vmapped dimension
    into the batch of sets and samples them all in one call.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        points: Tensor, num_samples: int, backend: str, mask: Tensor | None
    ) -> Tensor:
        if backend == "triton":
            from pointsink.triton_sampling import triton_farthest_point_sampling

            return triton_farthest_point_sampling(points, num_samples, mask)
        return _farthest_point_sampling_loop(points, num_samples, mask)

    @staticmethod
    def setup_context(ctx: FunctionCtx, inputs: tuple, output: Tensor) -> None:
        pass  # integer indices: nothing for a backward pass

    @staticmethod
    def jvp(ctx: FunctionCtx, *tangents: Tensor | None) -> None:
        return None  # integer indices have no tangent

    @staticmethod
    def vmap(
        info: Any,
        in_dims: tuple,
        points: Tensor,
        num_samples: int,
        backend: str,
        mask: Tensor | None,
    ) -> tuple[Tensor, int]:
        size = info.batch_size
        indices = _FarthestPointSampling.apply(
            fold_vmapped(points, in_dims[0], size),
            num_samples,
            backend,
            fold_vmapped(mask, in_dims[3], size),
        )
        return indices.reshape(size, -1, indices.shape[-1]), 0


@torch.no_grad()  # indices only; the out= buffers below refuse autograd
def _farthest_point_sampling_loop(
    points: Tensor, num_samples: int, mask: Tensor | None = None
) -> Tensor:
    """The ``"loop"`` backend of :func:`farthest_point_sampling`: one step per sample."""
    # In at least float32, as the Triton kernel works: half-precision distances would tie
    # and round differently, so the two backends would pick other points.
    points = points.to(torch.promote_types(points.dtype, torch.float32))
    batch, num_points, _ = points.shape
    rows = torch.arange(batch, device=points.device)
    chosen = torch.empty(batch, num_samples, dtype=torch.long, device=points.device)
    nearest = torch.full(
        (batch, num_points), float("inf"), dtype=points.dtype, device=points.device
    )
    if mask is not None:
        # Padding zeroed first: it is never read, not even NaN. At -inf, padded points lose
        # every argmax below to a real point, and stay at -inf through the minimum.
        points = points.masked_fill(~mask.unsqueeze(-1), 0.0)
        nearest.masked_fill_(~mask, float("-inf"))
    real = None if mask is None else mask.unsqueeze(-1)
    center = masked_mean(points, real, dim=1, keepdim=True)
    # nearest is +inf at real points and -inf at padded ones: the start is the real point
    # farthest from the mean.
    current = torch.minimum((points - center).square().sum(dim=-1), nearest).argmax(dim=1)
    start = current
    # Coordinate-major (B, D, N) and preallocated buffers: the loop runs num_samples times
    # per batch, and summing D contiguous rows in place is 3x faster on a CPU than
    # reducing the last dimension of (B, N, D) into fresh tensors (benchmarks/RESULTS.md).
    coordinates = points.transpose(1, 2).contiguous()
    offsets = torch.empty_like(coordinates)
    distance = torch.empty_like(nearest)
    for step in range(num_samples):
        chosen[:, step] = current
        torch.sub(coordinates, points[rows, current].unsqueeze(2), out=offsets)
        torch.sum(offsets.square_(), dim=1, out=distance)
        torch.minimum(nearest, distance, out=nearest)
        farthest, current = nearest.max(dim=1)
        # Every distinct point taken (all at distance 0): repeat the start, not the lowest
        # index, which would depend on the order of the points.
        current = torch.where(farthest > 0, current, start)
    return chosen


class EdgeConvEmbedding(nn.Module):
    r"""The input coordinates, concatenated with EdgeConv features of each neighbourhood.

    .. math::
        h_i = \Big[\, x_i \;\Big\|\; W_2\, \mathrm{ReLU}\Big(\mathrm{LN}\Big(
              \max_{j \in \mathrm{kNN}(i)} \Theta\, \frac{x_j - x_i}{r_i}
              + \Phi\, x_i + b_1\Big)\Big) + b_2 \Big]

    The bracket is DGCNN's EdgeConv with one linear edge function (Wang et al., 2019).
    :math:`\Phi x_i` does not depend on ``j`` and ``r_i > 0``, so
    :math:`\max_j \Theta (x_j - x_i) / r_i = (\max_j \Theta x_j - \Theta x_i) / r_i`: only the
    projected points ``(B, N, channels)`` are gathered, never an edge MLP over ``N k``
    edges, which keeps the embedding cheap enough for CPU training. The projection runs in
    float32 even under autocast: in bf16 the difference of the two products lost precision.

    Three choices are meant to let it learn as fast as the model without it (on ModelNet10
    it still learned slower over the first epochs and did not raise test accuracy;
    ``benchmarks/RESULTS.md``):

    * ``r_i`` is point ``i``'s root-mean-square distance to its neighbours, so the offsets
      are of order one at any point density (raw offsets are ~20 times smaller than the
      coordinates, and the local term would start out negligible); being per point, it
      keeps the embedding local.
    * LayerNorm (``LN``) before the ReLU keeps the features at unit scale.
    * ``W_2`` and ``b_2`` start at zero and the coordinates pass through, so at
      initialization the encoder sees the coordinates (and zeros) and learns to use the
      local features from there.

    The neighbourhood is found from the first three input channels (the coordinates),
    without gradient; every input channel enters the features. The graph is fixed by the
    input, not recomputed on features.

    Args:
        in_channels: Per-point input features (3 for xyz).
        channels: Width of the local features; the output has ``in_channels + channels``.
        num_neighbors: ``k``, neighbours per point (the point itself included).
    """

    def __init__(self, in_channels: int, channels: int, num_neighbors: int) -> None:
        super().__init__()
        in_channels = check_int("in_channels", in_channels)
        if in_channels < 3:
            raise ValueError(f"in_channels must include xyz (>= 3); got {in_channels}.")
        check_int("num_neighbors", num_neighbors)
        check_int("channels", channels)
        self.in_channels = in_channels
        self.channels = channels
        self.num_neighbors = num_neighbors
        self.lin_neighbor = nn.Linear(in_channels, channels, bias=False)
        self.lin_center = nn.Linear(in_channels, channels)
        self.norm = nn.LayerNorm(channels)
        self.lin_out = nn.Linear(channels, channels)
        self.reset_parameters()

    @property
    def out_channels(self) -> int:
        """Width of the output: the input channels plus the local features."""
        return self.in_channels + self.channels

    def reset_parameters(self) -> None:
        """Re-initializes the layers; the output layer starts at zero (see above)."""
        self.lin_neighbor.reset_parameters()
        self.lin_center.reset_parameters()
        self.norm.reset_parameters()
        nn.init.zeros_(self.lin_out.weight)
        nn.init.zeros_(self.lin_out.bias)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Embeds every point from its neighbourhood.

        Args:
            x: ``(B, N, in_channels)``, coordinates first.
            mask: ``(B, N)`` bool, True for real points, or None (all real). Real points
                get the features they get in their set alone, from their
                ``min(num_neighbors, n')`` nearest real points; padded rows are 0.
                Up to exact distance ties (see :func:`knn_indices`). Padding values are
                never read and get zero gradient.

        Returns:
            ``(B, N, in_channels + channels)``: ``x`` followed by the local features.
        """
        num_neighbors = self.num_neighbors
        real_neighbors = None
        if mask is not None:
            check_set_mask("mask", mask, x, "num_points")
            x = x.masked_fill(~mask.unsqueeze(-1), 0.0)
            num_neighbors = min(num_neighbors, x.shape[1])
            real_neighbors = neighbor_mask(real_counts(mask), num_neighbors)
        coordinates = x[..., :3]
        with torch.no_grad():
            indices = knn_indices(coordinates.float(), num_neighbors, mask=mask)
            if real_neighbors is not None:
                indices = repeat_nearest(indices, real_neighbors)
        # Each point's RMS distance to its neighbours, differentiable (the k-NN graph is not).
        # In at least float32, as the projection below: in float16 the 1e-12 rounds to 0, and
        # a point whose neighbours all coincide with it (a small cloud filled by repeating
        # points) got radius 0 and NaN features.
        compute_dtype = torch.promote_types(x.dtype, torch.float32)
        coordinates = coordinates.to(compute_dtype)
        offsets = gather_neighbors(coordinates, indices) - coordinates.unsqueeze(2)
        squared = offsets.square().sum(dim=-1)
        radius = (masked_mean(squared, real_neighbors, dim=-1, keepdim=True) + 1e-12).sqrt()
        # The projection stays in float32 under autocast: max_j Theta x_j - Theta x_i is the
        # difference of two larger products, divided by a small radius, and in bf16 it lost
        # about 1.5 % (relative) of the features. It is N x channels, cheap at any precision.
        with torch.autocast(device_type=x.device.type, enabled=False):
            projected = F.linear(x.to(compute_dtype), self.lin_neighbor.weight.to(compute_dtype))
        with torch.no_grad():
            # Which neighbour attains the max, per point and channel; gathering only those
            # keeps the backward pass at (B, N, channels) instead of (B, N, k, channels).
            best = gather_neighbors(projected, indices).max(dim=2).indices
            winner = indices.gather(2, best)
        local_max = projected.gather(1, winner) - projected
        edge = local_max / radius.to(local_max.dtype) + self.lin_center(x)
        local = self.lin_out(torch.relu(self.norm(edge.to(x.dtype))))
        features = torch.cat([x, local.to(x.dtype)], dim=-1)
        if mask is not None:
            # Padded rows were built from real neighbours: 0, so no gradient flows back.
            features = features.masked_fill(~mask.unsqueeze(-1), 0.0)
        return features

    def output_mask(self, mask: Tensor) -> Tensor:
        """Which rows of :meth:`forward` with ``mask`` are real: ``mask`` itself."""
        return mask

    def extra_repr(self) -> str:
        """Sizes shown in the module's ``repr``."""
        return (
            f"in_channels={self.in_channels}, channels={self.channels}, "
            f"num_neighbors={self.num_neighbors}"
        )


class SetAbstraction(nn.Module):
    r"""Groups a point set into ``M`` local tokens (PointNet++'s set abstraction).

    .. math::
        t_i = \max_{j \in \mathrm{kNN}(c_i)} W_2\, \mathrm{ReLU}\Big(\mathrm{LN}\big(
              \Theta\, (x_j - c_i) + \Phi\, c_i + b_1\big)\Big) + b_2

    (with ``hidden_layers`` above 1, each further hidden layer
    :math:`h \mapsto \mathrm{ReLU}(\mathrm{LN}(W h + b))` comes before :math:`W_2`, as in
    PointNet++'s deeper per-group MLPs).

    The centres :math:`c_1, \dots, c_M` are chosen by farthest-point sampling and each token
    summarizes the ``k`` input points nearest its centre with a shared two-layer MLP and a
    max (Qi et al., "PointNet++", 2017; PCT's neighbour embedding, Guo et al., 2021). The
    encoder then attends over ``M`` tokens that carry local shape instead of ``N`` bare
    coordinates. The offsets are formed before :math:`\Theta`: applying :math:`\Theta` to the
    ``N`` points and ``M`` centres and subtracting after gathering is the same in exact
    arithmetic, but under bf16 autocast it was less precise (the difference of two large
    products) and, on a CPU, slower.

    Centres and neighbourhoods come from the first three input channels (the coordinates),
    without gradient; every input channel enters the features. The tokens are invariant to
    permutations of the input points (up to exact distance ties).

    With ``normalize_offsets``, the coordinate part of every offset :math:`x_j - c_i` is
    divided by :math:`\sigma`, the shape's root-mean-square distance from a group's points to
    its centre (one scalar per shape, over all ``M k`` offsets). Why: in a unit-sphere shape
    the offsets of 32-point groups are about 0.1 long, so across a shape
    :math:`\Theta (x_j - c_i)` varies 4 to 5 times less than :math:`\Phi c_i`, at
    initialization and in a model trained without the option, whose :math:`\Theta` stayed
    near its initial size (weight decay holds it there). Dividing by :math:`\sigma` brings
    the local term to the centre term's scale and makes it independent of the shape's size
    (PointMLP's geometric affine, Ma et al., 2022, normalizes by a batch statistic instead;
    a per-shape one keeps a shape's tokens independent of the batch it is in).

    Args:
        in_channels: Per-point input features (3 for xyz).
        channels: Width of the tokens.
        num_groups: ``M``, tokens per set (at most the number of input points).
        group_size: ``k``, input points per token.
        hidden_channels: Width of the MLP's hidden layers; ``channels // 2`` by default.
        normalize_offsets: Divide the coordinate offsets by the shape's RMS group radius.
        hidden_layers: Hidden layers of the per-edge MLP (each linear, LayerNorm, ReLU).
    """

    def __init__(
        self,
        in_channels: int,
        channels: int,
        num_groups: int,
        group_size: int,
        hidden_channels: int | None = None,
        normalize_offsets: bool = False,
        hidden_layers: int = 1,
    ) -> None:
        super().__init__()
        in_channels = check_int("in_channels", in_channels)
        if in_channels < 3:
            raise ValueError(f"in_channels must include xyz (>= 3); got {in_channels}.")
        check_int("channels", channels)
        check_int("num_groups", num_groups)
        check_int("group_size", group_size)
        check_int("hidden_layers", hidden_layers)
        if hidden_channels is None:
            hidden_channels = max(channels // 2, 1)
        check_int("hidden_channels", hidden_channels)
        self.in_channels = in_channels
        self.channels = channels
        self.num_groups = num_groups
        self.group_size = group_size
        self.normalize_offsets = check_bool("normalize_offsets", normalize_offsets)
        self.hidden_layers = hidden_layers
        self.lin_offset = nn.Linear(in_channels, hidden_channels, bias=False)
        self.lin_center = nn.Linear(in_channels, hidden_channels)
        self.norm = nn.LayerNorm(hidden_channels)
        # The layers after the first hidden one; empty by default, so that checkpoints of
        # one hidden layer keep their parameter names.
        self.hidden = nn.ModuleList(
            nn.Sequential(
                nn.Linear(hidden_channels, hidden_channels),
                nn.LayerNorm(hidden_channels),
                nn.ReLU(),
            )
            for _ in range(hidden_layers - 1)
        )
        self.lin_out = nn.Linear(hidden_channels, channels)
        self.reset_parameters()

    @property
    def out_channels(self) -> int:
        """Width of the tokens."""
        return self.channels

    def reset_parameters(self) -> None:
        """Re-initializes the layers."""
        for layer in (self.lin_offset, self.lin_center, self.norm, self.lin_out):
            layer.reset_parameters()
        for hidden in self.hidden:
            hidden[0].reset_parameters()
            hidden[1].reset_parameters()

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Summarizes the set into local tokens.

        Args:
            x: ``(B, N, in_channels)``, coordinates first.
            mask: ``(B, N)`` bool, True for real points, or None (all real). A set with
                ``n'`` real points gets the tokens it gets alone in its first
                ``min(num_groups, n')`` rows (:meth:`output_mask`), each from its
                ``min(group_size, n')`` nearest real points; its other rows are 0. Up to
                exact distance ties, as the sampling and the neighbours are. Padding
                values are never read and get zero gradient. With a mask, a set may have
                fewer points than ``num_groups`` or ``group_size``.

        Returns:
            Tokens ``(B, num_groups, channels)``.
        """
        if mask is None and x.shape[1] < max(self.num_groups, self.group_size):
            raise ValueError(
                f"SetAbstraction with num_groups={self.num_groups} and "
                f"group_size={self.group_size} needs at least that many points; "
                f"got {x.shape[1]} (pass a mask to take smaller sets)."
            )
        group_size = min(self.group_size, x.shape[1])
        token_mask = real_neighbors = edge_mask = None
        if mask is not None:
            check_set_mask("mask", mask, x, "num_points")
            x = x.masked_fill(~mask.unsqueeze(-1), 0.0)
            counts = real_counts(mask)
            token_mask = leading_mask(counts, self.num_groups)
            real_neighbors = neighbor_mask(counts, group_size)
            edge_mask = token_mask.unsqueeze(-1) & real_neighbors
        with torch.no_grad():
            coordinates = x[..., :3].float()
            centers = farthest_point_sampling(coordinates, self.num_groups, mask=mask)
            center_xyz = gather_neighbors(coordinates, centers)
            groups = knn_indices(coordinates, group_size, queries=center_xyz, mask=mask)
            if real_neighbors is not None:
                groups = repeat_nearest(groups, real_neighbors)
        center_features = gather_neighbors(x, centers)
        # Offsets first, then Theta (see the class docstring): Theta x_j - Theta c_i in bf16
        # lost about 2 % (relative) of the tokens of a trained model.
        offsets = gather_neighbors(x, groups) - center_features.unsqueeze(2)
        if self.normalize_offsets:
            offsets = offsets * self._offset_scale(offsets, edge_mask)
        hidden = self.lin_offset(offsets) + self.lin_center(center_features).unsqueeze(2)
        hidden = torch.relu(self.norm(hidden))
        for layer in self.hidden:
            hidden = layer(hidden)
        edges = self.lin_out(hidden)
        # max with indices, not amax: its backward scatters to one winner per channel instead
        # of building tie masks over all M k edges (1.4x faster for fwd+bwd on a CPU).
        tokens = edges.max(dim=2).values
        if token_mask is not None:
            # Padded tokens repeat real centres (or, in an empty set, padding): 0, so that
            # no gradient flows back through them.
            tokens = tokens.masked_fill(~token_mask.unsqueeze(-1), 0.0)
        return tokens

    def output_mask(self, mask: Tensor) -> Tensor:
        """Which tokens of :meth:`forward` with ``mask`` are real: ``(B, num_groups)`` bool.

        Args:
            mask: ``(B, N)`` bool, True for real points.
        """
        return leading_mask(real_counts(mask), self.num_groups)

    def _offset_scale(self, offsets: Tensor, edge_mask: Tensor | None = None) -> Tensor:
        """Per-shape factors ``(B, 1, 1, in_channels)``: ``1 / sigma`` on xyz, ``1`` elsewhere.

        Args:
            offsets: ``(B, M, k, in_channels)``, each group's points minus its centre.
                ``sigma`` is the RMS length of their xyz part, without gradient.
            edge_mask: ``(B, M, k)`` bool, the real edges, which alone count; None for all.
        """
        with torch.no_grad():
            xyz = offsets[..., :3]
            xyz = xyz.to(torch.promote_types(xyz.dtype, torch.float32))
            sigma = masked_mean(xyz.square().sum(dim=-1), edge_mask, dim=(1, 2)).sqrt()
            scale = xyz.new_ones(offsets.shape[0], 1, 1, self.in_channels)
            # A shape whose points all coincide has sigma 0 and offsets 0: scale 1 leaves them
            # at 0 (a huge 1 / sigma would overflow to inf in half precision, and 0 * inf is NaN).
            scale[..., :3] = torch.where(sigma > 0, 1.0 / sigma, 1.0).view(-1, 1, 1, 1)
        return scale.to(offsets.dtype)

    def extra_repr(self) -> str:
        """Sizes shown in the module's ``repr``."""
        return (
            f"in_channels={self.in_channels}, channels={self.channels}, "
            f"num_groups={self.num_groups}, group_size={self.group_size}, "
            f"normalize_offsets={self.normalize_offsets}, hidden_layers={self.hidden_layers}"
        )
