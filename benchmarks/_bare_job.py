"""The least a 4-rank gloo job does: start, join the group, one barrier, leave.

``python -m torch.distributed.run --standalone --nproc-per-node 4 benchmarks/_bare_job.py`` is the
baseline for figure 5 (time to verdict): interpreter + torch import per rank, the rendezvous, and
process-group setup and teardown, with no work at all.
"""

import torch.distributed as dist

if __name__ == "__main__":
    dist.init_process_group("gloo")
    dist.barrier()
    dist.destroy_process_group()
