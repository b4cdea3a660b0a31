"""The README's Python examples run as written (those that need no trained checkpoint)."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.M | re.S)
# Examples that load a checkpoint trained by an earlier README command.
NEEDS_A_RUN = "checkpoints/"


def test_the_readme_has_self_contained_examples() -> None:
    assert sum(NEEDS_A_RUN not in block for block in BLOCKS) >= 2


@pytest.mark.parametrize(
    "block", [b for b in BLOCKS if NEEDS_A_RUN not in b], ids=lambda b: b.splitlines()[-1][:40]
)
def test_readme_example_runs(block: str) -> None:
    torch.manual_seed(0)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(block, str(README), "exec"), {"__name__": "__readme__"})
    # A printed shape must be the one its comment states, e.g. `# (8, 10, 256): ...`.
    for line in block.splitlines():
        stated = re.search(r"print\(.*\.shape\)\s+#\s*(\([\d, ]+\))", line)
        if stated:
            assert f"torch.Size([{stated.group(1)[1:-1]}])" in printed.getvalue()
