"""Where the tests find real ModelNet10, for the few that need it (they skip without it).

``$POINTSINK_MODELNET10`` if set, else ``../shared/data/ModelNet10`` beside the checkout
(this project's machines).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODELNET10_DIR = Path(
    os.environ.get("POINTSINK_MODELNET10", REPO.parent / "shared" / "data" / "ModelNet10")
)
requires_modelnet10 = pytest.mark.skipif(
    not MODELNET10_DIR.is_dir(),
    reason=f"real ModelNet10 not found at {MODELNET10_DIR} (set POINTSINK_MODELNET10)",
)
