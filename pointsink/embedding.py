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
    r"""EdgeConv over the ``k`` nearest neighbours in coordinate space, then a linear layer.

    .. math::
        h_i = W_2\, \mathrm{ReLU}\Big(\max_{j \in \mathrm{kNN}(i)}
              \Theta\, (x_j - x_i) + \Phi\, x_i + b_1\Big) + b_2

    The bracket is DGCNN's EdgeConv with one linear edge function (Wang et al., 2019):
    since ReLU is monotone and :math:`\Phi x_i` does not depend on ``j``, the max moves
    inside, and :math:`\max_j \Theta (x_j - x_i) = \max_j (\Theta x_j) - \Theta x_i`.
    So only the projected points ``(B, N, channels)`` are gathered (never an edge MLP over
    ``N k`` edges), which makes the embedding cheap enough for CPU training.

    The neighbourhood is found from the first three input channels (the coordinates),
    without gradient; every input channel enters the features. The graph is fixed by the
    input, not recomputed on features.

    Args:
        in_channels: Per-point input features (3 for xyz).
        channels: Output width.
        num_neighbors: ``k``, neighbours per point (the point itself included).
    """

    def __init__(self, in_channels: int, channels: int, num_neighbors: int) -> None:
        super().__init__()
        if in_channels < 3:
            raise ValueError(f"in_channels must include xyz (>= 3); got {in_channels}.")
        if num_neighbors < 1:
            raise ValueError(f"num_neighbors must be at least 1; got {num_neighbors}.")
        self.in_channels = in_channels
        self.channels = channels
        self.num_neighbors = num_neighbors
        self.lin_neighbor = nn.Linear(in_channels, channels, bias=False)
        self.lin_center = nn.Linear(in_channels, channels)
        self.lin_out = nn.Linear(channels, channels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-initializes the three linear layers."""
        self.lin_neighbor.reset_parameters()
        self.lin_center.reset_parameters()
        self.lin_out.reset_parameters()

    def forward(self, x: Tensor) -> Tensor:
        """Embeds every point from its neighbourhood.

        Args:
            x: ``(B, N, in_channels)``, coordinates first.

        Returns:
            ``(B, N, channels)``.
        """
        with torch.no_grad():
            indices = knn_indices(x[..., :3], self.num_neighbors)
        projected = self.lin_neighbor(x)
        local_max = gather_neighbors(projected, indices).amax(dim=2) - projected
        return self.lin_out(torch.relu(local_max + self.lin_center(x)))

    def extra_repr(self) -> str:
        """Sizes shown in the module's ``repr``."""
        return (
            f"in_channels={self.in_channels}, channels={self.channels}, "
            f"num_neighbors={self.num_neighbors}"
        )
