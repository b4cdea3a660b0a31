"""Helpers of the tests that run Triton kernels in a subprocess (interpreter or compiler)."""

from __future__ import annotations

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
