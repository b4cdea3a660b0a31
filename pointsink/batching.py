"""Folding a ``torch.func.vmap`` dimension into a function's own batch of sets.

The autograd Functions of Sinkhorn attention and of farthest-point sampling each handle a
batch of sets in one call (tiled loops, Triton kernels, preallocated buffers), which
``vmap`` cannot batch operation by operation. Their ``vmap`` rules fold the vmapped
dimension into that batch instead: one call for all samples.
"""

from __future__ import annotations

from torch import Tensor


def fold_vmapped(tensor: Tensor | None, dim: int | None, size: int) -> Tensor | None:
    """``(size * B, ...)`` from a tensor vmapped over ``dim`` (None: shared by all samples).

    Args:
        tensor: A tensor whose dimension ``dim`` runs over the ``size`` samples and whose
            other dimensions are ``(B, ...)``; or None (returned as is).
        dim: The vmapped dimension, or None for a tensor every sample shares (expanded).
        size: The number of samples, ``info.batch_size`` in a ``vmap`` rule.

    Returns:
        The tensor with sample ``s`` in rows ``s * B`` to ``(s + 1) * B - 1``; unfold a
        result ``(size * B, ...)`` with ``result.reshape(size, -1, *result.shape[1:])``.
    """
    if tensor is None:
        return None
    if dim is None:
        tensor = tensor.unsqueeze(0).expand(size, *tensor.shape)
    else:
        tensor = tensor.movedim(dim, 0)
    return tensor.reshape(-1, *tensor.shape[2:])
