"""Self-launch: ``python -m sp_rope.check --nproc N`` starts its own ranks.

It uses torch's elastic launcher exactly as ``torchrun --standalone`` does (c10d rendezvous on
a free localhost port), runs ``python -m sp_rope.check`` in each worker, and turns a worker
failure into exit code 3 with the failing rank, its exit code and its error named.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .check import Settings

EXIT_INFRA = 3


def self_launch(settings: Settings, nproc: int) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    # The agent logs every worker start and stop at WARNING; keep the user's terminal to the verdict.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=f"sp_rope-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=0,
        monitor_interval=0.1,
        rdzv_configs={"timeout": int(max(60, settings.timeout))},
    )
    # As torchrun does: one intra-op thread per rank. Without it, N ranks x all cores of threads
    # oversubscribe the machine and the default check runs ~3x slower on 2 cores.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    argv = ["-m", "sp_rope.check", *settings.argv]
    with tempfile.TemporaryDirectory(prefix="sp_rope-") as tmp:
        verdict = Path(tmp) / "verdict"
        os.environ["SP_ROPE_VERDICT_FILE"] = str(verdict)
        try:
            elastic_launch(config, entrypoint=sys.executable)(*argv)
        except ChildFailedError as err:
            return _report_failure(err)
        finally:
            del os.environ["SP_ROPE_VERDICT_FILE"]
        if not verdict.exists():
            print(
                "sp_rope.check: infrastructure failure (exit 3): rank 0 finished without a verdict",
                file=sys.stderr,
                flush=True,
            )
            return EXIT_INFRA
        return int(verdict.read_text())


def _report_failure(err: object) -> int:
    failures = getattr(err, "failures", {})
    codes = {rank: f.exitcode for rank, f in failures.items()}
    first_rank, first = min(failures.items(), key=lambda kv: (kv[1].timestamp, kv[0]))
    # Report the failure that names the missing ranks (rank 0 runs the barrier and knows), else
    # the earliest one that left a message (ranks stopped by the agent leave none).
    described = sorted(
        ((r, f) for r, f in failures.items() if _message(f)),
        key=lambda kv: ("rank(s) " not in _message(kv[1]), kv[1].timestamp),
    )
    rank, failure = described[0] if described else (first_rank, first)
    print(
        f"sp_rope.check: infrastructure failure (exit 3): rank {rank} exited with code {failure.exitcode}"
        f"{': ' + _message(failure) if _message(failure) else ''}; ranks that failed: {sorted(codes)}",
        file=sys.stderr,
        flush=True,
    )
    return EXIT_INFRA


def _message(failure: object) -> str:
    message = getattr(failure, "message", "")
    if isinstance(message, dict):
        message = message.get("message", "")
    text = str(message or "").strip()
    return "" if text.startswith("To enable traceback") else text.splitlines()[0] if text else ""
