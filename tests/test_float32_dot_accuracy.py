"""benchmarks/float32_dot_accuracy.py: its TF32 emulation, on which the kernels' float32
precision choice rests (pointsink.triton_sinkhorn._float32_precision)."""

from __future__ import annotations

import pytest
import torch
from _benchmark_utils import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("float32_dot_accuracy")


def test_tf32_rounding_keeps_ten_mantissa_bits_ties_away(bench) -> None:
    ulp = 2.0**-10  # TF32's spacing at 1
    x = torch.tensor([1 + ulp / 4, 1 + ulp / 2, 1 + 3 * ulp / 4, -(1 + ulp / 2), 3.0])
    want = torch.tensor([1.0, 1 + ulp, 1 + ulp, -(1 + ulp), 3.0])
    assert torch.equal(bench.round_to_tf32(x), want)


def test_three_tf32_products_are_about_float32_accurate(bench) -> None:
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, 256, generator=gen), torch.randn(256, 64, generator=gen)
    exact = a.double() @ b.double()

    def error(product: torch.Tensor) -> float:
        return ((product.double() - exact).abs().max() / exact.abs().max()).item()

    assert error(bench.tf32x3_matmul(a, b)) < 1e-6
    assert error(bench.tf32_matmul(a, b)) > 1e-4  # one TF32 product is far coarser


def test_script_prints_one_row_per_shape_and_n_iter(
    bench, capsys: pytest.CaptureFixture[str]
) -> None:
    bench.main(["--shapes", "12,5,2,8", "--n-iter", "1", "3"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 12x5")]
    assert len(rows) == 2
