"""Benchmark Sinkhorn attention implementations: time (forward + backward) and peak memory.

Implementations, all on inputs q, k, v of shape (batch, heads, N, dim):

* ``sdpa``: softmax attention, ``torch.nn.functional.scaled_dot_product_attention`` (the
  baseline of the ratios);
* ``dense``: Sinkhorn attention through autograd on the full N x N matrix
  (``pointsink.sinkhorn_attention.dense_sinkhorn_attention``);
* ``chunked``: the tiled autograd function (``backend="chunked"``);
* ``triton``: the fused Triton kernels (``backend="triton"``, CUDA only).

Time: median over ``--repeats`` runs of forward + ``out.backward(grad)`` after ``--warmup``
runs (at least one; with ``torch.cuda.synchronize`` on CUDA), with the fastest and slowest
run beside it, so that a noisy median shows. ``--repeats`` defaults to 20 on CUDA (a run
takes milliseconds; three left outliers in the first GPU table) and 3 on a CPU.

Memory, "extra peak": the peak memory during one forward + backward (after the warm-up)
minus the memory held just before it (inputs already allocated; input gradients are freed
before every run, so they count as extra for every implementation).

* CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus
  ``memory_allocated`` before the run (torch's caching allocator: tensor bytes only).
* CPU: every (implementation, N) runs in its own subprocess; it resets the process's peak
  resident set size (``echo 5 > /proc/self/clear_refs``, Linux >= 4.0) right before the
  run and reads ``VmHWM`` from ``/proc/self/status`` after it, minus ``VmRSS`` before. This
  is the resident memory of the whole process (allocator overhead and any other
  allocation included), so small differences (a few MiB) are noise. Where
  ``clear_refs`` is not writable it falls back to ``ru_maxrss`` (then the peak includes
  everything since the process started and is only an upper bound).

Padded sets (``--padded-fraction F``): the last ``floor(F * N)`` queries and keys of every
set are padding, given to the Sinkhorn implementations as ``query_mask`` and ``key_mask``
and to ``sdpa`` as a boolean ``attn_mask`` over the keys.

Examples::

    python benchmarks/attention.py --device cpu --sizes 1024 2048 4096 --heads 4
    python benchmarks/attention.py --device cuda --sizes 4096 8192 --batch 8 --heads 4
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F  # noqa: N812

from pointsink.sinkhorn_attention import (
    dense_sinkhorn_attention,
    sinkhorn_attention,
    triton_available,
)

IMPLEMENTATIONS = ("sdpa", "dense", "chunked", "triton")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def attention_fn(
    impl: str, n_iter: int, chunk_size: int | None, mask: torch.Tensor | None = None
) -> Callable[..., torch.Tensor]:
    """The implementation ``impl`` as ``f(q, k, v)``; ``mask`` ``(B, 1, N)``: real elements."""
    masks = {"query_mask": mask, "key_mask": mask}
    if impl == "sdpa":
        attn_mask = None if mask is None else mask.unsqueeze(-2)
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    if impl == "dense":
        return lambda q, k, v: dense_sinkhorn_attention(q, k, v, n_iter, **masks)
    if impl == "chunked":
        return lambda q, k, v: sinkhorn_attention(
            q, k, v, n_iter, backend="chunked", chunk_size=chunk_size, **masks
        )
    if impl == "triton":
        return lambda q, k, v: sinkhorn_attention(q, k, v, n_iter, backend="triton", **masks)
    raise ValueError(impl)


def _read_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return True


def measure(
    args: argparse.Namespace, impl: str, size: int, what: str = "both"
) -> dict[str, float | str]:
    """Times (``what`` = "time"), measures memory ("memory") or both for one config."""
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    gen = torch.Generator(device="cpu").manual_seed(0)
    shape = (args.batch, args.heads, size, args.dim)
    q, k, v = (
        torch.randn(shape, generator=gen).to(device=device, dtype=dtype).requires_grad_()
        for _ in range(3)
    )
    grad_out = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    mask = None
    if args.padded_fraction > 0:
        real = size - int(args.padded_fraction * size)
        mask = (torch.arange(size, device=device) < real).expand(args.batch, 1, size)
    fn = attention_fn(impl, args.n_iter, args.chunk_size, mask)
    cuda = device.type == "cuda"

    def run() -> None:
        for t in (q, k, v):
            t.grad = None
        out = fn(q, k, v)
        out.backward(grad_out)
        del out
        if cuda:
            torch.cuda.synchronize(device)

    # Warm-up first, so that one-time initialization (thread pools, kernel compilation,
    # allocator pools) counts neither in the memory nor in the times.
    for _ in range(max(1, args.warmup)):
        run()
    result: dict[str, float | str] = {"impl": impl, "N": size}
    if what in ("memory", "both"):
        for t in (q, k, v):
            t.grad = None
        gc.collect()
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            run()
            extra = torch.cuda.max_memory_allocated(device) - before
            result["memory_method"] = "cuda max_memory_allocated"
        else:
            before_kib = _read_status_kib("VmRSS") or 0
            if _reset_peak_rss():
                run()
                peak_kib = _read_status_kib("VmHWM") or 0
                result["memory_method"] = "VmHWM after clear_refs"
            else:
                run()
                peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                result["memory_method"] = "ru_maxrss (upper bound)"
            extra = max(0, peak_kib - before_kib) * 1024
        result["extra_peak_mib"] = extra / 2**20
    if what in ("time", "both"):
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        result["time_ms"] = 1e3 * statistics.median(times)
        result["time_min_ms"], result["time_max_ms"] = 1e3 * min(times), 1e3 * max(times)
    return result


# glibc keeps freed heap memory resident and raises its mmap threshold dynamically, so the
# resident set would not shrink between runs and a later peak would be undercounted. The
# memory worker fixes the thresholds: blocks of 128 KiB and more are mmap'ed and returned to
# the system when freed, so the resident set follows the live allocations.
_MEMORY_WORKER_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def measure_in_subprocess(args: argparse.Namespace, impl: str, size: int) -> dict:
    """CPU: memory and time of one config, each in a fresh worker process."""
    command = [sys.executable, os.path.abspath(__file__), "--worker", impl, str(size)]
    flags = ("device", "n_iter", "batch", "heads", "dim", "dtype", "repeats", "warmup")
    for flag in (*flags, "padded_fraction"):
        command += ["--" + flag.replace("_", "-"), str(getattr(args, flag))]
    if args.chunk_size is not None:
        command += ["--chunk-size", str(args.chunk_size)]
    if args.threads is not None:
        command += ["--threads", str(args.threads)]
    row: dict = {}
    for what, extra_env in (("memory", _MEMORY_WORKER_ENV), ("time", {})):
        result = subprocess.run(
            [*command, "--measure", what],
            capture_output=True,
            text=True,
            check=False,
            env={**os.environ, **extra_env},
        )
        if result.returncode != 0:
            tail = (result.stderr.strip().splitlines()[-1:] or ["?"])[0]
            # Out of memory (a MemoryError, or the kernel's OOM killer) is a result, like
            # CUDA's OOM; any other failure is an error of the script or the code measured.
            if result.returncode < 0 or "MemoryError" in tail:
                return {"impl": impl, "N": size, "error": "OOM"}
            return {"impl": impl, "N": size, "error": tail[:60], "failed": True}
        row.update(json.loads(result.stdout.strip().splitlines()[-1]))
    return row


def measure_guarded(args: argparse.Namespace, impl: str, size: int) -> dict:
    try:
        return measure(args, impl, size)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {"impl": impl, "N": size, "error": "OOM"}


def format_table(args: argparse.Namespace, rows: list[dict]) -> str:
    baseline = {r["N"]: r for r in rows if r["impl"] == "sdpa" and "error" not in r}
    lines = [
        "| implementation | N | iterations | device | dtype | fwd+bwd time (ms, median) "
        "| min to max (ms) | extra peak memory (MiB) | time / sdpa | memory / sdpa |",
        "|---|---:|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        iters = "-" if r["impl"] == "sdpa" else str(args.n_iter)
        head = f"| {r['impl']} | {r['N']} | {iters} | {args.device} | {args.dtype} |"
        if "error" in r:
            lines.append(f"{head} {r['error']} | - | {r['error']} | - | - |")
            continue
        base = baseline.get(r["N"])
        time_ratio = f"{r['time_ms'] / base['time_ms']:.2f}" if base else "-"
        mem_ratio = (
            f"{r['extra_peak_mib'] / base['extra_peak_mib']:.2f}"
            if base and base["extra_peak_mib"] > 0
            else "-"
        )
        spread = f"{r['time_min_ms']:.1f} to {r['time_max_ms']:.1f}" if "time_min_ms" in r else "-"
        lines.append(
            f"{head} {r['time_ms']:.1f} | {spread} | {r['extra_peak_mib']:.1f} | {time_ratio} "
            f"| {mem_ratio} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--n-iter", type=int, default=5)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed runs (default: 20 on CUDA, 3 on a CPU)"
    )
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--chunk-size", type=int, default=None)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)"
    )
    parser.add_argument(
        "--impls", nargs="+", choices=IMPLEMENTATIONS, default=list(IMPLEMENTATIONS)
    )
    parser.add_argument(
        "--padded-fraction",
        type=float,
        default=0.0,
        help="fraction of each set that is padding, passed as masks (default 0: no masks)",
    )
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("--worker", nargs=2, metavar=("IMPL", "N"), help=argparse.SUPPRESS)
    parser.add_argument("--measure", default="both", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not 0.0 <= args.padded_fraction < 1.0:
        parser.error(f"--padded-fraction must be in [0, 1); got {args.padded_fraction}")
    if args.repeats is not None and args.repeats < 1:
        parser.error(f"--repeats must be at least 1; got {args.repeats}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.repeats is None:
        args.repeats = 20 if args.device.startswith("cuda") else 3
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is not None:
        # Kernel launches and the current stream follow the current device (GPU 0 otherwise).
        torch.cuda.set_device(device)
    if args.worker is not None:
        impl, size = args.worker[0], int(args.worker[1])
        print(json.dumps(measure(args, impl, size, args.measure)))
        return
    impls = [i for i in args.impls if i != "triton" or (args.device.startswith("cuda"))]
    if "triton" in impls and not triton_available():
        impls.remove("triton")
    rows = []
    for size in args.sizes:
        for impl in impls:
            if args.device == "cpu":
                row = measure_in_subprocess(args, impl, size)
            else:
                row = measure_guarded(args, impl, size)
            rows.append(row)
            print(row, file=sys.stderr, flush=True)
    print(
        f"batch={args.batch} heads={args.heads} dim={args.dim} n_iter={args.n_iter} "
        f"dtype={args.dtype} repeats={args.repeats} warmup={args.warmup} "
        f"padded_fraction={args.padded_fraction} "
        f"torch={torch.__version__} threads={torch.get_num_threads()} "
        f"memory={rows[0].get('memory_method', '?') if rows else '?'}"
    )
    print(format_table(args, rows))
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"args": vars(args), "rows": rows}, out, indent=2)
    failed = [f"{row['impl']} at N = {row['N']}" for row in rows if row.get("failed")]
    if failed:
        raise SystemExit(f"error: measurements failed: {', '.join(failed)} (see the table)")


if __name__ == "__main__":
    main()
