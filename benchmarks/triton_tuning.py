"""Tune and time the Triton Sinkhorn-attention kernels' launch configurations (CUDA only).

Three steps, one process (plus helpers that compile in parallel):

1. Sweep. For each kernel of ``pointsink.triton_sinkhorn.KERNELS`` and each candidate
   ``(BLOCK_M, BLOCK_N, num_warps, num_stages)``, that kernel takes the candidate and the
   others keep their defaults; forward + backward of Sinkhorn attention (``--sweep-n``,
   bfloat16) is timed with CUDA events (median of ``--repeats`` after a warm-up), so the
   differences between candidates of one kernel are that kernel's. Candidates that do not
   compile are reported as errors; those that need more shared memory than the GPU allows
   run with fewer pipeline stages (``pointsink.triton_sinkhorn._run``), marked as such.
2. Check. At N = 1024 the defaults and the best candidates are compared with float64 dense
   autograd (outputs and the gradients of q, k, v), as ``tests/test_sinkhorn_attention.py``
   does: largest error over ``1 + max |reference|``.
3. Table. SDPA softmax, the defaults, the best candidates and, with ``--baseline``, another
   copy of ``triton_sinkhorn.py`` (e.g. an earlier commit's), forward + backward at each
   ``--sizes`` in bfloat16 and float32: median time (CUDA events, up to ``--repeats`` runs
   or about 2 s) and extra peak memory (as ``benchmarks/attention.py`` measures it).

Example (one H100/H200; a few minutes, most of it compiling)::

    python benchmarks/triton_tuning.py --json outputs/tuning.json \\
        --baseline outputs/base_triton_sinkhorn.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from types import ModuleType

import torch
import torch.nn.functional as F  # noqa: N812
from triton_sass import load_module  # benchmarks/, beside this script

CANDIDATES = [
    (128, 64, 8, 3),
    (64, 32, 4, 3),
    (64, 64, 4, 3),
    (128, 64, 4, 3),
    (64, 128, 4, 3),
    (64, 128, 8, 3),
    (128, 128, 8, 3),
    (128, 128, 8, 2),
    (128, 32, 8, 3),
    (128, 32, 4, 3),
    (32, 64, 4, 3),
    (32, 128, 4, 3),
    (64, 64, 8, 3),
    (128, 64, 8, 4),
    (64, 64, 4, 4),
    (64, 32, 4, 2),
    (128, 128, 4, 3),
    (128, 128, 4, 2),
    (256, 64, 8, 3),
    (64, 256, 8, 3),
    (256, 128, 8, 2),
    (128, 256, 8, 2),
]
Config = tuple[int, int, int, int]


def _module() -> ModuleType:
    import pointsink.triton_sinkhorn as ts

    return ts


def _use_blocks(overrides: dict[str, Config]) -> None:
    """Makes ``pointsink.triton_sinkhorn`` launch with ``overrides`` over its defaults."""
    ts = _module()
    defaults = getattr(ts, "_default_blocks_for", ts._blocks_for)
    ts._default_blocks_for = defaults
    ts._blocks_for = lambda *args: {**defaults(*args), **overrides}


Shape = tuple[int, int, int, int]  # (n queries, m keys, heads in all G, head dim d)


def _square(n: int, args: argparse.Namespace) -> Shape:
    return (n, n, args.batch * args.heads, args.dim)


def _inputs(shape: Shape, args: argparse.Namespace, dtype: torch.dtype, seed: int = 0) -> list:
    """``q (G, n, d)``, ``k, v (G, m, d)`` and an output gradient, standard normal."""
    n, m, heads, dim = shape
    gen = torch.Generator(device=args.device).manual_seed(seed)
    q, k, v, grad = (
        torch.randn((heads, rows, dim), generator=gen, device=args.device).to(dtype)
        for rows in (n, m, m, n)
    )
    return [q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), grad]


def _fwd_bwd(fn: Callable, q, k, v, grad) -> list[torch.Tensor]:
    for t in (q, k, v):
        t.grad = None
    out = fn(q, k, v)
    out.backward(grad)
    return [out.detach(), q.grad, k.grad, v.grad]


def _time(fn: Callable, q, k, v, grad, repeats: int, budget_s: float = 2.0) -> dict:
    """Median, min and max of forward + backward (ms), CUDA events, after one warm-up.

    At most ``repeats`` runs, and fewer (but at least 3) once ``budget_s`` has passed. On a
    CPU (a smoke test under ``TRITON_INTERPRET=1``) a host clock times the runs.
    """
    cuda = q.is_cuda
    _fwd_bwd(fn, q, k, v, grad)
    if cuda:
        torch.cuda.synchronize()
    times = []
    started = time.perf_counter()
    while len(times) < repeats and (len(times) < 3 or time.perf_counter() - started < budget_s):
        if not cuda:
            tic = time.perf_counter()
            _fwd_bwd(fn, q, k, v, grad)
            times.append(1e3 * (time.perf_counter() - tic))
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        _fwd_bwd(fn, q, k, v, grad)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return {
        "ms": statistics.median(times),
        "min": min(times),
        "max": max(times),
        "runs": len(times),
    }


def _extra_peak_mib(fn: Callable, q, k, v, grad) -> float:
    if not q.is_cuda:
        return float("nan")
    for t in (q, k, v):
        t.grad = None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    _fwd_bwd(fn, q, k, v, grad)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def _sinkhorn(module: ModuleType, n_iter: int) -> Callable:
    return lambda q, k, v: module.triton_sinkhorn_attention(q, k, v, n_iter, q.shape[-1] ** -0.5)


def _sdpa(q, k, v):
    return F.scaled_dot_product_attention(q[None], k[None], v[None])[0]


def _compile_job(job: tuple[str, Config, dict]) -> str | None:
    """Helper process: compiles one (kernel, candidate) by running it once."""
    kernel, config, arg_dict = job
    args = argparse.Namespace(**arg_dict)
    _use_blocks({kernel: config})
    try:
        inputs = _inputs(_square(args.sweep_n, args), args, torch.bfloat16)
        _fwd_bwd(_sinkhorn(_module(), args.n_iter), *inputs)
        if args.device == "cuda":
            torch.cuda.synchronize()
    except Exception as error:  # reported; the sweep goes on
        return f"{type(error).__name__}: {str(error).splitlines()[0][:80]}"
    return None


def _errors(module: ModuleType, args: argparse.Namespace, dtype: torch.dtype) -> float:
    """Largest error over (1 + max |ref|) against float64 dense autograd.

    On ``--check-n`` squared and on the shapes of ``test_triton_kernels_on_cuda``
    (1000 x 16, 16 x 1000, 2048 x 777; 8 heads of dim 64), outputs and input gradients.
    """
    from pointsink.sinkhorn_attention import dense_sinkhorn_attention

    worst = 0.0
    for shape in (_square(args.check_n, args), (1000, 16, 8, 64), (16, 1000, 8, 64),
                  (2048, 777, 8, 64)):  # fmt: skip
        q, k, v, grad = _inputs(shape, args, dtype, seed=1)
        got = _fwd_bwd(_sinkhorn(module, args.n_iter), q, k, v, grad)
        ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
        ref = dense_sinkhorn_attention(*ref_in, args.n_iter)
        ref.backward(grad.double())
        want = [ref.detach()] + [t.grad for t in ref_in]
        for g, w in zip(got, want, strict=True):
            worst = max(worst, ((g.double() - w).abs().max() / (1 + w.abs().max())).item())
    return worst


def _save(report: dict, path: str | None) -> None:
    """Writes what was measured so far (a later step may still fail)."""
    if path:
        with open(path, "w") as out:
            json.dump(report, out, indent=2)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sweep-n", type=int, default=8192)
    parser.add_argument("--check-n", type=int, default=1024, help="size of the float64 check")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument(
        "--shapes",
        nargs="*",
        default=["256,16,128,32", "16,256,128,32", "1024,16,128,32", "16,1024,128,32"],
        help="more table rows, each 'n,m,G,d' (default: the recipe's ISAB attention, batch "
        "32 x 4 heads of dim 32, at 256 and 1024 points)",
    )
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--n-iter", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=20, help="timed runs in the table")
    parser.add_argument("--sweep-repeats", type=int, default=10, help="timed runs per candidate")
    parser.add_argument(
        "--device", default="cuda", help="cpu: a smoke test under TRITON_INTERPRET=1"
    )
    parser.add_argument("--workers", type=int, default=8, help="parallel compiling helpers")
    parser.add_argument("--kernels", nargs="+", default=None, help="default: all")
    parser.add_argument("--baseline", help="another triton_sinkhorn.py to time beside")
    parser.add_argument("--json", help="write everything measured here")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit(
            "error: benchmarks/triton_tuning.py needs a CUDA GPU (or --device cpu with "
            "TRITON_INTERPRET=1 for a smoke test)"
        )
    ts = _module()
    kernels = args.kernels or list(ts.KERNELS)
    # The defaults as _config picks them for bfloat16 (the sweep's dtype) on this device.
    shared_memory = ts._shared_memory_per_program(0) if args.device == "cuda" else None
    defaults = ts._blocks_for(args.dim, 2, shared_memory)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    report: dict = {
        "args": vars(args),
        "device": device_name,
        "torch": torch.__version__,
        "defaults": defaults,
    }
    import triton

    report["triton"] = triton.__version__
    print(f"{report['device']} | torch {torch.__version__} | triton {triton.__version__}")

    # 1. Compile every (kernel, candidate) in parallel helpers, then sweep in this process.
    jobs = [
        (kernel, c, vars(args)) for kernel in kernels for c in CANDIDATES if c != defaults[kernel]
    ]
    started = time.perf_counter()
    with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn")) as pool:
        compile_errors = dict(
            zip([(j[0], j[1]) for j in jobs], pool.map(_compile_job, jobs), strict=True)
        )
    elapsed = time.perf_counter() - started
    print(f"compiled {len(jobs)} (kernel, candidate) pairs in {elapsed:.0f} s", flush=True)
    inputs = _inputs(_square(args.sweep_n, args), args, torch.bfloat16)
    _use_blocks({})
    base = _time(_sinkhorn(ts, args.n_iter), *inputs, args.sweep_repeats)
    sweep: dict[str, list] = {}
    best: dict[str, Config] = {}
    for kernel in kernels:
        rows = [[list(defaults[kernel]), base["ms"], "default"]]
        for c in CANDIDATES:
            if c == defaults[kernel]:
                continue
            if compile_errors.get((kernel, c)):
                rows.append([list(c), None, compile_errors[(kernel, c)]])
                continue
            _use_blocks({kernel: c})
            ts._STAGES_THAT_FIT.clear()
            try:
                timing = _time(_sinkhorn(ts, args.n_iter), *inputs, args.sweep_repeats)
                # A candidate short of shared memory runs with fewer stages than it names.
                lowered = sorted(set(ts._STAGES_THAT_FIT.values()))
                rows.append([list(c), timing["ms"], f"ran at {lowered} stages" if lowered else ""])
            except Exception as error:
                rows.append([list(c), None, f"{type(error).__name__}"])
        sweep[kernel] = rows
        timed = [r for r in rows if r[1] is not None]
        best[kernel] = tuple(min(timed, key=lambda r: r[1])[0])  # type: ignore[assignment]
        print(f"\n{kernel}: fwd+bwd ms at N={args.sweep_n}, bf16, this kernel's config varied")
        for c, ms, note in sorted(rows, key=lambda r: (r[1] is None, r[1] or 0)):
            print(f"  {tuple(c)}  {'-' if ms is None else f'{ms:.2f}'}  {note}")
    report["sweep"] = sweep
    report["best"] = best
    _save(report, args.json)
    print("\nbest:", best)

    # 2. Correctness of the defaults and of the best candidates.
    checks = {}
    for label, overrides in (("default", {}), ("tuned", best)):
        _use_blocks(overrides)
        for dtype_name in args.dtypes:
            checks[f"{label}/{dtype_name}"] = _errors(ts, args, getattr(torch, dtype_name))
    if args.baseline:
        baseline = load_module(args.baseline, "baseline_triton_sinkhorn")
        for dtype_name in args.dtypes:
            checks[f"baseline/{dtype_name}"] = _errors(baseline, args, getattr(torch, dtype_name))
    report["errors_vs_float64"] = checks
    _save(report, args.json)
    print(
        f"errors vs float64 dense at N={args.check_n}:",
        {k: f"{v:.1e}" for k, v in checks.items()},
        flush=True,
    )

    # 3. The table.
    variants: list[tuple[str, Callable[[], Callable]]] = [("sdpa", lambda: _sdpa)]
    if args.baseline:
        variants.append(("baseline", lambda: _sinkhorn(baseline, args.n_iter)))
    variants += [
        ("default", lambda: _sinkhorn(ts, args.n_iter)),
        ("tuned", lambda: _sinkhorn(ts, args.n_iter)),
    ]
    shapes = [_square(n, args) for n in args.sizes]
    shapes += [tuple(int(x) for x in s.split(",")) for s in args.shapes]  # type: ignore[misc]
    table = []
    for dtype_name in args.dtypes:
        for shape in shapes:
            n = "x".join(str(x) for x in shape)
            try:
                tensors = _inputs(shape, args, getattr(torch, dtype_name))  # type: ignore[arg-type]
            except torch.OutOfMemoryError:
                continue
            for label, make in variants:
                _use_blocks(best if label == "tuned" else {})
                fn = make()
                try:
                    row = {
                        "impl": label,
                        "N": n,
                        "dtype": dtype_name,
                        **_time(fn, *tensors, args.repeats),
                        "extra_peak_mib": _extra_peak_mib(fn, *tensors),
                    }
                except torch.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    row = {"impl": label, "N": n, "dtype": dtype_name, "error": "OOM"}
                table.append(row)
                print(row, file=sys.stderr, flush=True)
                report["table"] = table
            del tensors
    report["table"] = table
    _save(report, args.json)
    sdpa = {(r["N"], r["dtype"]): r for r in table if r["impl"] == "sdpa" and "ms" in r}
    print(
        f"\nn_iter={args.n_iter}; n x m x G x d: queries, keys, heads in all, head dim; "
        "CUDA-event median; extra peak memory over inputs"
    )
    print(
        "| implementation | dtype | n x m x G x d | fwd+bwd ms (median) | min to max | runs "
        "| extra peak MiB | time / sdpa | memory / sdpa |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in table:
        if "ms" not in r:
            print(f"| {r['impl']} | {r['dtype']} | {r['N']} | {r['error']} | | | | | |")
            continue
        s = sdpa.get((r["N"], r["dtype"]))
        ratio = f"{r['ms'] / s['ms']:.2f}" if s else "-"
        mem = f"{r['extra_peak_mib'] / s['extra_peak_mib']:.2f}" if s else "-"
        print(
            f"| {r['impl']} | {r['dtype']} | {r['N']} | {r['ms']:.2f} | {r['min']:.2f} to "
            f"{r['max']:.2f} | {r['runs']} | {r['extra_peak_mib']:.1f} | {ratio} | {mem} |"
        )


if __name__ == "__main__":
    main()
