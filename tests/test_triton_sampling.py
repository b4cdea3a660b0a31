"""Tests of farthest-point sampling in one Triton launch (pointsink.triton_sampling).

Its picks are compared with the PyTorch loop of
:func:`pointsink.embedding.farthest_point_sampling`, itself tested against the greedy
definition: under Triton's CPU interpreter and compiled for sm_90 (each in a subprocess,
skipped without triton; no GPU needed), and compiled on a CUDA GPU where there is one.
"""

from __future__ import annotations

import importlib
import json

import pytest
import torch
from _triton_utils import BENCHMARKS, HAS_TRITON, bundled_ptxas, run_python

from pointsink.embedding import farthest_point_sampling

sinkhorn_attention_module = importlib.import_module("pointsink.sinkhorn_attention")

_COMPARE_SCRIPT = """
import json
import torch
import pointsink.embedding as embedding
from pointsink.triton_sampling import triton_farthest_point_sampling

DEVICE = "__DEVICE__"
gen = torch.Generator().manual_seed(0)
cases = [(1, 1, 3, 1), (1, 5, 3, 5), (3, 40, 3, 12), (2, 1000, 3, 64), (2, 33, 2, 33),
         (2, 17, 6, 9)]
rows = []
for batch, n, dim, m in cases:
    points = torch.randn(batch, n, dim, generator=gen)
    want = embedding.farthest_point_sampling(points, m, backend="loop")
    got = triton_farthest_point_sampling(points.to(DEVICE), m).cpu()
    rows.append([batch, n, dim, m, got.dtype == torch.long, torch.equal(got, want)])
# Exact ties: every point twice. After the 20 distinct points, all remaining distances are
# 0 and the start is repeated, as in the PyTorch loop.
points = torch.randn(1, 20, 3, generator=gen).repeat(1, 2, 1)
want = embedding.farthest_point_sampling(points, 40, backend="loop")
got = triton_farthest_point_sampling(points.to(DEVICE), 40).cpu()
rows.append([1, 40, 3, 40, got.dtype == torch.long, torch.equal(got, want)])
# Sets of 2,048 points in the recipe's dtype and layout (float32 coordinates).
points = torch.nn.functional.normalize(torch.randn(4, 2048, 3, generator=gen), dim=-1)
want = embedding.farthest_point_sampling(points, 256, backend="loop")
got = triton_farthest_point_sampling(points.to(DEVICE), 256).cpu()
rows.append([4, 2048, 3, 256, got.dtype == torch.long, torch.equal(got, want)])
if DEVICE == "cuda":  # "auto" takes the kernel on CUDA
    got = embedding.farthest_point_sampling(points.to(DEVICE), 256).cpu()
    rows.append([4, 2048, 3, 256, got.dtype == torch.long, torch.equal(got, want)])
# Padded sets: real points scattered among NaN padding, sets smaller than M, M > N, and a set
# without real points (its picks are index 0, as in the loop).
for batch, n, m, counts in [(3, 40, 12, [40, 20, 5]), (2, 30, 50, [30, 0]), (1, 9, 4, [9])]:
    mask = torch.zeros(batch, n, dtype=torch.bool)
    for row, count in enumerate(counts):
        mask[row, torch.randperm(n, generator=gen)[:count]] = True
    points = torch.randn(batch, n, 3, generator=gen).masked_fill(~mask[..., None], float("nan"))
    want = embedding.farthest_point_sampling(points, m, backend="loop", mask=mask)
    got = triton_farthest_point_sampling(points.to(DEVICE), m, mask.to(DEVICE)).cpu()
    rows.append([batch, n, 3, m, got.dtype == torch.long, torch.equal(got, want)])
    if DEVICE == "cuda":  # "auto" takes the kernel with a mask too
        got = embedding.farthest_point_sampling(points.to(DEVICE), m, mask=mask.to(DEVICE))
        rows.append([batch, n, 3, m, got.dtype == torch.long, torch.equal(got.cpu(), want)])
# torch.func.vmap through the kernel (per-sample masks): the vmap rule makes one call.
from torch.func import vmap
points = torch.randn(3, 2, 30, 3, generator=gen)
mask = torch.rand(3, 2, 30, generator=gen) > 0.4
mask[..., 0] = True
got = vmap(lambda p, k: embedding.farthest_point_sampling(p, 8, backend="triton", mask=k))(
    points.to(DEVICE), mask.to(DEVICE)).cpu()
want = torch.stack([embedding.farthest_point_sampling(points[s], 8, backend="loop", mask=mask[s])
                    for s in range(3)])
rows.append([6, 30, 3, 8, got.dtype == torch.long, torch.equal(got, want)])
print(json.dumps(rows))
"""


def _compare(device: str, env: dict[str, str]) -> list[list]:
    result = run_python(_COMPARE_SCRIPT.replace("__DEVICE__", device), env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(result.stdout.strip().splitlines()[-1])
    mismatches = [row for row in rows if not all(row[4:])]
    assert not mismatches, mismatches
    return rows


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_farthest_point_sampling_matches_the_pytorch_loop_in_the_interpreter(
    triton_interpreter: None,
) -> None:
    assert len(_compare("cpu", {"TRITON_INTERPRET": "1"})) == 12


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_triton_farthest_point_sampling_on_cuda() -> None:
    assert len(_compare("cuda", {"TRITON_INTERPRET": "0"})) == 16


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_farthest_point_sampling_rejects_what_it_cannot_hold() -> None:
    result = run_python(
        """
        import torch
        from pointsink.triton_sampling import MAX_POINTS, triton_farthest_point_sampling
        for shape, m in (((1, 5, 3), 6), ((1, 5, 3), 0), ((1, MAX_POINTS + 1, 3), 4),
                         ((1, 5, 17), 2)):
            try:
                triton_farthest_point_sampling(torch.zeros(shape), m)
            except ValueError as error:
                assert "triton_farthest_point_sampling takes" in str(error), error
            else:
                raise AssertionError(f"no error for {shape}, {m}")
        for mask in (torch.ones(1, 5), torch.ones(1, 4, dtype=torch.bool)):
            try:
                triton_farthest_point_sampling(torch.zeros(1, 5, 3), 2, mask)
            except (TypeError, ValueError) as error:
                assert str(error).startswith("mask must"), error
            else:
                raise AssertionError(f"no error for a mask {mask.dtype} {tuple(mask.shape)}")
        """,
        env={"TRITON_INTERPRET": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]


def test_farthest_point_sampling_backends_and_bad_backend(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    points = torch.randn(1, 8, 3)
    with pytest.raises(ValueError, match="unknown backend"):
        farthest_point_sampling(points, 2, backend="cuda")  # type: ignore[arg-type]
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if HAS_TRITON:
        with pytest.raises(RuntimeError, match=r"needs CUDA tensors.*backend='loop'"):
            farthest_point_sampling(points, 2, backend="triton")
    monkeypatch.setattr(sinkhorn_attention_module, "triton_available", lambda: False)
    with pytest.raises(RuntimeError, match="needs the triton package"):
        farthest_point_sampling(points, 2, backend="triton")
    # "auto" falls back to the loop without Triton.
    assert farthest_point_sampling(points, 2).shape == (1, 2)


def test_farthest_point_sampling_on_cpu_does_not_need_triton() -> None:
    # The PyTorch loop serves CPU tensors whether or not Triton is installed.
    result = run_python(
        """
        import sys
        sys.modules["triton"] = None
        import torch
        from pointsink.embedding import farthest_point_sampling
        print(farthest_point_sampling(torch.randn(2, 30, 3), 7).shape)
        """
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "torch.Size([2, 7])"


_COMPILE_SCRIPT = """
import json
import sys
import triton
from pointsink import triton_sampling
sys.path.insert(0, "__BENCHMARKS__")
try:  # Triton-internal API (as of triton 3.9), which triton_sass.compile_sm90 uses
    from triton.backends.compiler import GPUTarget  # noqa: F401
    from triton.compiler import ASTSource  # noqa: F401
except ImportError as error:
    print("SKIP", "triton", triton.__version__, error)
    sys.exit(0)
from triton_sass import compile_sm90, spill_stores

kernel = triton_sampling._farthest_point_sampling_kernel
signature = {"POINTS": "*fp32", "REAL": "*u8", "CHOSEN": "*i64", "n": "i32",
             "num_samples": "i32", "D": "constexpr", "BLOCK_N": "constexpr",
             "BLOCK_D": "constexpr", "HAS_MASK": "constexpr"}
rows = []
for has_mask in (False, True):
    for block_n in (1024, triton_sampling.MAX_POINTS):  # the recipe's, the largest taken
        consts = {"D": 3, "BLOCK_N": block_n, "BLOCK_D": 4, "HAS_MASK": has_mask}
        options = {"num_warps": min(16, block_n // 256), "enable_fp_fusion": False}
        _, sass, registers = compile_sm90(kernel, signature, consts, options)
        rows.append([block_n, registers, spill_stores(sass)])
print(json.dumps(rows))
"""


@pytest.mark.skipif(not bundled_ptxas(), reason="triton with its bundled ptxas is not installed")
def test_triton_farthest_point_sampling_compiles_for_sm90_without_spills() -> None:
    # The interpreter accepts code the compiler rejects, and registers are what holds the
    # set: compile for H100 (no GPU needed) and count local-memory stores (spills).
    script = _COMPILE_SCRIPT.replace("__BENCHMARKS__", str(BENCHMARKS))
    result = run_python(script, env={"TRITON_INTERPRET": "0"})
    assert result.returncode == 0, result.stderr[-3000:]
    if result.stdout.startswith("SKIP"):
        pytest.skip(f"this triton's compiler API differs: {result.stdout.strip()}")
    rows = json.loads(result.stdout.strip().splitlines()[-1])
    assert [row[0] for row in rows] == [1024, 4096] * 2  # without and with a mask
    for block_n, registers, spill_stores in rows:
        assert 0 < registers <= 255 and spill_stores == 0, (block_n, registers, spill_stores)
