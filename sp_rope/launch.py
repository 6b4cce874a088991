"""Self-launch: ``python -m sp_rope.check --nproc N`` starts its own ranks.

It uses torch's elastic launcher exactly as ``torchrun --standalone`` does (c10d rendezvous on
a free localhost port), runs ``python -m sp_rope.check`` in each worker, and turns a worker
failure into exit code 3 with the failing rank, its exit code and its error named.
"""

from __future__ import annotations

import logging
import sys
import uuid
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .check import Settings

EXIT_USAGE, EXIT_INFRA = 2, 3


def self_launch(settings: Settings, nproc: int) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    # The agent logs every worker start and stop at WARNING; keep the user's terminal to the verdict.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.ERROR)
    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"sp_rope-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.1,
        rdzv_configs={"timeout": int(max(60, settings.timeout))},
    )
    argv = ["-m", "sp_rope.check", *settings.argv]
    try:
        results = elastic_launch(config, entrypoint=sys.executable)(*argv)
    except ChildFailedError as err:
        return _report_failure(err)
    codes = [int(v) if isinstance(v, int) else 0 for v in (results or {}).values()]
    return max(codes, default=0)


def _report_failure(err: object) -> int:
    failures = getattr(err, "failures", {})
    codes = {rank: f.exitcode for rank, f in failures.items()}
    if codes and all(code in (1, EXIT_USAGE) for code in codes.values()):
        # Every rank agreed on a verdict (1) or refused the input (2): pass it on unchanged.
        return max(codes.values())
    first_rank, first = min(failures.items(), key=lambda kv: kv[1].timestamp)
    message = first.message if isinstance(first.message, str) else str(first.message)
    if isinstance(first.message, dict):
        message = first.message.get("message", "").splitlines()[0] if first.message.get("message") else ""
    print(
        f"sp_rope.check: rank {first_rank} failed first (exit code {first.exitcode}); "
        f"{len(failures)} rank(s) failed: {sorted(codes)}" + (f": {message}" if message else ""),
        file=sys.stderr, flush=True,
    )
    return EXIT_INFRA
