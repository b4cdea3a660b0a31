"""How accurate is Sinkhorn attention when its float32 matmuls are TF32 products? (CPU)

The Triton kernels multiply float32 tiles with ``tl.dot(..., input_precision=...)``:
``"ieee"`` (float32 fused multiply-adds), ``"tf32"`` (one TF32 tensor-core product: 10
mantissa bits per operand) or ``"tf32x3"`` (each operand split into a TF32 part and a TF32
remainder; three TF32 products, the remainders' product dropped). Triton's CPU interpreter
multiplies in float32 whatever the precision, so this script emulates the three on a CPU:
TF32 rounding is round-to-nearest with ties away from zero on the low 13 mantissa bits
(PTX ``cvt.rna.tf32.f32``), each product of TF32 values is exact in float32 and the sums
accumulate in float32. Every matmul of dense Sinkhorn attention, forward and backward, is
replaced by the emulated one; outputs and the gradients of q, k and v are compared with
float64 autograd: the largest error over ``1 + max |reference|``, as the tests measure it.

Example::

    python benchmarks/float32_dot_accuracy.py
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from pointsink.sinkhorn import sinkhorn


def round_to_tf32(x: torch.Tensor) -> torch.Tensor:
    """``x`` (float32) rounded to TF32: 10 explicit mantissa bits, ties away from zero."""
    bits = x.contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


def tf32_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """One TF32 product, float32 accumulation."""
    return round_to_tf32(a) @ round_to_tf32(b)


def tf32x3_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Three TF32 products: big x small + small x big + big x big."""
    a_big, b_big = round_to_tf32(a), round_to_tf32(b)
    a_small, b_small = round_to_tf32(a - a_big), round_to_tf32(b - b_big)
    return a_big @ b_small + a_small @ b_big + a_big @ b_big


def _differentiable(matmul: Callable) -> Callable:
    """``matmul`` in the forward pass and for both input gradients."""

    class _Matmul(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            ctx.save_for_backward(a, b)
            return matmul(a, b)

        @staticmethod
        def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            a, b = ctx.saved_tensors
            return matmul(grad, b.transpose(-1, -2)), matmul(a.transpose(-1, -2), grad)

    return _Matmul.apply


MATMULS = {
    "ieee": torch.matmul,
    "tf32x3": _differentiable(tf32x3_matmul),
    "tf32": _differentiable(tf32_matmul),
}


def _attention(q, k, v, n_iter: int, matmul: Callable) -> torch.Tensor:
    logits = matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    return matmul(sinkhorn(logits, n_iter), v)


def errors(shape: tuple[int, int, int, int], n_iter: int, seed: int = 0) -> dict[str, float]:
    """Largest error of each precision against float64 at ``(n, m, heads, d)``."""
    n, m, heads, dim = shape
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(heads, rows, dim, generator=gen) for rows in (n, m, m))
    grad = torch.randn(heads, n, dim, generator=gen)
    ref_in = [t.double().requires_grad_() for t in (q, k, v)]
    ref = _attention(*ref_in, n_iter, torch.matmul)
    ref.backward(grad.double())
    want = [ref.detach()] + [t.grad for t in ref_in]
    result = {}
    for name, matmul in MATMULS.items():
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = _attention(*leaves, n_iter, matmul)
        out.backward(grad)
        got = [out.detach()] + [t.grad for t in leaves]
        result[name] = max(
            ((g.double() - w).abs().max() / (1 + w.abs().max())).item()
            for g, w in zip(got, want, strict=True)
        )
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-iter", type=int, nargs="+", default=[1, 5, 9])
    parser.add_argument(
        "--shapes",
        nargs="+",
        default=["1024,1024,4,64", "1000,16,8,64", "16,1000,8,64", "2048,777,2,64"],
        help="'n,m,heads,d' each",
    )
    args = parser.parse_args(argv)
    print("| n x m x heads x d | n_iter | " + " | ".join(MATMULS) + " |")
    print("|---|---:|" + "---:|" * len(MATMULS))
    for text in args.shapes:
        shape = tuple(int(x) for x in text.split(","))
        for n_iter in args.n_iter:
            found = errors(shape, n_iter)  # type: ignore[arg-type]
            cells = " | ".join(f"{found[name]:.1e}" for name in MATMULS)
            print(f"| {'x'.join(map(str, shape))} | {n_iter} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
