"""One rank of a 2-process DDP run for tests/test_step_memory.py: one training step under
`LargestTensor`, the rank's largest float storage written to `<out>/rank<r>.json`.

    torchrun --nproc_per_node 2 tests/step_memory_worker.py CONFIG.json OUT_DIR
"""

import json
import sys
from pathlib import Path

from opd.config import config_from_dict
from opd.run.loop import train_step
from opd.run.metrics import PhaseTimer
from opd.run.setup import build_run
from opd.run.world import exit_rank
from test_step_memory import LargestTensor  # this script's folder is first on sys.path


def main(config_path: str, out: str) -> None:
    run = build_run(config_from_dict(json.loads(Path(config_path).read_text())))
    with LargestTensor() as largest:
        record = train_step(run, 0, PhaseTimer())
    result = {
        "kind": run.world.kind,
        "fused": bool(run.path.fused),
        "tokens": int(record["tokens"]),
        "nbytes": largest.nbytes,
        "where": str(largest.where),
    }
    Path(out, f"rank{run.world.rank}.json").write_text(json.dumps(result))
    run.world.close()
    exit_rank(0)


if __name__ == "__main__":
    main(*sys.argv[1:])
