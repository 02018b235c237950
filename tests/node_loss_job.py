"""Run one backfill on a two-node Ray on this machine and lose the second node mid-job.

Run by tests/test_faults.py in a process of its own (the test session holds a local Ray):
`python -m tests.node_loss_job INPUT OUTPUT MODEL REPORT`. Both nodes are real raylets on this machine
(`ray.cluster_utils.Cluster`, Ray's own multi-node test harness); the worker node is lost by
SIGKILL of its raylet and every process under it, once three parts are committed and an encoder
actor is running there. Writes REPORT, a JSON file: what was lost, and the job's summary (not
stdout, where Ray forwards its workers' log lines after the driver's own).
"""

import glob
import json
import os
import sys
import threading
import time

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from semvec.backfill.job import run  # noqa: E402
from semvec.config import load_embed_config  # noqa: E402
from tests.conftest import processes_named  # noqa: E402

OPTS = {"id_field": "id", "rows_per_file": 250, "batch_rows": 250}  # tests/test_faults.py runs these too


def raylet_pid(node) -> int:
    return next(p.pid for kind, p in node.live_processes() if kind == "raylet")


def main(src: str, out: str, model: str, report: str) -> None:
    cluster = Cluster(initialize_head=True, connect=True,
                      head_node_args={"num_cpus": 2, "include_dashboard": False})
    worker = cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    lost = {}

    def lose_the_worker_node():
        raylet = raylet_pid(worker)
        deadline = time.time() + 300
        # as soon as the node holds an encoder actor and the job has committed: how soon that actor
        # starts depends on the machine's load
        while len(glob.glob(f"{out}/part-*.parquet")) < 1 or not processes_named("EncodeActor", raylet):
            if time.time() > deadline:
                return
            time.sleep(0.05)
        lost["actors_on_node"] = len(processes_named("EncodeActor", raylet))
        lost["parts_before"] = len(glob.glob(f"{out}/part-*.parquet"))
        cluster.remove_node(worker, allow_graceful=False)  # SIGKILL, no clean-up
        lost["node_processes_left"] = len(worker.live_processes())

    killer = threading.Thread(target=lose_the_worker_node, daemon=True)
    killer.start()
    summary = run(load_embed_config(None, input=src, output=out, model=model, **OPTS))
    killer.join(timeout=5)
    with open(report, "w") as f:
        json.dump({"lost": lost, "summary": summary}, f)
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:5])
