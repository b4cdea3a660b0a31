"""Set Transformer blocks (Lee et al., 2019) with softmax or Sinkhorn attention.

All blocks take sets as ``(B, N, C)`` tensors. SAB and ISAB are permutation-equivariant
in the set dimension; PMA is permutation-invariant.

Sets of different sizes are padded to one ``N`` and passed with ``mask`` (``(B, N)`` bool,
True for real elements; e.g. from ``torch_geometric.utils.to_dense_batch``). Padding then
changes nothing: the outputs at real elements equal those of the unpadded set, for softmax
and Sinkhorn attention alike. Outputs at padded elements are not meaningful; padding
values are never read (not even NaN ones), and padded elements get zero gradient.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from pointsink.attention import (
    DEFAULT_N_ITER,
    AttentionKind,
    LogitScale,
    MultiheadAttention,
    SinkhornMarginals,
)
from pointsink.sinkhorn import zero_padded
from pointsink.validation import check_bool, check_int, check_set_mask

__all__ = [
    "InducedSetAttentionBlock",
    "MultiheadAttentionBlock",
    "PoolingByMultiheadAttention",
    "SetAttentionBlock",
]


class MultiheadAttentionBlock(nn.Module):
    r"""Multihead attention block (MAB) of the Set Transformer.

    .. math::
        H &= \mathrm{LN}(X W^Q + \mathrm{Multihead}(X, Y, Y)) \\
        \mathrm{MAB}(X, Y) &= \mathrm{LN}(H + \mathrm{ReLU}(H W^F))

    The residual uses the projected queries :math:`X W^Q`, as in the reference code, so
    that the input and output widths may differ; :math:`W^F` (``lin_out``) is the
    feed-forward layer, and the heads have no output projection of their own.

    Args:
        query_channels: Feature size of ``X``.
        key_channels: Feature size of ``Y``.
        channels: Output width.
        num_heads: Attention heads.
        attention: ``"sinkhorn"`` or ``"softmax"``.
        n_iter: Sinkhorn iterations (default 5, the model's; 1 is softmax).
        layer_norm: Apply the two layer norms.
        logit_scale, sinkhorn_marginals: see
            :class:`~pointsink.attention.MultiheadAttention`.

    Raises:
        ValueError: Invalid arguments (see :class:`~pointsink.attention.MultiheadAttention`).
    """

    def __init__(
        self,
        query_channels: int,
        key_channels: int,
        channels: int,
        num_heads: int,
        attention: AttentionKind = "sinkhorn",
        n_iter: int = DEFAULT_N_ITER,
        layer_norm: bool = False,
        *,
        logit_scale: LogitScale = "head",
        sinkhorn_marginals: SinkhornMarginals = "attention",
    ) -> None:
        super().__init__()
        self.attn = MultiheadAttention(
            query_channels,
            key_channels,
            channels,
            num_heads,
            attention,
            n_iter,
            logit_scale=logit_scale,
            sinkhorn_marginals=sinkhorn_marginals,
        )
        self.lin_out = nn.Linear(channels, channels)
        layer_norm = check_bool("layer_norm", layer_norm)
        self.norm_attn = nn.LayerNorm(channels) if layer_norm else nn.Identity()
        self.norm_out = nn.LayerNorm(channels) if layer_norm else nn.Identity()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-initializes all parameters."""
        self.attn.reset_parameters()
        self.lin_out.reset_parameters()
        for norm in (self.norm_attn, self.norm_out):
            if isinstance(norm, nn.LayerNorm):
                norm.reset_parameters()

    def forward(
        self,
        x: Tensor,
        y: Tensor,
        *,
        query_mask: Tensor | None = None,
        key_mask: Tensor | None = None,
    ) -> Tensor:
        """Computes ``MAB(x, y)``.

        Args:
            x: Queries ``(B, n, query_channels)``.
            y: Keys and values ``(B, m, key_channels)``.
            query_mask: ``(B, n)`` bool, True for real queries, or None (all real).
            key_mask: ``(B, m)`` bool, True for real keys, or None (all real).

        Returns:
            ``(B, n, channels)``.
        """
        query, heads = self.attn(x, y, query_mask=query_mask, key_mask=key_mask)
        h = self.norm_attn(query + heads)
        return self.norm_out(h + F.relu(self.lin_out(h)))


class SetAttentionBlock(nn.Module):
    r"""Set attention block: :math:`\mathrm{SAB}(X) = \mathrm{MAB}(X, X)`.

    Full self-attention, ``O(N^2)`` in the set size. Input ``(B, N, in_channels)``,
    output ``(B, N, channels)``. The integer arguments must be ``>= 1`` and ``num_heads``
    must divide ``channels`` (ValueError otherwise).
    """

    def __init__(
        self,
        in_channels: int,
        channels: int,
        num_heads: int,
        attention: AttentionKind = "sinkhorn",
        n_iter: int = DEFAULT_N_ITER,
        layer_norm: bool = False,
        *,
        logit_scale: LogitScale = "head",
        sinkhorn_marginals: SinkhornMarginals = "attention",
    ) -> None:
        super().__init__()
        # Checked here too, so that the message names this block's argument.
        in_channels = check_int("in_channels", in_channels)
        self.mab = MultiheadAttentionBlock(
            in_channels,
            in_channels,
            channels,
            num_heads,
            attention,
            n_iter,
            layer_norm,
            logit_scale=logit_scale,
            sinkhorn_marginals=sinkhorn_marginals,
        )

    def reset_parameters(self) -> None:
        """Re-initializes all parameters."""
        self.mab.reset_parameters()

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """``(B, N, in_channels)`` -> ``(B, N, channels)``; ``mask``: ``(B, N)`` bool or None."""
        if mask is not None:
            check_set_mask("mask", mask, x)
        return self.mab(x, x, query_mask=mask, key_mask=mask)


class InducedSetAttentionBlock(nn.Module):
    r"""Induced set attention block with ``M`` learned inducing points :math:`I`.

    .. math::
        H = \mathrm{MAB}(I, X), \qquad \mathrm{ISAB}(X) = \mathrm{MAB}(X, H)

    ``O(N M)`` instead of ``O(N^2)``. Input ``(B, N, in_channels)``, output
    ``(B, N, channels)``. The integer arguments must be ``>= 1`` and ``num_heads`` must
    divide ``channels`` (ValueError otherwise).
    """

    def __init__(
        self,
        in_channels: int,
        channels: int,
        num_heads: int,
        num_inducing_points: int = 16,
        attention: AttentionKind = "sinkhorn",
        n_iter: int = DEFAULT_N_ITER,
        layer_norm: bool = False,
        *,
        logit_scale: LogitScale = "head",
        sinkhorn_marginals: SinkhornMarginals = "attention",
    ) -> None:
        super().__init__()
        in_channels = check_int("in_channels", in_channels)
        channels = check_int("channels", channels)
        num_inducing_points = check_int("num_inducing_points", num_inducing_points)
        self.inducing_points = nn.Parameter(torch.empty(1, num_inducing_points, channels))
        block = functools.partial(
            MultiheadAttentionBlock,
            num_heads=num_heads,
            attention=attention,
            n_iter=n_iter,
            layer_norm=layer_norm,
            logit_scale=logit_scale,
            sinkhorn_marginals=sinkhorn_marginals,
        )
        self.mab_induce = block(channels, in_channels, channels)
        self.mab_out = block(in_channels, channels, channels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-initializes all parameters."""
        nn.init.xavier_uniform_(self.inducing_points)
        self.mab_induce.reset_parameters()
        self.mab_out.reset_parameters()

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """``(B, N, in_channels)`` -> ``(B, N, channels)``; ``mask``: ``(B, N)`` bool or None.

        The inducing points attend to the real elements only; every element attends to
        all inducing points, and under Sinkhorn only real elements count in the column sums.
        """
        if mask is not None:
            check_set_mask("mask", mask, x)
        h = self.mab_induce(self.inducing_points.expand(x.shape[0], -1, -1), x, key_mask=mask)
        return self.mab_out(x, h, query_mask=mask)


class PoolingByMultiheadAttention(nn.Module):
    r"""Pooling by multihead attention to ``K`` learned seed vectors :math:`S`.

    .. math::
        \mathrm{PMA}(X) = \mathrm{MAB}(S, \mathrm{ReLU}(X W))

    as in the Set Transformer paper, or :math:`\mathrm{MAB}(S, X)` without ``projection``
    (the Sinkformers reference code). Input ``(B, N, channels)``, output
    ``(B, K, channels)``; invariant to permutations of the ``N`` set elements. The integer
    arguments must be ``>= 1`` and ``num_heads`` must divide ``channels`` (ValueError
    otherwise). ``logit_scale`` and ``sinkhorn_marginals``: see
    :class:`~pointsink.attention.MultiheadAttention`.

    With one seed, Sinkhorn attention with ``n_iter >= 2`` pools by the plain mean: the
    column normalization gives every element the same weight ``1 / N``. Pass
    ``attention="softmax"`` (what ``configs/modelnet10.yaml`` does with
    ``pooling_attention``) for a weighted pooling, or use several seeds.
    """

    def __init__(
        self,
        channels: int,
        num_heads: int,
        num_seeds: int = 1,
        attention: AttentionKind = "sinkhorn",
        n_iter: int = DEFAULT_N_ITER,
        layer_norm: bool = False,
        *,
        logit_scale: LogitScale = "head",
        sinkhorn_marginals: SinkhornMarginals = "attention",
        projection: bool = True,
    ) -> None:
        super().__init__()
        channels = check_int("channels", channels)
        num_seeds = check_int("num_seeds", num_seeds)
        self.lin = nn.Linear(channels, channels) if projection else None
        self.seeds = nn.Parameter(torch.empty(1, num_seeds, channels))
        self.mab = MultiheadAttentionBlock(
            channels,
            channels,
            channels,
            num_heads,
            attention,
            n_iter,
            layer_norm,
            logit_scale=logit_scale,
            sinkhorn_marginals=sinkhorn_marginals,
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-initializes all parameters."""
        if self.lin is not None:
            self.lin.reset_parameters()
        nn.init.xavier_uniform_(self.seeds)
        self.mab.reset_parameters()

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """``(B, N, channels)`` -> ``(B, num_seeds, channels)``.

        Pools the real elements of ``mask`` (``(B, N)`` bool) only, or all for None.
        """
        if mask is not None:
            # Zeroed before the projection: NaN padding would make its weight gradient NaN.
            check_set_mask("mask", mask, x)
            x = zero_padded(x, mask)
        keys = x if self.lin is None else F.relu(self.lin(x))
        return self.mab(self.seeds.expand(x.shape[0], -1, -1), keys, key_mask=mask)
