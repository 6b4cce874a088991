"""examples/fv_rope.py, except that importing it hangs in every rank (test asset).

The launcher (no RANK) imports it fine. Each rank records its pid in ``$FV_HANG_PID_DIR`` and
sleeps, so only a wall-clock timeout ends the job; the test then checks those pids are gone."""

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
from fv_rope import CACHE, rope  # noqa: E402, F401

if "RANK" in os.environ and os.environ.get("FV_HANG_PID_DIR"):
    Path(os.environ["FV_HANG_PID_DIR"], f"rank{os.environ['RANK']}.pid").write_text(str(os.getpid()))
    time.sleep(3600)
