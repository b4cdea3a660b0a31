"""One forward + backward of the Triton Sinkhorn attention, for Nsight Compute (CUDA only).

Compiles and warms up first, then runs one forward + backward between
``cudaProfilerStart`` and ``cudaProfilerStop``, so that ``ncu --profile-from-start off``
profiles exactly the kernels of one call: where they stall, how full the multiprocessors
are, how close to the special-function and issue limits they run. What time alone cannot
show, and what the next optimization needs (``benchmarks/RESULTS.md`` estimates the
kernels' instruction and exponential counts; only counters say which limit binds).

Example (one GPU; a minute or two: ncu replays each kernel once per section group)::

    ncu --profile-from-start off --clock-control none --section SpeedOfLight \\
        --section Occupancy --section WarpStateStats --section LaunchStats \\
        --kernel-name regex:"^_(row|col|out|bwd)" \\
        python benchmarks/ncu_attention.py --n 4096 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import sys

import torch


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4096, help="queries = keys")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--n-iter", type=int, default=5)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("error: benchmarks/ncu_attention.py needs a CUDA GPU")
    from pointsink.triton_sinkhorn import triton_sinkhorn_attention

    gen = torch.Generator(device="cuda").manual_seed(0)
    heads = args.batch * args.heads
    q, k, v, grad = (
        torch.randn(heads, args.n, args.dim, generator=gen, device="cuda").to(
            getattr(torch, args.dtype)
        )
        for _ in range(4)
    )
    q, k, v = (t.requires_grad_() for t in (q, k, v))

    def step() -> None:
        out = triton_sinkhorn_attention(q, k, v, args.n_iter, args.dim**-0.5)
        out.backward(grad)

    for _ in range(2):  # compile, then one warm run
        step()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    step()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    print(f"profiled one forward + backward: {heads} heads x {args.n}^2, d={args.dim}, "
          f"n_iter={args.n_iter}, {args.dtype}")  # fmt: skip


if __name__ == "__main__":
    main()
