"""Helpers of the tests that run Triton kernels in a subprocess (interpreter or compiler)."""

from __future__ import annotations

import functools
import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

HAS_TRITON = importlib.util.find_spec("triton") is not None
#: benchmarks/, whose triton_sass.py compiles kernels for sm_90 (scripts put it on sys.path).
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def run_python(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Runs ``code`` in a fresh interpreter (Triton reads TRITON_INTERPRET at import)."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        # A guard against hangs, not a speed check: alone on 2 cores the slowest case (the
        # sm_90 compile, empty Triton cache) takes about 50 s; one passed 300 s beside a
        # training run.
        timeout=900,
        env={**os.environ, **(env or {})},
        check=False,
    )


def bundled_ptxas() -> bool:
    """Whether triton is installed with the ptxas it ships (compiles for sm_90 without a GPU)."""
    spec = importlib.util.find_spec("triton") if HAS_TRITON else None
    if spec is None or spec.origin is None:
        return False
    return os.path.exists(
        os.path.join(os.path.dirname(spec.origin), "backends", "nvidia", "bin", "ptxas")
    )


_INTERPRETER_PROBE = """
import torch
import triton
import triton.language as tl

@triton.jit
def _probe(X, n):
    acc = tl.zeros([16], tl.float32)
    for _ in range(n):  # a loop bound given at run time, as every kernel here has
        acc += 1.0
    tl.store(X + tl.arange(0, 16), acc)

x = torch.zeros(16)
_probe[(1,)](x, 3)
assert bool((x == 3).all()), x
"""


@functools.cache
def interpreter_problem() -> str | None:
    """Why Triton's CPU interpreter cannot run this project's kernels here, or None.

    Triton 3.6 and earlier convert scalar arguments with ``int()`` on a one-element array,
    which NumPy 2.4 and later refuse (triton-lang/triton#9171, fixed by #9172): every
    kernel with a loop bound given at run time then fails under the interpreter, whatever
    its code. One probe kernel, run once per test session, tells.
    """
    if not HAS_TRITON:
        return "triton is not installed"
    result = run_python(_INTERPRETER_PROBE, env={"TRITON_INTERPRET": "1"})
    if result.returncode != 0 and "only 0-dimensional arrays" in result.stderr:
        import numpy
        import triton

        return (
            f"triton {triton.__version__}'s interpreter fails under numpy {numpy.__version__} "
            "(triton-lang/triton#9171); the compiled kernels are unaffected"
        )
    return None  # any other failure: let the tests report it themselves
