"""The GPU scripts, run where no GPU is: benchmarks/triton_tuning.py and gpu_checks.sh.

Both run only on the occasional machine with a GPU, where device time is short; these
checks keep them from breaking unnoticed in between. ``triton_tuning.py`` runs every step
under Triton's CPU interpreter at tiny sizes; ``gpu_checks.sh`` runs its control flow with a
stand-in interpreter that records what it was asked to run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _triton_utils import HAS_TRITON

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_tuning_runs_every_step_under_the_interpreter(
    tmp_path: Path, triton_interpreter: None
) -> None:
    report_path = tmp_path / "tuning.json"
    result = subprocess.run(
        [sys.executable, "benchmarks/triton_tuning.py", "--device", "cpu", "--sweep-n", "32",
         "--check-n", "16", "--check-shapes", "20,16,2,16", "16,20,2,16", "--batch", "1",
         "--heads", "2", "--dim", "16", "--sizes", "32", "--shapes", "32,16,2,16",
         "--dtypes", "float32", "--sweep-dtype", "float32", "--repeats", "1",
         "--sweep-repeats", "1", "--workers", "1",
         "--kernels", "row", "--candidates", "2", "--baseline", "pointsink/triton_sinkhorn.py",
         "--json", str(report_path)],
        cwd=REPO, capture_output=True, text=True, timeout=900, check=False,
        env={**os.environ, "TRITON_INTERPRET": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(report_path.read_text())
    assert report["compile_errors"] == {}
    timed = {(row["impl"], row["N"]) for row in report["table"] if "ms" in row}
    for shape in ("32x32x2x16", "32x16x2x16"):
        assert {("sdpa", shape), ("baseline", shape), ("default", shape)} <= timed
    # The row kernel's default and the first two candidates, all timed.
    assert len(report["sweep"]["row"]) == 3
    assert all(ms is not None for _, ms, _ in report["sweep"]["row"])
    assert report["errors_vs_float64"]["default/float32"] < 1e-5
    assert report["errors_vs_float64"]["baseline/float32"] < 1e-5
    assert "| sdpa | float32 | 32x32x2x16 |" in result.stdout


_STAND_IN_PYTHON = """#!/usr/bin/env bash
echo "$*" >>"$CALLS"
case "$*" in
  *"--phase time"*) echo "best: {}"; echo "| sdpa | bfloat16 | 1024x1024x32x64 | 1.00 |" ;;
  *"train.py fit"*) root=${@: -1}; mkdir -p "$root/lightning_logs/version_0/checkpoints"
                    touch "$root/lightning_logs/version_0/checkpoints/best.ckpt" ;;
  *"train.py test"*) echo "        test/oa            0.5" ;;
  *pytest*) echo "1 passed" ;;
  *"import xdist"*) exit "${NO_XDIST:-0}" ;;
esac
exit 0
"""


def _gpu_checks(tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess, list, Path]:
    """Runs gpu_checks.sh with the stand-in interpreter: (result, its calls, OUT)."""
    python = tmp_path / "python"
    python.write_text(_STAND_IN_PYTHON)
    python.chmod(0o755)
    calls, out = tmp_path / "calls.txt", tmp_path / "out"
    result = subprocess.run(
        ["bash", "benchmarks/gpu_checks.sh"],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, "PYTHON": str(python), "OUT": str(out), "CALLS": str(calls),
             "BUDGET": "200", **env},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result, calls.read_text().splitlines(), out


def _first(calls: list[str], text: str) -> int:
    return next(i for i, call in enumerate(calls) if text in call)


def test_gpu_checks_runs_its_steps_in_order_and_returns_at_most_eight_files(
    tmp_path: Path,
) -> None:
    data = tmp_path / "ModelNet10"
    data.mkdir()
    result, calls, out = _gpu_checks(
        tmp_path, BASELINE="base.py", DATA=str(data), TUNING_ARGS="--sweep-dtype float32"
    )
    compile_call, time_call = _first(calls, "--phase compile"), _first(calls, "--phase time")
    assert compile_call < time_call and "--baseline base.py" in calls[time_call]
    assert all("--sweep-dtype float32" in calls[i] for i in (compile_call, time_call))
    assert sum("train.py fit" in c for c in calls) == sum("train.py test" in c for c in calls) == 2
    step_call, recipe_call = _first(calls, "train_step.py"), _first(calls, "reproduce.py")
    assert time_call < step_call < recipe_call and "--device cuda" in calls[step_call]
    assert f"--data-root {data}" in calls[recipe_call]
    # The device tool brings back at most 8 files from $OUT.
    assert len(list(out.iterdir())) <= 8
    assert "| sdpa | bfloat16 |" in result.stdout and "== total" in result.stdout


def test_gpu_checks_runs_only_the_steps_asked_for(tmp_path: Path) -> None:
    _, calls, out = _gpu_checks(tmp_path, STEPS="tests step")
    # The CUDA check, the versions, the CUDA tests, the training step.
    assert len(calls) == 4
    assert "-k cuda" in calls[2] and "train_step.py" in calls[3]
    assert sorted(p.name for p in out.iterdir()) == ["device.txt", "tests.log", "train.log"]


@pytest.mark.parametrize("xdist", [True, False])
def test_gpu_checks_suite_runs_without_pytest_xdist(tmp_path: Path, xdist: bool) -> None:
    # Installed without the test extra, pytest-xdist may be missing: the suite still runs.
    _, calls, _ = _gpu_checks(tmp_path, STEPS="suite", NO_XDIST="0" if xdist else "1")
    suite = calls[_first(calls, "pytest")]
    assert "tests -k not cuda" in suite and ("-n 4" in suite) == xdist


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is visible")
def test_gpu_checks_stops_at_once_without_a_gpu(tmp_path: Path) -> None:
    result = subprocess.run(
        ["bash", "benchmarks/gpu_checks.sh"],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "out")},
    )  # fmt: skip
    assert result.returncode == 2
    assert "no CUDA GPU is visible" in result.stderr


def test_gpu_checks_ncu_step_profiles_both_dtypes(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    ncu = bin_dir / "ncu"
    ncu.write_text('#!/usr/bin/env bash\necho "ncu $*" >>"$CALLS"\n')
    ncu.chmod(0o755)
    _, calls, out = _gpu_checks(tmp_path, STEPS="ncu", PATH=f"{bin_dir}:{os.environ['PATH']}")
    profiled = [c for c in calls if c.startswith("ncu ")]
    assert len(profiled) == 2
    for call, dtype in zip(profiled, ("bfloat16", "float32"), strict=True):
        assert "--profile-from-start off" in call and "--clock-control none" in call
        assert call.endswith(f"benchmarks/ncu_attention.py --n 4096 --dtype {dtype}")
    assert sorted(p.name for p in out.iterdir()) == ["device.txt", "ncu.txt"]


def test_ncu_workload_needs_a_gpu(capsys: pytest.CaptureFixture[str]) -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible")
    from _benchmark_utils import load_benchmark

    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        load_benchmark("ncu_attention").main(["--n", "64"])


def test_attention_benchmark_fails_when_a_measurement_fails(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # A CPU worker that raises (here: an invalid chunk size) is a table row and a non-zero
    # exit, not a quiet "error" cell; the other rows are still measured.
    from _benchmark_utils import load_benchmark

    attention = load_benchmark("attention")
    arguments = ["--device", "cpu", "--sizes", "16", "--impls", "sdpa", "chunked",
                 "--chunk-size", "-3", "--repeats", "1", "--dim", "8", "--heads", "1"]  # fmt: skip
    with pytest.raises(SystemExit, match="measurements failed: chunked at N = 16"):
        attention.main(arguments)
    sdpa_row = [line for line in capsys.readouterr().out.splitlines() if "sdpa" in line]
    assert sdpa_row and "error" not in sdpa_row[0].lower()


def test_attention_benchmark_passes_padding_masks(capsys: pytest.CaptureFixture[str]) -> None:
    from _benchmark_utils import load_benchmark

    attention = load_benchmark("attention")
    q, k, v = (torch.randn(2, 1, 8, 4) for _ in range(3))
    mask = (torch.arange(8) < 6).expand(2, 1, 8)
    outputs = {
        impl: attention.attention_fn(impl, 3, None, mask)(q, k, v)
        for impl in ("sdpa", "dense", "chunked")
    }
    torch.testing.assert_close(outputs["chunked"], outputs["dense"])
    assert outputs["chunked"][:, :, 6:].abs().sum() == 0  # padded queries
    # The padded keys are out of every implementation: changing them changes nothing.
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 6:], v2[:, :, 6:] = 100.0, 100.0
    for impl, out in outputs.items():
        again = attention.attention_fn(impl, 3, None, mask)(q, k2, v2)
        torch.testing.assert_close(again[:, :, :6], out[:, :, :6])
    capsys.readouterr()
    with pytest.raises(SystemExit):
        attention.parse_args(["--padded-fraction", "1.0"])
    assert "--padded-fraction must be in [0, 1); got 1.0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        attention.parse_args(["--repeats", "0"])
    assert "--repeats must be at least 1; got 0" in capsys.readouterr().err
