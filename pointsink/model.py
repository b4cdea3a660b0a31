"""The Set Sinkformer classifier: plain PyTorch, no Lightning."""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping
from typing import Any, Literal

from torch import Tensor, nn

from pointsink.attention import (
    DEFAULT_N_ITER,
    AttentionKind,
    LogitScale,
    SinkhornMarginals,
    check_attention_kind,
    check_attention_options,
)
from pointsink.blocks import (
    InducedSetAttentionBlock,
    PoolingByMultiheadAttention,
    SetAttentionBlock,
)
from pointsink.embedding import EdgeConvEmbedding, SetAbstraction
from pointsink.validation import (
    check_bool,
    check_int,
    check_real,
    check_set_batch,
    check_set_mask,
)

__all__ = ["DEFAULT_N_ITER", "SetSinkformer", "unused_settings"]


class SetSinkformer(nn.Module):
    r"""Set Transformer classifier with Sinkhorn (or softmax) attention.

    ``[EdgeConv embedding] -> [set abstraction] -> encoder blocks (ISAB or SAB) -> dropout
    -> PMA -> dropout -> linear``. Without either (``local_neighbors=0``, ``num_groups=0``)
    this is the architecture of the Sinkformers paper's ModelNet experiment (Sander et al.,
    2022): two ISAB blocks of width 256 with 4 heads and 16 inducing points, one PMA seed.

    The logits are invariant to permutations of the input points.

    Args:
        num_classes: Number of output classes ``C``.
        in_channels: Per-point input features (3 for xyz).
        channels: Width of every block.
        num_heads: Attention heads.
        num_blocks: Number of encoder blocks.
        encoder: ``"isab"`` (linear in the number of points) or ``"sab"`` (quadratic).
        num_inducing_points: Inducing points per ISAB block.
        num_seeds: PMA seeds; their outputs are concatenated before the head.
        attention: ``"sinkhorn"`` or ``"softmax"``.
        n_iter: Sinkhorn iterations; 1 reproduces softmax attention exactly (with
            ``sinkhorn_marginals="uniform"``, softmax divided by the number of queries).
        layer_norm: Layer norms inside the attention blocks.
        pooling_attention: Attention of the PMA pooling; ``None`` uses ``attention``.
            Note that Sinkhorn over a single seed (``n = 1``) makes every column sum to
            ``1 / N`` after its second iteration, so PMA with one seed and ``n_iter >= 2``
            is exactly mean pooling of ``ReLU(X W)``; ``"softmax"`` keeps it attentive.
        dropout: Dropout probability before PMA and before the head.
        local_neighbors: ``k`` of an :class:`~pointsink.embedding.EdgeConvEmbedding` in
            front of the encoder, so each point enters attention with a feature of its
            ``k`` nearest neighbours; ``0`` feeds raw points to the first block (the paper).
        local_channels: Width of its local features; the coordinates are passed on beside them.
        num_groups: ``M`` of a :class:`~pointsink.embedding.SetAbstraction` in front of the
            encoder, which then attends over ``M`` tokens of width ``channels``, each the
            max-pooled MLP features of the ``group_size`` points nearest a farthest-point
            sample; ``0`` (the paper) attends over the points themselves.
        group_size: ``k`` points per token of the set abstraction.
        normalize_offsets: Divide the set abstraction's coordinate offsets by the shape's
            RMS group radius (see :class:`~pointsink.embedding.SetAbstraction`).
        group_hidden_layers: Hidden layers of the set abstraction's per-edge MLP (1: one
            hidden layer between the offsets and the token width).
        logit_scale: ``"head"`` (logits divided by ``sqrt(channels / num_heads)``) or
            ``"width"`` (by ``sqrt(channels)``, the Sinkformers reference code).
        sinkhorn_marginals: ``"attention"`` (Sinkhorn's rows sum to 1, its columns to
            ``n / m``) or ``"uniform"`` (the reference code's transport plan: rows ``1 / n``,
            columns ``1 / m``); see :class:`~pointsink.attention.MultiheadAttention`.
        pooling_projection: PMA attends to ``ReLU(X W)`` (the Set Transformer paper);
            ``False`` attends to ``X`` itself (the reference code).

    Raises:
        ValueError: An invalid argument: e.g. ``in_channels``, ``channels``, ``num_heads``,
            ``num_inducing_points`` or ``num_seeds`` not an integer ``>= 1`` (bools and
            floats are rejected, NumPy integers accepted), or ``num_heads`` not dividing
            ``channels``.

    Attributes:
        min_points: The fewest points per set the model takes without a mask: the
            nearest-neighbour searches and the farthest-point sampling need at least
            ``local_neighbors``, ``num_groups`` and ``group_size`` points. Padded, masked
            sets may have fewer real points (:meth:`forward`).
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        channels: int = 256,
        num_heads: int = 4,
        num_blocks: int = 2,
        encoder: Literal["isab", "sab"] = "isab",
        num_inducing_points: int = 16,
        num_seeds: int = 1,
        attention: AttentionKind = "sinkhorn",
        n_iter: int = DEFAULT_N_ITER,
        layer_norm: bool = False,
        pooling_attention: AttentionKind | None = None,
        dropout: float = 0.5,
        local_neighbors: int = 0,
        local_channels: int = 64,
        num_groups: int = 0,
        group_size: int = 32,
        normalize_offsets: bool = False,
        group_hidden_layers: int = 1,
        logit_scale: LogitScale = "head",
        sinkhorn_marginals: SinkhornMarginals = "attention",
        pooling_projection: bool = True,
    ) -> None:
        super().__init__()
        check_int("num_classes", num_classes, minimum=2)
        if encoder not in ("isab", "sab"):
            raise ValueError(f"encoder must be 'isab' or 'sab'; got {encoder!r}.")
        check_int("num_blocks", num_blocks, minimum=1)
        in_channels = check_int("in_channels", in_channels)
        channels = check_int("channels", channels)
        num_heads = check_int("num_heads", num_heads)
        num_inducing_points = check_int("num_inducing_points", num_inducing_points)
        num_seeds = check_int("num_seeds", num_seeds)
        check_int("local_neighbors", local_neighbors, minimum=0)
        check_int("local_channels", local_channels)
        # nn.Dropout takes True as p = 1 (every feature dropped) and NaN silently.
        check_real("dropout", dropout, 0.0, 1.0, high_open=True)
        check_int("num_groups", num_groups, minimum=0)
        check_int("group_hidden_layers", group_hidden_layers)
        if check_bool("normalize_offsets", normalize_offsets) and num_groups == 0:
            raise ValueError(
                "normalize_offsets applies to the set abstraction; set num_groups > 0 too."
            )
        check_attention_kind(attention, n_iter)
        check_attention_options(logit_scale, sinkhorn_marginals)
        attention_options = {"logit_scale": logit_scale, "sinkhorn_marginals": sinkhorn_marginals}
        self.in_channels = in_channels
        self.min_points = max(1, local_neighbors, num_groups, group_size if num_groups else 0)
        embeddings: list[EdgeConvEmbedding | SetAbstraction] = []
        encoder_in = in_channels
        if local_neighbors > 0:
            embeddings.append(EdgeConvEmbedding(encoder_in, local_channels, local_neighbors))
            encoder_in = embeddings[-1].out_channels
        if num_groups > 0:
            embeddings.append(
                SetAbstraction(
                    encoder_in,
                    channels,
                    num_groups,
                    group_size,
                    normalize_offsets=normalize_offsets,
                    hidden_layers=group_hidden_layers,
                )
            )
            encoder_in = embeddings[-1].out_channels
        self.embedding = nn.Sequential(*embeddings)
        blocks: list[nn.Module] = []
        for index in range(num_blocks):
            block_in = encoder_in if index == 0 else channels
            if encoder == "isab":
                blocks.append(
                    InducedSetAttentionBlock(
                        block_in,
                        channels,
                        num_heads,
                        num_inducing_points,
                        attention,
                        n_iter,
                        layer_norm,
                        **attention_options,
                    )
                )
            else:
                blocks.append(
                    SetAttentionBlock(
                        block_in,
                        channels,
                        num_heads,
                        attention,
                        n_iter,
                        layer_norm,
                        **attention_options,
                    )
                )
        self.encoder = nn.ModuleList(blocks)
        self.dropout = nn.Dropout(dropout)
        self.pool = PoolingByMultiheadAttention(
            channels,
            num_heads,
            num_seeds,
            pooling_attention or attention,
            n_iter,
            layer_norm,
            **attention_options,
            projection=pooling_projection,
        )
        self.head = nn.Linear(num_seeds * channels, num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-initializes all parameters."""
        for embedding in self.embedding:
            embedding.reset_parameters()
        for block in self.encoder:
            block.reset_parameters()
        self.pool.reset_parameters()
        self.head.reset_parameters()

    def forward(self, points: Tensor, mask: Tensor | None = None) -> Tensor:
        """Classifies point sets.

        Args:
            points: ``(B, N, in_channels)``.
            mask: ``(B, N)`` bool, True for real points, for sets of different sizes padded
                to one ``N``, or None (all real). See :meth:`forward_features`.

        Returns:
            Logits ``(B, num_classes)``: ``head(dropout(forward_features(points, mask)))``.
        """
        return self.head(self.dropout(self.forward_features(points, mask)))

    def forward_features(self, points: Tensor, mask: Tensor | None = None) -> Tensor:
        """Embeds point sets: the pooled features that the classification head reads.

        Args:
            points: ``(B, N, in_channels)``.
            mask: ``(B, N)`` bool, True for real points, or None (all real). A padded set
                gives the features of its real points alone (to float rounding); padding
                values are never read. With a mask a set may have fewer real points than
                :attr:`min_points`: the set abstraction then makes one token per real point
                and groups of all of them, and the EdgeConv embedding takes all of them as
                neighbours.

        Returns:
            ``(B, num_seeds * channels)``, invariant to the order of the ``N`` points.

        Raises:
            ValueError: ``points`` or ``mask`` has the wrong shape or device, ``points``
                holds no point, or, without a mask, fewer than :attr:`min_points`.
            TypeError: ``points`` has another dtype than the parameters (outside autocast),
                or ``mask`` is not boolean.
        """
        # The pooling seeds: a plain parameter of every model, whatever head or quantized
        # layers a user swaps in.
        check_set_batch("points", points, self.in_channels, self.pool.seeds, "num_points")
        if points.shape[1] == 0:  # a shape, not a value: no host sync
            # Failed inside the layers otherwise, differently per configuration.
            raise ValueError(f"points holds no point (shape {tuple(points.shape)}).")
        if mask is not None:
            check_set_mask("mask", mask, points, "num_points")
        if mask is None:
            x = self.embedding(points)
        else:
            x = points
            for embedding in self.embedding:
                # The set abstraction turns the point mask into a token mask.
                x, mask = embedding(x, mask), embedding.output_mask(mask)
        for block in self.encoder:
            # Without a mask, blocks get x alone: a user's own encoder block need not take one.
            x = block(x) if mask is None else block(x, mask)
        return self.pool(self.dropout(x), mask).flatten(1)

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike[str]) -> SetSinkformer:
        """Rebuilds the model of a ``train.py fit`` checkpoint, without Lightning.

        The architecture comes from the checkpoint's hyperparameters (settings that older
        checkpoints lack take this class's defaults, as when Lightning loads them) and the
        weights are read with a weights-only ``torch.load``. The class names, in label
        order, are ``pointsink.inference.load_checkpoint(path)["hyper_parameters"]
        ["class_names"]``; for classifying files, :class:`pointsink.ShapeClassifier` also
        samples and normalizes them as in training.

        Args:
            path: The ``.ckpt`` file.

        Returns:
            The model on the CPU, in eval mode.

        Raises:
            pointsink.inference.CheckpointError: The file is not a usable pointsink
                checkpoint (unreadable, no hyperparameters, neither class names nor a number
                of classes, weights that do not fit).
        """
        from pointsink.inference import (  # file reading lives with inference
            build_from_hparams,
            check_state_dict,
            checkpoint_class_names,
            checkpoint_hparams,
            checkpoint_model_weights,
            load_checkpoint,
        )

        checkpoint = load_checkpoint(path)
        hparams = checkpoint_hparams(checkpoint, path)
        num_classes = hparams.get("num_classes")
        if hparams.get("class_names") is not None or not isinstance(num_classes, int):
            num_classes = len(checkpoint_class_names(hparams, path))
        model = build_from_hparams(cls, hparams, path, num_classes=num_classes)
        weights = checkpoint_model_weights(checkpoint, path)
        check_state_dict(path, model.state_dict(), weights)
        model.load_state_dict(weights, strict=True)
        return model.eval()


def unused_settings(settings: Mapping[str, Any]) -> set[str]:
    """The :class:`SetSinkformer` settings that build nothing under the other ``settings``.

    ``local_channels`` without an EdgeConv embedding (``local_neighbors`` 0), ``group_size``,
    ``normalize_offsets`` and ``group_hidden_layers`` without a set abstraction
    (``num_groups`` 0), and
    ``num_inducing_points`` with the SAB encoder; missing settings take the model's defaults.
    """
    defaults = inspect.signature(SetSinkformer.__init__).parameters

    def setting(name: str) -> Any:
        return settings.get(name, defaults[name].default)

    unused = set()
    if setting("local_neighbors") == 0:
        unused.add("local_channels")
    if setting("num_groups") == 0:
        unused |= {"group_size", "normalize_offsets", "group_hidden_layers"}
    if setting("encoder") == "sab":
        unused.add("num_inducing_points")
    return unused
