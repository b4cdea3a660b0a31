"""Multihead attention whose weights are a softmax or a Sinkhorn normalization."""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from pointsink.sinkhorn import (
    check_masks,
    prepare_masks,
    sinkhorn,
    zero_padded,
    zero_padded_logits,
)
from pointsink.sinkhorn_attention import sinkhorn_attention, triton_available
from pointsink.validation import check_int, check_set_batch, check_set_mask

AttentionKind = Literal["sinkhorn", "softmax"]
ATTENTION_KINDS: tuple[str, ...] = get_args(AttentionKind)
# "head": logits QK^T / sqrt(d_h), as in the Set Transformer paper and standard attention;
# "width": QK^T / sqrt(H * d_h), the Sinkformers reference code's scale.
LogitScale = Literal["head", "width"]
LOGIT_SCALES: tuple[str, ...] = get_args(LogitScale)
# "attention": Sinkhorn's rows sum to 1 and columns to n / m (the paper's formulation);
# "uniform": the transport plan between uniform measures, rows 1 / n and columns 1 / m (the
# reference code's weights, ours divided by n).
SinkhornMarginals = Literal["attention", "uniform"]
SINKHORN_MARGINALS: tuple[str, ...] = get_args(SinkhornMarginals)

#: Default Sinkhorn iterations. Odd, so the last normalization is over rows and every
#: output is an exact weighted mean of the values (as with softmax); 5 iterations bring the
#: column sums close to n/m at a third less cost than the reference code's 7 (the paper
#: reports accuracy to be flat between 3 and 9 iterations on ModelNet).
DEFAULT_N_ITER = 5

#: Smallest ``n * m`` for which, without CUDA and Triton, the memory-efficient Sinkhorn kernel
#: is chosen automatically. Below it the weights are small and the dense path was faster on
#: a CPU: 0.46-0.50 s against 0.53 s per training step of configs/modelnet10-cpu.yaml's model
#: (ISAB, 512 x 16 logits; 1 thread, 2026-11-27). At 2048 x 2048 (attention alone, B=2, H=4,
#: d=32, forward + backward) the kernel was 2.4x faster than dense on the same CPU.
EFFICIENT_SINKHORN_MIN_SIZE = 256 * 256

__all__ = [
    "ATTENTION_KINDS",
    "DEFAULT_N_ITER",
    "LOGIT_SCALES",
    "SINKHORN_MARGINALS",
    "AttentionKind",
    "LogitScale",
    "MultiheadAttention",
    "SinkhornMarginals",
    "attention_marginals",
    "attention_weights",
    "dense_attention_weights",
    "scaled_dot_product_attention",
]


def check_attention_kind(attention: str, n_iter: int) -> None:
    """Raises a ValueError naming the accepted values when the arguments are invalid."""
    if attention not in ATTENTION_KINDS:
        raise ValueError(f"attention must be one of {ATTENTION_KINDS}; got {attention!r}.")
    check_int("n_iter", n_iter)


def check_attention_options(logit_scale: str, sinkhorn_marginals: str) -> None:
    """Raises a ValueError naming the accepted values when an option is invalid."""
    if logit_scale not in LOGIT_SCALES:
        raise ValueError(f"logit_scale must be one of {LOGIT_SCALES}; got {logit_scale!r}.")
    if sinkhorn_marginals not in SINKHORN_MARGINALS:
        raise ValueError(
            f"sinkhorn_marginals must be one of {SINKHORN_MARGINALS}; got {sinkhorn_marginals!r}."
        )


def attention_weights(
    logits: Tensor,
    attention: AttentionKind = "sinkhorn",
    n_iter: int = DEFAULT_N_ITER,
    *,
    query_mask: Tensor | None = None,
    key_mask: Tensor | None = None,
) -> Tensor:
    """Normalizes attention logits of shape ``(..., n, m)`` into weights of the same shape.

    ``softmax`` normalizes rows; ``sinkhorn`` runs ``n_iter`` alternating row and column
    normalizations (see :func:`pointsink.sinkhorn.sinkhorn`), so that ``n_iter=1`` equals
    softmax. With padding masks (``(..., n)`` and ``(..., m)`` bool, True for real
    elements), padded keys get weight 0 and padded queries a row of zeros, for both kinds;
    padded logits are never read, and a set without a real query or key gets weights 0.

    Raises:
        ValueError: ``attention`` is not one of :data:`ATTENTION_KINDS`, ``n_iter`` is
            not an integer ``>= 1``, or a mask does not fit the logits.
    """
    check_attention_kind(attention, n_iter)
    if attention == "sinkhorn":
        return sinkhorn(logits, n_iter, query_mask=query_mask, key_mask=key_mask)
    check_masks(query_mask, key_mask, tuple(logits.shape[:-2]), *logits.shape[-2:], logits.device)
    # Padded logits are set to 0 before the softmax too: a NaN there would make the softmax's
    # backward NaN (0 * nan).
    logits = zero_padded_logits(logits, query_mask, key_mask)
    query_mask, key_mask, keep = prepare_masks(query_mask, key_mask)
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask.unsqueeze(-2), -math.inf)
    # keep (..., 1): a set without a real query or key gets weights 0.
    return zero_padded(zero_padded(torch.softmax(logits, dim=-1), query_mask), keep)


def dense_attention_weights(
    query: Tensor,
    key: Tensor,
    attention: AttentionKind = "sinkhorn",
    n_iter: int = DEFAULT_N_ITER,
    *,
    query_mask: Tensor | None = None,
    key_mask: Tensor | None = None,
) -> Tensor:
    """Materialized weights ``normalize(QK^T / sqrt(d))`` of shape ``(B, H, n, m)``.

    ``query`` is ``(B, H, n, d)`` and ``key`` is ``(B, H, m, d)``; the masks as in
    :func:`attention_weights`.
    """
    # Zeroed padding: dQ = dS K would be NaN for NaN padded keys, although dS is 0 there.
    query, key = zero_padded(query, query_mask), zero_padded(key, key_mask)
    # Scaled before the product: in float16 the raw q @ k^T can overflow where logits fit.
    logits = (query * (1.0 / math.sqrt(query.shape[-1]))) @ key.transpose(-2, -1)
    return attention_weights(logits, attention, n_iter, query_mask=query_mask, key_mask=key_mask)


def attention_marginals(
    query: Tensor,
    key: Tensor,
    attention: AttentionKind = "sinkhorn",
    n_iter: int = DEFAULT_N_ITER,
    *,
    query_mask: Tensor | None = None,
    key_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Row and column sums of the weights ``normalize(QK^T / sqrt(d))``.

    Computed one batch element at a time, so the peak memory is one element's
    ``H x n x m`` weights rather than the whole batch's (SAB over thousands of points).

    Args:
        query: ``(B, H, n, d)``.
        key: ``(B, H, m, d)``.
        attention: ``"softmax"`` or ``"sinkhorn"``.
        n_iter: Sinkhorn iterations (ignored for softmax).
        query_mask: ``(B or 1, 1, n)`` bool, True for real queries, or None.
        key_mask: ``(B or 1, 1, m)`` bool, True for real keys, or None.

    Returns:
        ``(row_sums, column_sums)`` of shapes ``(B, H, n)`` and ``(B, H, m)``; a doubly
        stochastic matrix has rows summing to 1 and columns to ``n / m`` (padded sets: real
        columns to ``n' / m'``, padded rows and columns to 0).
    """
    batch, heads, n, _ = query.shape
    m = key.shape[-2]
    # Empty to start with, so that an empty batch gives empty sums rather than cat([]).
    rows = [query.new_empty(0, heads, n, dtype=torch.float32)]
    columns = [query.new_empty(0, heads, m, dtype=torch.float32)]

    def element(mask: Tensor | None, index: int) -> Tensor | None:
        return mask if mask is None or mask.shape[0] == 1 else mask[index : index + 1]

    for index in range(batch):
        weights = dense_attention_weights(
            query[index : index + 1],
            key[index : index + 1],
            attention,
            n_iter,
            query_mask=element(query_mask, index),
            key_mask=element(key_mask, index),
        ).float()
        rows.append(weights.sum(dim=-1))
        columns.append(weights.sum(dim=-2))
    return torch.cat(rows), torch.cat(columns)


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention: AttentionKind = "sinkhorn",
    n_iter: int = DEFAULT_N_ITER,
    efficient: bool | None = None,
    *,
    query_mask: Tensor | None = None,
    key_mask: Tensor | None = None,
) -> Tensor:
    r"""Computes :math:`\mathrm{normalize}(QK^\top/\sqrt{d})\,V`.

    Args:
        query: ``(B, H, n, d)``.
        key: ``(B, H, m, d)``.
        value: ``(B, H, m, d_v)``.
        attention: ``"softmax"`` or ``"sinkhorn"``.
        n_iter: Sinkhorn iterations (ignored for softmax).
        efficient: Use the memory-efficient kernels (PyTorch's fused softmax attention;
            :func:`~pointsink.sinkhorn_attention.sinkhorn_attention`, which never stores an
            ``n x m`` matrix per iteration and runs fused Triton kernels on CUDA). ``False``
            materializes the weights: the readable reference. ``None`` (the model's
            default) chooses: always for softmax; for Sinkhorn on CUDA with Triton, or when
            ``n * m >= EFFICIENT_SINKHORN_MIN_SIZE``.
        query_mask: ``(B or 1, 1, n)`` bool, True for real queries, or None: padded
            queries get an output of 0 (and Sinkhorn excludes them from the column sums).
        key_mask: ``(B or 1, 1, m)`` bool, True for real keys, or None: padded keys get
            weight 0.

    Returns:
        ``(B, H, n, d_v)``.

    Raises:
        ValueError: ``attention`` is not one of :data:`ATTENTION_KINDS`, ``n_iter`` is
            not an integer ``>= 1``, or a mask does not fit.
    """
    # Without this, any string but "softmax" (e.g. "Softmax") would silently run Sinkhorn.
    check_attention_kind(attention, n_iter)
    if efficient is None:
        efficient = (
            attention == "softmax"
            or (query.is_cuda and triton_available())
            or query.shape[-2] * key.shape[-2] >= EFFICIENT_SINKHORN_MIN_SIZE
        )
    if efficient:
        if attention == "softmax":
            check_masks(
                query_mask,
                key_mask,
                tuple(query.shape[:-2]),
                query.shape[-2],
                key.shape[-2],
                query.device,
            )
            query = zero_padded(query, query_mask)
            key, value = zero_padded(key, key_mask), zero_padded(value, key_mask)
            query_mask, key_mask, keep = prepare_masks(query_mask, key_mask)
            attn_mask = None if key_mask is None else key_mask.unsqueeze(-2)
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask)
            return zero_padded(zero_padded(out, query_mask), keep)
        return sinkhorn_attention(
            query, key, value, n_iter, query_mask=query_mask, key_mask=key_mask
        )
    weights = dense_attention_weights(
        query, key, attention, n_iter, query_mask=query_mask, key_mask=key_mask
    )
    # Padded values are never read: 0 * nan would be NaN.
    return weights @ zero_padded(value, key_mask)


class MultiheadAttention(nn.Module):
    r"""Multihead attention with softmax or Sinkhorn weights.

    .. math::
        \mathrm{head}_h = \mathrm{normalize}\!\left(
            \frac{(X W^Q_h)(Y W^K_h)^\top}{\sqrt{d_h}}\right) Y W^V_h,
        \qquad \mathrm{out} = [\mathrm{head}_1, \dots, \mathrm{head}_H]

    There is no output projection :math:`W^O` over the concatenated heads: as in the Set
    Transformer's reference code, the enclosing block adds them to the projected queries
    and its feed-forward layer follows (see :class:`~pointsink.blocks.MultiheadAttentionBlock`).

    Args:
        query_channels: Feature size of the queries ``X`` (``>= 1``).
        key_channels: Feature size of the keys/values ``Y`` (``>= 1``).
        channels: Total width ``H * d_h`` of the projections (``>= 1``).
        num_heads: Number of heads ``H`` (``>= 1``); must divide ``channels``.
        attention: ``"sinkhorn"`` or ``"softmax"``.
        n_iter: Sinkhorn iterations (1 reproduces softmax exactly; with
            ``sinkhorn_marginals="uniform"``, softmax divided by ``n``).
        logit_scale: ``"head"`` divides the logits by :math:`\sqrt{d_h}`; ``"width"`` by
            :math:`\sqrt{H d_h}`, as the Sinkformers reference code does. Applied to the
            queries, so every attention implementation sees ordinary logits.
        sinkhorn_marginals: ``"attention"``: Sinkhorn's rows sum to 1 and its columns to
            ``n / m``; ``"uniform"``: the weights are the transport plan between uniform
            measures (rows ``1 / n``, columns ``1 / m``), i.e. divided by the number of
            queries ``n``, as in the reference code. Softmax attention ignores it.

    Raises:
        ValueError: An argument is not a positive integer (as :func:`check_int` defines
            it), ``num_heads`` does not divide ``channels``, or ``attention``, ``n_iter``,
            ``logit_scale`` or ``sinkhorn_marginals`` is invalid.
    """

    def __init__(
        self,
        query_channels: int,
        key_channels: int,
        channels: int,
        num_heads: int,
        attention: AttentionKind = "sinkhorn",
        n_iter: int = DEFAULT_N_ITER,
        *,
        logit_scale: LogitScale = "head",
        sinkhorn_marginals: SinkhornMarginals = "attention",
    ) -> None:
        super().__init__()
        query_channels = check_int("query_channels", query_channels)
        key_channels = check_int("key_channels", key_channels)
        channels = check_int("channels", channels)
        num_heads = check_int("num_heads", num_heads)
        if channels % num_heads != 0:
            raise ValueError(f"channels ({channels}) must be divisible by num_heads ({num_heads}).")
        check_attention_kind(attention, n_iter)
        check_attention_options(logit_scale, sinkhorn_marginals)
        self.channels = channels
        self.num_heads = num_heads
        self.head_channels = channels // num_heads
        self.attention = attention
        self.n_iter = n_iter
        self.logit_scale = logit_scale
        self.sinkhorn_marginals = sinkhorn_marginals
        self.lin_query = nn.Linear(query_channels, channels)
        self.lin_key = nn.Linear(key_channels, channels)
        self.lin_value = nn.Linear(key_channels, channels)
        # Set by monitoring callbacks; when True, forward also keeps the row and column
        # sums of its weights, (B, H, n) and (B, H, m), in `last_marginals`, and the padding
        # masks, (B, 1, n) and (B, 1, m) or None, in `last_masks`.
        self.record_marginals = False
        self.last_marginals: tuple[Tensor, Tensor] | None = None
        self.last_masks: tuple[Tensor | None, Tensor | None] = (None, None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-initializes the projections."""
        self.lin_query.reset_parameters()
        self.lin_key.reset_parameters()
        self.lin_value.reset_parameters()

    def _split_heads(self, x: Tensor) -> Tensor:
        # (B, L, H * d) -> (B, H, L, d); d is explicit, as -1 cannot be inferred for B = 0.
        batch, length, _ = x.shape
        return x.view(batch, length, self.num_heads, self.head_channels).transpose(1, 2)

    def forward(
        self,
        x: Tensor,
        y: Tensor,
        *,
        query_mask: Tensor | None = None,
        key_mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Attends from ``x`` to ``y``.

        Args:
            x: Queries ``(B, n, query_channels)``.
            y: Keys and values ``(B, m, key_channels)``.
            query_mask: ``(B, n)`` bool, True for the real queries of padded sets, or
                None (all real). Padded queries get heads of 0; Sinkhorn leaves them out of
                its column sums (real columns sum to ``n' / m'``).
            key_mask: ``(B, m)`` bool, True for the real keys, or None: padded keys get
                weight 0.

        Returns:
            ``(projected_queries, heads)``, both ``(B, n, channels)``: the projected
            queries feed the block's residual connection.

        Raises:
            ValueError: ``x``, ``y`` or a mask has the wrong shape or device.
            TypeError: An input's dtype differs from the parameters' (outside autocast), or
                a mask is not boolean.
        """
        check_set_batch("attention queries", x, self.lin_query.in_features, self.lin_query.weight)
        check_set_batch("attention keys", y, self.lin_key.in_features, self.lin_key.weight)
        # (B, L) -> (B, 1, L): one mask for every head.
        query_mask, key_mask = (
            None if mask is None else check_set_mask(name, mask, z).unsqueeze(1)
            for name, mask, z in (("query_mask", query_mask, x), ("key_mask", key_mask, y))
        )
        # Padding values never reach a projection: their weight gradients would be NaN for
        # NaN padding (0 * nan), even though no result depends on them.
        x = zero_padded(x, None if query_mask is None else query_mask[:, 0])
        y = zero_padded(y, None if key_mask is None else key_mask[:, 0])
        query = self.lin_query(x)
        q, k, v = (
            self._split_heads(query),
            self._split_heads(self.lin_key(y)),
            self._split_heads(self.lin_value(y)),
        )
        if self.logit_scale == "width":
            q = q * (1.0 / math.sqrt(self.num_heads))  # (q / sqrt(H)) k^T / sqrt(d_h)
        if self.record_marginals:
            # With uniform marginals these are n times the weights' sums; the deviation
            # from doubly stochastic, relative to the target, is the same.
            with torch.no_grad():
                self.last_marginals = attention_marginals(
                    q, k, self.attention, self.n_iter, query_mask=query_mask, key_mask=key_mask
                )
                self.last_masks = (query_mask, key_mask)
        heads = scaled_dot_product_attention(
            q, k, v, self.attention, self.n_iter, query_mask=query_mask, key_mask=key_mask
        )
        batch, _, n, _ = heads.shape
        if self.attention == "sinkhorn" and self.sinkhorn_marginals == "uniform":
            # Divided by the number of real queries n' of each set (at least 1: a set
            # without real queries has heads of 0, which must not become 0 / 0).
            heads = heads / (
                n
                if query_mask is None
                else query_mask.sum(-1, keepdim=True).clamp_min(1)[..., None]
            )
        return query, heads.transpose(1, 2).reshape(batch, n, self.channels)

    def extra_repr(self) -> str:
        """Summary shown by ``print(module)``."""
        text = f"heads={self.num_heads}, attention={self.attention}, n_iter={self.n_iter}"
        if self.logit_scale != "head":
            text += f", logit_scale={self.logit_scale}"
        if self.sinkhorn_marginals != "attention":
            text += f", sinkhorn_marginals={self.sinkhorn_marginals}"
        return text
