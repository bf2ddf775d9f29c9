"""A rank on a joined node: `torchrun … --module dist_backend.join_rank`, started by `dist_backend join`.

torchrun gives LOCAL_RANK; the head gave this node its first global rank. From there the rank is an ordinary
worker: it proves the token, says hello with its global rank and joins the process group through rank 0's store on
the head. Its parent (the one whose death ends it) is torchrun's agent.
"""

from __future__ import annotations

import json
import os
import sys


def node_gpus(local_rank: int, *, gpus_per_rank: int) -> tuple[int, ...]:
    """CUDA indices on this machine of its `local_rank`-th rank: consecutive blocks of gpus_per_rank."""
    return tuple(range(local_rank * gpus_per_rank, (local_rank + 1) * gpus_per_rank))


def main() -> int:
    from .join import ENV_DEVICE, ENV_FIRST_RANK
    from .worker import ENV_CONFIG, ENV_LOCAL_GPUS, ENV_NODE_RANK, ENV_PARENT_PID, ENV_RANK

    local_rank = int(os.environ["LOCAL_RANK"])
    os.environ[ENV_RANK] = str(int(os.environ[ENV_FIRST_RANK]) + local_rank)
    os.environ[ENV_NODE_RANK] = "1"
    os.environ[ENV_PARENT_PID] = str(os.getppid())
    if os.environ.get(ENV_DEVICE) == "cuda":
        # This machine's GPUs, not the global rank's indices (those are the head's numbering).
        gpus_per_rank = int(json.loads(os.environ[ENV_CONFIG]).get("gpus_per_rank", 1))
        os.environ[ENV_LOCAL_GPUS] = ",".join(map(str, node_gpus(local_rank, gpus_per_rank=gpus_per_rank)))
    from .worker import main as worker_main

    return worker_main()


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
