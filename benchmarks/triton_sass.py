"""Static cost of the Triton kernels, no GPU needed: sm_90 instructions per logit.

Compiles each kernel variant of ``pointsink/triton_sinkhorn.py`` (and, with ``--baseline``,
of another copy of that file, e.g. an earlier commit's) for sm_90 with Triton's bundled
``ptxas``, disassembles the cubin with the bundled ``cuobjdump`` and counts the machine
instructions of the kernel's main loop (the widest backward branch) by kind:

* ``MUFU``: special-function unit (here ``MUFU.EX2``, one per exponential);
* ``FP32``: ``FFMA``, ``FMUL``, ``FADD``, ``FSEL``, ``FMNMX``, ``FSETP``;
* ``MMA``: ``HGMMA``/``HMMA`` and their warpgroup bookkeeping;
* ``MEM``: global/shared/local loads and stores, shuffles, barriers;
* ``OTHER``: integer, address, predicate and conversion instructions.

Each count is divided by the logits one thread handles per loop iteration,
``BLOCK_M * BLOCK_N / (32 * num_warps)``. Issue slots are shared by all kinds (4 warp
instructions per clock per multiprocessor on Hopper), so where the exponentials and their
arithmetic, not the matrix products, bound a kernel, fewer instructions per logit should
mean less time. That is a prediction: only ``benchmarks/triton_tuning.py`` on a GPU
measures time. The pointer arguments are taken 16-byte aligned and ``n``, ``m`` multiples
of 16, as Triton's launcher specializes them for the benchmark shapes.

Example::

    python benchmarks/triton_sass.py --baseline /tmp/old_triton_sinkhorn.py
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
from types import ModuleType

import triton

# (kernel function, launch-configuration key, constexpr flags): one odd-n_iter step each.
VARIANTS = [
    ("_row_lse_kernel", "row", {"HAS_OUT": False}),
    ("_row_lse_kernel", "row", {"HAS_OUT": True}),
    ("_col_lse_kernel", "col", {}),
    ("_bwd_col_kernel", "bwd_col", {"HAS_DV": True, "HAS_GROW": True}),
    ("_bwd_col_kernel", "bwd_col", {"HAS_DV": False, "HAS_GROW": True}),
    ("_bwd_row_kernel", "bwd_row", {"HAS_INIT": False}),
    ("_bwd_dq_kernel", "dq", {"ODD": True, "FACTORED": True, "N_TERMS": 5}),
    ("_bwd_dkdv_kernel", "dkdv", {"HAS_DV": False, "ODD": True, "FACTORED": True, "N_TERMS": 5}),
]
INTS = {"n", "m", "n_blocks", "n_u", "n_v", "stride_u", "stride_v"}
FLOATS = {"scale", "log_col_mass", "col_factor"}
FLOAT32_POINTERS = {"VPREV", "U_OUT", "UPREV", "V_OUT", "U", "VC", "ROWP", "COLP", "GROW",
                    "COL_OUT", "GCOL", "ROW_INIT", "ROW_OUT", "US", "VS", "GU", "GV",
                    "ROWF", "COLF"}  # fmt: skip
KINDS = {
    "MUFU": ("MUFU",),
    "FP32": ("FFMA", "FMUL", "FADD", "FSEL", "FMNMX", "FSETP"),
    "MMA": ("HGMMA", "HMMA", "WARPGROUP"),
    "MEM": ("LDG", "LDGSTS", "LDS", "LDSM", "STS", "STG", "LDL", "STL", "SHFL", "BAR",
            "LDGDEPBAR", "DEPBAR", "SYNCS", "UTMALDG", "MEMBAR", "FENCE"),
}  # fmt: skip
_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)([^;]*);")


def load_module(path: str, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def launch_configs(
    module: ModuleType, head_dim: int, itemsize: int
) -> dict[str, tuple[int, int, int, int]]:
    """``{kernel key: (BLOCK_M, BLOCK_N, num_warps, num_stages)}`` of a module's defaults.

    Earlier versions had defaults by head dimension alone, and one
    ``(BLOCK_M, BLOCK_N, num_warps)`` for the forward kernels and one for the backward
    kernels, with Triton's default of 3 stages.
    """
    try:
        blocks = module._blocks_for(head_dim, itemsize)
    except TypeError:
        blocks = module._blocks_for(head_dim)
    if isinstance(blocks, dict):
        return blocks
    fwd, bwd = blocks
    return {key: (*(fwd if key in ("row", "col") else bwd), 3)
            for key in ("row", "col", "bwd_col", "bwd_row", "dq", "dkdv")}  # fmt: skip


def signature_for(kernel: triton.JITFunction, consts: dict, dtype: str) -> dict[str, str]:
    """Argument types of a Sinkhorn-attention kernel: q, k, v and their gradients in ``dtype``
    (``bf16``, ``fp16``, ``fp32``), potentials and factors in float32, sizes ``i32``."""
    return {
        a: "constexpr" if a in consts else "i32" if a in INTS else "fp32" if a in FLOATS
        else "*fp32" if a in FLOAT32_POINTERS else "*" + dtype
        for a in kernel.arg_names
    }  # fmt: skip


def compile_sm90(
    kernel: triton.JITFunction,
    signature: dict[str, str],
    consts: dict,
    options: dict,
    attrs: dict | None = None,
    disassemble: bool = True,
) -> tuple[object, str, int]:
    """Compiles one kernel for sm_90 with Triton's bundled ``ptxas``: no GPU needed.

    Returns:
        The compiled kernel (``.asm["cubin"]``, ``.metadata.shared``), its SASS from the
        bundled ``cuobjdump`` and its registers per thread (-1 if not reported); without
        ``disassemble``, ``""`` and -1.
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    binary = triton.compile(
        ASTSource(kernel, signature, consts, attrs or {}),
        target=GPUTarget("cuda", 90, 32),
        options=options,
    )
    if not disassemble:
        return binary, "", -1
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(binary.asm["cubin"])
        cubin.flush()
        sass, usage = (
            subprocess.run(
                [cuobjdump, flag, cubin.name], capture_output=True, text=True, check=True
            ).stdout
            for flag in ("-sass", "-res-usage")
        )
    registers = re.search(r"REG:(\d+)", usage)
    return binary, sass, int(registers.group(1)) if registers else -1


def spill_stores(sass: str) -> int:
    """Local-memory stores (``STL``) in a kernel's SASS: register spills."""
    return sum(op == "STL" for _, op, _ in _LINE.findall(sass))


def compile_sass(
    module: ModuleType,
    name: str,
    flags: dict,
    config: tuple,
    dtype: str,
    precision: str = "ieee",
) -> tuple[str, int]:
    """The SASS of one kernel variant compiled for sm_90, and its registers per thread."""
    kernel = getattr(module, name)
    block_m, block_n, num_warps, num_stages = config
    consts = {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_D": 64, "BLOCK_E": 64, "D": 64,
              "E": 64, "PRECISION": precision, "UPCAST": False, **flags}  # fmt: skip
    consts = {k: v for k, v in consts.items() if k in kernel.arg_names}
    signature = signature_for(kernel, consts, dtype)
    aligned = {
        (i,): [["tt.divisibility", 16]]
        for i, a in enumerate(kernel.arg_names)
        if a not in consts and (signature[a].startswith("*") or a in ("n", "m"))
    }
    _, sass, registers = compile_sm90(
        kernel,
        signature,
        consts,
        {"num_warps": num_warps, "num_stages": num_stages, "enable_fp_fusion": True},
        aligned,
    )
    return sass, registers


def loop_counts(sass: str) -> tuple[collections.Counter, int]:
    """Opcode counts inside the widest backward branch, and local stores (spills) overall."""
    code = [(int(a, 16), op, rest) for a, op, rest in _LINE.findall(sass)]
    loops = []
    for address, op, rest in code:
        target = re.search(r"0x([0-9a-f]+)", rest) if op == "BRA" else None
        if target and int(target.group(1), 16) < address:
            loops.append((int(target.group(1), 16), address))
    start, end = max(loops, key=lambda span: span[1] - span[0]) if loops else (0, 1 << 62)
    counts = collections.Counter(op for address, op, _ in code if start <= address <= end)
    return counts, spill_stores(sass)


def by_kind(counts: collections.Counter) -> dict[str, int]:
    kinds = {kind: sum(counts[op] for op in ops) for kind, ops in KINDS.items()}
    kinds["OTHER"] = sum(counts.values()) - sum(kinds.values())
    kinds["ALL"] = sum(counts.values())
    return kinds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", help="another triton_sinkhorn.py to count beside")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument(
        "--precision",
        default="tf32x3",
        choices=["ieee", "tf32", "tf32x3"],
        help="tl.dot input_precision of float32 inputs (others ignore it; default tf32x3, "
        "what the kernels use on sm_80 and newer unless TF32 is allowed)",
    )
    parser.add_argument(
        "--config",
        help="'BLOCK_M,BLOCK_N,num_warps,num_stages' for every kernel (default: each "
        "module's defaults at head dim 64)",
    )
    args = parser.parse_args(argv)
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "pointsink")
    modules = [("this", load_module(os.path.join(here, "triton_sinkhorn.py"), "this_ts"))]
    if args.baseline:
        modules.insert(0, ("baseline", load_module(args.baseline, "baseline_ts")))
    print(f"triton {triton.__version__}, sm_90, {args.dtype} ({args.precision}), head dim 64; "
          "loop instructions "
          "per logit (per thread and iteration)", file=sys.stderr)  # fmt: skip
    print("| kernel | flags | version | BLOCK_M, BLOCK_N, warps, stages | MUFU | FP32 | MMA "
          "| MEM | OTHER | all | registers | spill stores |")  # fmt: skip
    print("|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, key, flags in VARIANTS:
        for label, module in modules:
            itemsize = 4 if args.dtype == "fp32" else 2
            config = (tuple(int(x) for x in args.config.split(",")) if args.config
                      else launch_configs(module, 64, itemsize)[key])  # fmt: skip
            sass, registers = compile_sass(module, name, flags, config, args.dtype, args.precision)
            counts, spills = loop_counts(sass)
            per_thread = config[0] * config[1] / (32 * config[2])
            kinds = {k: v / per_thread for k, v in by_kind(counts).items()}
            flag_text = ", ".join(f"{k}={v}" for k, v in flags.items()) or "-"
            print(f"| {name.strip('_')} | {flag_text} | {label} | "
                  f"{', '.join(map(str, config))} | "
                  + " | ".join(f"{kinds[k]:.1f}" for k in ("MUFU", "FP32", "MMA", "MEM",
                                                          "OTHER", "ALL"))
                  + f" | {registers} | {spills} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
