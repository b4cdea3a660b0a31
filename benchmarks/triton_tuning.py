"""Tune and time the Triton Sinkhorn-attention kernels' launch configurations (CUDA only).

Compiling comes first, in ``--workers`` spawned helpers that fill Triton's on-disk cache
(``--phase compile`` does only that, so that other CPU work can run beside it; ``--phase
time`` then measures from the cache). The measuring steps, in one process:

1. Table. SDPA softmax, the defaults and, with ``--baseline``, another copy of
   ``triton_sinkhorn.py`` (e.g. an earlier commit's), forward + backward at each
   ``--sizes`` (squared) and ``--shapes`` in ``--dtypes``: median time (CUDA events,
   up to ``--repeats`` runs or about 2 s) and extra peak memory (as
   ``benchmarks/attention.py`` measures it).
2. Profile. GPU time of each kernel of the defaults at ``--sweep-n`` (torch.profiler).
3. Sweep. For each kernel of ``pointsink.triton_sinkhorn.KERNELS``, longest first, while
   ``--time-budget`` allows, and each candidate ``(BLOCK_M, BLOCK_N, num_warps,
   num_stages)``: that kernel takes the candidate and the others keep their defaults;
   forward + backward (``--sweep-n``, ``--sweep-dtype``) is timed (median of ``--sweep-repeats``
   after a warm-up), so the differences between candidates of one kernel are that kernel's.
   The defaults are timed again beside each kernel's candidates, and the fastest candidate
   is kept only if faster than them by more than ``--min-gain`` (noise otherwise).
   Failures are reported; candidates that need more shared memory than the GPU allows run
   with fewer pipeline stages (``pointsink.triton_sinkhorn._run``), marked as such.
4. Check. The defaults, the best candidates (sweep dtype) and the baseline against float64
   dense autograd (outputs and the gradients of q, k, v) at ``--check-n`` squared and the
   shapes of ``test_triton_kernels_on_cuda``: largest error over ``1 + max |reference|``.
5. The best candidates, where they differ from the defaults, in the table (sweep dtype).

Everything measured goes to ``--json`` as it comes; the table is printed last.

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

import pointsink.triton_sinkhorn as ts
from pointsink.triton_sinkhorn import LaunchConfig

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


def _use_blocks(overrides: dict[str, LaunchConfig]) -> None:
    """Makes ``pointsink.triton_sinkhorn`` launch with ``overrides`` over its defaults."""
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


def _compile_job(job: tuple[dict[str, LaunchConfig], str, Shape, str | None, dict]) -> str | None:
    """Helper process: compiles the launches of one forward + backward by running it once.

    ``(overrides, dtype, shape, module path, args)``: the kernels named in ``overrides``
    take those configurations, the others their defaults; with a module path, that copy of
    ``triton_sinkhorn.py`` runs instead (the baseline). What compiles lands in Triton's
    on-disk cache, from which the measuring process loads it.
    """
    overrides, dtype_name, shape, path, arg_dict = job
    args = argparse.Namespace(**arg_dict)
    module = load_module(path, "baseline_triton_sinkhorn") if path else ts
    _use_blocks(overrides)
    try:
        inputs = _inputs(shape, args, getattr(torch, dtype_name))
        _fwd_bwd(_sinkhorn(module, args.n_iter), *inputs)
        if args.device == "cuda":
            torch.cuda.synchronize()
    except Exception as error:  # reported; the sweep goes on
        return f"{type(error).__name__}: {str(error).splitlines()[0][:80]}"
    return None


def _parse_shape(text: str) -> Shape:
    return tuple(int(x) for x in text.split(","))  # type: ignore[return-value]


def _check_shapes(args: argparse.Namespace) -> list[Shape]:
    """``--check-n`` squared and ``--check-shapes``."""
    return [_square(args.check_n, args)] + [_parse_shape(s) for s in args.check_shapes]


def _errors(module: ModuleType, args: argparse.Namespace, dtype: torch.dtype) -> float:
    """Largest error over (1 + max |ref|) against float64 dense autograd.

    On ``--check-n`` squared and on the shapes of ``test_triton_kernels_on_cuda``
    (1000 x 16, 16 x 1000, 2048 x 777; 8 heads of dim 64), outputs and input gradients.
    """
    from pointsink.sinkhorn_attention import dense_sinkhorn_attention

    worst = 0.0
    for shape in _check_shapes(args):
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


# Triton kernels of pointsink.triton_sinkhorn and the launch configuration each takes.
_KERNEL_OF_JIT = {
    "_row_lse_kernel": "row",
    "_out_kernel": "row",
    "_col_lse_kernel": "col",
    "_bwd_col_kernel": "bwd_col",
    "_bwd_row_kernel": "bwd_row",
    "_bwd_dq_kernel": "dq",
    "_bwd_dkdv_kernel": "dkdv",
}


def _profile(fn: Callable, q, k, v, grad) -> dict[str, dict]:
    """GPU time (ms) and launches of each kernel in one forward + backward (torch.profiler).

    Triton kernels are named as in ``pointsink.triton_sinkhorn``; everything else (fills,
    copies, sums) is added up as ``other``.
    """
    from torch.profiler import ProfilerActivity, profile

    _fwd_bwd(fn, q, k, v, grad)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        _fwd_bwd(fn, q, k, v, grad)
        torch.cuda.synchronize()
    kernels: dict[str, dict] = {}
    for event in prof.key_averages():
        us = event.self_device_time_total
        if us <= 0:
            continue
        name = next((jit for jit in _KERNEL_OF_JIT if jit in event.key), "other")
        entry = kernels.setdefault(name, {"ms": 0.0, "launches": 0})
        entry["ms"] += us / 1e3
        entry["launches"] += event.count
    return dict(sorted(kernels.items(), key=lambda item: -item[1]["ms"]))


def _compile_all(args: argparse.Namespace, jobs: list) -> dict:
    """Runs ``jobs`` (see :func:`_compile_job`) in ``--workers`` spawned helpers."""
    started = time.perf_counter()
    with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn")) as pool:
        errors = list(pool.map(_compile_job, jobs))
    print(f"compiled {len(jobs)} launches in {time.perf_counter() - started:.0f} s", flush=True)
    # {"overrides, dtype, shape, baseline?": error} of those that failed
    return {f"{j[0]} {j[1]} {j[2]} {bool(j[3])}": e for j, e in zip(jobs, errors, strict=True) if e}


def _table_rows(
    variants: list[tuple[str, Callable, dict]],
    shapes: list[Shape],
    args: argparse.Namespace,
    table: list[dict],
    report: dict,
    dtypes: list[str],
) -> None:
    """Times each variant (label, function, block overrides) at each shape and dtype."""
    for dtype_name in dtypes:
        for shape in shapes:
            n = "x".join(str(x) for x in shape)
            try:
                tensors = _inputs(shape, args, getattr(torch, dtype_name))
            except torch.OutOfMemoryError:
                continue
            for label, fn, overrides in variants:
                _use_blocks(overrides)
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
                except Exception as error:  # e.g. a baseline that no longer launches
                    row = {"impl": label, "N": n, "dtype": dtype_name,
                           "error": f"{type(error).__name__}: {str(error)[:60]}"}  # fmt: skip
                table.append(row)
                print(row, file=sys.stderr, flush=True)
                report["table"] = table
                _save(report, args.json)
            del tensors
    _use_blocks({})


def _print_table(table: list[dict], n_iter: int) -> None:
    sdpa = {(r["N"], r["dtype"]): r for r in table if r["impl"] == "sdpa" and "ms" in r}
    print(
        f"\nn_iter={n_iter}; n x m x G x d: queries, keys, heads in all, head dim; "
        "CUDA-event median; extra peak memory over inputs"
    )
    print(
        "| implementation | dtype | n x m x G x d | fwd+bwd ms (median) | min to max | runs "
        "| extra peak MiB | time / sdpa | memory / sdpa |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    shape_order = {n: i for i, n in enumerate(dict.fromkeys(r["N"] for r in table))}
    for r in sorted(table, key=lambda r: (r["dtype"], shape_order[r["N"]])):
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sweep-n", type=int, default=8192)
    parser.add_argument("--check-n", type=int, default=1024, help="size of the float64 check")
    parser.add_argument(
        "--check-shapes",
        nargs="*",
        default=["1000,16,8,64", "16,1000,8,64", "2048,777,8,64"],
        help="more shapes 'n,m,G,d' of the float64 check (default: test_triton_kernels_on_cuda's)",
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument(
        "--sweep-dtype",
        default="bfloat16",
        choices=["bfloat16", "float16", "float32"],
        help="dtype of the sweep, whose defaults it varies (float32 has tiles of its own)",
    )
    parser.add_argument(
        "--shapes",
        nargs="*",
        default=["256,16,128,64", "16,256,128,64", "1024,16,128,64", "16,1024,128,64"],
        help="more table rows, each 'n,m,G,d' (default: the recipe's ISAB attention, batch "
        "32 x 4 heads of dim 64 (width 256), at 256 and 1024 points)",
    )
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--n-iter", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=20, help="timed runs in the table")
    parser.add_argument("--sweep-repeats", type=int, default=10, help="timed runs per candidate")
    parser.add_argument(
        "--min-gain", type=float, default=0.03,
        help="a launch replaces the defaults only if this much faster (fraction, default 0.03)",
    )  # fmt: skip
    parser.add_argument(
        "--device", default="cuda", help="cpu: a smoke test under TRITON_INTERPRET=1"
    )
    parser.add_argument("--workers", type=int, default=8, help="parallel compiling helpers")
    parser.add_argument("--kernels", nargs="+", default=None, help="default: all")
    parser.add_argument(
        "--candidates", type=int, default=len(CANDIDATES), help="sweep the first this many"
    )
    parser.add_argument("--baseline", help="another triton_sinkhorn.py to time beside")
    parser.add_argument("--json", help="write everything measured here")
    parser.add_argument(
        "--phase",
        choices=["all", "compile", "time"],
        default="all",
        help="compile: only fill Triton's cache in helpers (so that other work can run "
        "beside it); time: only measure (loading from the cache); all: both",
    )
    parser.add_argument(
        "--time-budget",
        type=float,
        default=float("inf"),
        help="seconds for the measuring steps: the sweep takes no further kernel once "
        "fewer than --reserve remain",
    )
    parser.add_argument("--reserve", type=float, default=60.0)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit(
            "error: benchmarks/triton_tuning.py needs a CUDA GPU (or --device cpu with "
            "TRITON_INTERPRET=1 for a smoke test)"
        )
    started = time.perf_counter()
    kernels = args.kernels or list(ts.KERNELS)
    # The defaults as _config picks them for the sweep's dtype on this device.
    sweep_dtype = getattr(torch, args.sweep_dtype)
    shared_memory = ts._shared_memory_per_program(0) if args.device == "cuda" else None
    defaults = ts._blocks_for(args.dim, sweep_dtype.itemsize, shared_memory)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    import triton

    report: dict = {
        "args": vars(args),
        "device": device_name,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "defaults": defaults,
    }
    print(f"{report['device']} | torch {torch.__version__} | triton {triton.__version__}")
    sweep_shape = _square(args.sweep_n, args)
    shapes = [_square(n, args) for n in args.sizes]
    shapes += [_parse_shape(s) for s in args.shapes]
    candidates = CANDIDATES[: args.candidates]

    if args.phase in ("all", "compile"):
        # Sweep candidates first, then the table's and the check's launches.
        jobs = [
            ({kernel: c}, args.sweep_dtype, sweep_shape, None, vars(args))
            for kernel in kernels
            for c in candidates
            if c != defaults[kernel]
        ]
        for dtype_name in args.dtypes:
            for shape in shapes + _check_shapes(args):
                for path in [None] + ([args.baseline] if args.baseline else []):
                    jobs.append(({}, dtype_name, shape, path, vars(args)))
        report["compile_errors"] = _compile_all(args, jobs)
        _save(report, args.json)
        if args.phase == "compile":
            return

    # 1. The table: SDPA softmax, the baseline, the defaults.
    baseline = load_module(args.baseline, "baseline_triton_sinkhorn") if args.baseline else None
    variants: list[tuple[str, Callable, dict]] = [("sdpa", _sdpa, {})]
    if baseline is not None:
        variants.append(("baseline", _sinkhorn(baseline, args.n_iter), {}))
    variants.append(("default", _sinkhorn(ts, args.n_iter), {}))
    table: list[dict] = []
    _table_rows(variants, shapes, args, table, report, args.dtypes)
    print(f"table timed in {time.perf_counter() - started:.0f} s", flush=True)

    # 2. Where the defaults spend their time, kernel by kernel.
    inputs = _inputs(sweep_shape, args, sweep_dtype)
    profile: dict[str, dict] = {}
    if args.device == "cuda":
        for dtype_name in args.dtypes:
            try:
                tensors = _inputs(sweep_shape, args, getattr(torch, dtype_name))
                profile[dtype_name] = _profile(_sinkhorn(ts, args.n_iter), *tensors)
                del tensors
            except Exception as error:  # the profiler is a help, not a requirement
                profile[dtype_name] = {"error": f"{type(error).__name__}: {error}"[:100]}
        report["profile"] = profile
        _save(report, args.json)
        for dtype_name, kernel_times in profile.items():
            print(f"\nprofile, defaults, {dtype_name}, N={args.sweep_n}: ms (launches)")
            for name, entry in kernel_times.items():
                print(f"  {name}: {entry}")

    # 3. The sweep, the kernels that take longest first, while time remains.
    kernel_ms = {k: 0.0 for k in kernels}
    for name, entry in profile.get(args.sweep_dtype, {}).items():
        if _KERNEL_OF_JIT.get(name) in kernel_ms:
            kernel_ms[_KERNEL_OF_JIT[name]] += entry["ms"]
    kernels = sorted(kernels, key=lambda k: -kernel_ms[k])
    sweep: dict[str, list] = {}
    best: dict[str, LaunchConfig] = {}
    for kernel in kernels:
        if time.perf_counter() - started > args.time_budget - args.reserve:
            print(f"time budget: {kernel} not swept", flush=True)
            continue
        # The defaults timed again beside each kernel's candidates: timings drift.
        base = _time(_sinkhorn(ts, args.n_iter), *inputs, args.sweep_repeats)
        rows = [[list(defaults[kernel]), base["ms"], "default"]]
        for c in candidates:
            if c == defaults[kernel]:
                continue
            _use_blocks({kernel: c})
            ts._STAGES_THAT_FIT.clear()
            try:
                timing = _time(_sinkhorn(ts, args.n_iter), *inputs, args.sweep_repeats)
                # A candidate short of shared memory runs with fewer stages than it names.
                lowered = sorted(set(ts._STAGES_THAT_FIT.values()))
                rows.append([list(c), timing["ms"], f"ran at {lowered} stages" if lowered else ""])
            except Exception as error:
                rows.append([list(c), None, f"{type(error).__name__}: {str(error)[:60]}"])
        sweep[kernel] = rows
        timed = [r for r in rows if r[1] is not None]
        fastest = min(timed, key=lambda r: r[1])
        # Within the noise of a median the defaults stay: a "tuned" launch must be faster
        # by more than --min-gain.
        if fastest[1] < base["ms"] * (1.0 - args.min_gain):
            best[kernel] = tuple(fastest[0])  # type: ignore[assignment]
        else:
            best[kernel] = defaults[kernel]
        print(
            f"\n{kernel}: fwd+bwd ms at N={args.sweep_n}, {args.sweep_dtype}, "
            "this kernel's config varied"
        )
        for c, ms, note in sorted(rows, key=lambda r: (r[1] is None, r[1] or 0)):
            print(f"  {tuple(c)}  {'-' if ms is None else f'{ms:.2f}'}  {note}")
        report["sweep"], report["best"] = sweep, best
        _save(report, args.json)
    _use_blocks({})
    tuned = {k: c for k, c in best.items() if c != defaults[k]}
    print("\nbest:", best, "| differ from the defaults:", tuned, flush=True)

    # 4. Correctness against float64 dense autograd (the tuned launches in the sweep's dtype,
    # compiled in helpers first).
    if tuned and args.device == "cuda":
        jobs = [(tuned, args.sweep_dtype, shape, None, vars(args)) for shape in _check_shapes(args)]
        report["compile_errors_tuned"] = _compile_all(args, jobs)
    checks = {}
    labelled = [("default", ts, {}, args.dtypes)]
    if tuned:
        labelled.append(("tuned", ts, tuned, [args.sweep_dtype]))
    if baseline is not None:
        labelled.append(("baseline", baseline, {}, args.dtypes))
    for label, module, overrides, dtypes in labelled:
        _use_blocks(overrides)
        for dtype_name in dtypes:
            checks[f"{label}/{dtype_name}"] = _errors(module, args, getattr(torch, dtype_name))
    _use_blocks({})
    report["errors_vs_float64"] = checks
    _save(report, args.json)
    print(
        f"errors vs float64 dense at N={args.check_n}:",
        {k: f"{v:.1e}" for k, v in checks.items()},
        flush=True,
    )

    # 5. The tuned configurations in the table (the sweep's dtype).
    if tuned:
        _table_rows([("tuned", _sinkhorn(ts, args.n_iter), tuned)], shapes, args, table,
                    report, [args.sweep_dtype])  # fmt: skip
    _save(report, args.json)
    print(f"done in {time.perf_counter() - started:.0f} s")
    _print_table(table, args.n_iter)


if __name__ == "__main__":
    main()
