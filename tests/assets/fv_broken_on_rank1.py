"""examples/fv_rope.py, except that importing it fails on rank 1 (test asset).

The launcher and rank 0 import it fine; rank 1 raises, as a missing driver would."""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
from fv_rope import CACHE, rope  # noqa: E402, F401

if os.environ.get("RANK") == "1":
    raise RuntimeError("fv_broken_on_rank1: injected import failure on rank 1")
