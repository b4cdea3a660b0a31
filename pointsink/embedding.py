"""Per-point input embeddings that see each point's neighbourhood (plain PyTorch).

The Set Transformer's first block projects each point's raw coordinates on their own;
its attention then has to recover local shape from ``(x, y, z)`` alone. An EdgeConv
embedding (Wang et al., "Dynamic Graph CNN for Learning on Point Clouds", 2019) gives each
point a feature of its ``k`` nearest neighbours first; like the blocks after it, the
embedding is permutation-equivariant.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["EdgeConvEmbedding", "gather_neighbors", "knn_indices"]


def knn_indices(points: Tensor, num_neighbors: int) -> Tensor:
    """Indices of each point's ``k`` nearest neighbours, itself included.

    Dense pairwise distances, ``O(B N^2)`` memory: about 4 MiB per shape at ``N = 1024``.
    Ties (duplicate points) are broken by ``topk``'s order, which is deterministic for a
    given input but not guaranteed to be permutation-equivariant.

    Args:
        points: Coordinates ``(B, N, D)``.
        num_neighbors: ``k``, at most ``N``.

    Returns:
        ``(B, N, k)`` indices into the ``N`` points, nearest first.
    """
    if not 1 <= num_neighbors <= points.shape[1]:
        raise ValueError(
            f"num_neighbors must be between 1 and the number of points ({points.shape[1]}); "
            f"got {num_neighbors}."
        )
    distances = torch.cdist(points, points)
    return distances.topk(num_neighbors, dim=-1, largest=False, sorted=True).indices


def gather_neighbors(features: Tensor, indices: Tensor) -> Tensor:
    """Neighbour features ``(B, N, k, C)`` from features ``(B, N, C)`` and indices ``(B, N, k)``."""
    batch, num_points, channels = features.shape
    offsets = torch.arange(batch, device=features.device).view(batch, 1, 1) * num_points
    flat = features.reshape(batch * num_points, channels)
    return flat[indices + offsets]


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
    edges, which keeps the embedding cheap enough for CPU training.

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
        if in_channels < 3:
            raise ValueError(f"in_channels must include xyz (>= 3); got {in_channels}.")
        if num_neighbors < 1:
            raise ValueError(f"num_neighbors must be at least 1; got {num_neighbors}.")
        if channels < 1:
            raise ValueError(f"channels must be at least 1; got {channels}.")
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

    def forward(self, x: Tensor) -> Tensor:
        """Embeds every point from its neighbourhood.

        Args:
            x: ``(B, N, in_channels)``, coordinates first.

        Returns:
            ``(B, N, in_channels + channels)``: ``x`` followed by the local features.
        """
        coordinates = x[..., :3]
        with torch.no_grad():
            indices = knn_indices(coordinates.float(), self.num_neighbors)
        # Each point's RMS distance to its neighbours, differentiable (the k-NN graph is not).
        offsets = gather_neighbors(coordinates, indices) - coordinates.unsqueeze(2)
        radius = (offsets.square().sum(dim=-1).mean(dim=-1, keepdim=True) + 1e-12).sqrt()
        projected = self.lin_neighbor(x)
        with torch.no_grad():
            # Which neighbour attains the max, per point and channel; gathering only those
            # keeps the backward pass at (B, N, channels) instead of (B, N, k, channels).
            best = gather_neighbors(projected, indices).max(dim=2).indices
            winner = indices.gather(2, best)
        local_max = projected.gather(1, winner) - projected
        edge = local_max / radius.to(local_max.dtype) + self.lin_center(x)
        local = self.lin_out(torch.relu(self.norm(edge)))
        return torch.cat([x, local.to(x.dtype)], dim=-1)

    def extra_repr(self) -> str:
        """Sizes shown in the module's ``repr``."""
        return (
            f"in_channels={self.in_channels}, channels={self.channels}, "
            f"num_neighbors={self.num_neighbors}"
        )
