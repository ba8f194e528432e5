"""Run by tests/engines/test_multinode.py in its own process: a 2-node Ray cluster on one
machine (each node its own raylet and object store), STGP pre-training with one worker per
node (STRICT_SPREAD), into an S3 store. Prints JSON: artifact id, model.pt sha256, the
node ids the workers ran on."""

import hashlib
import json
import sys

import ray
from ray.cluster_utils import Cluster


def main(store_url: str, prepared_id: str, cfg_json: str) -> None:
    from stgray.engines.stgp import STGPPretrainConfig, run_stgp_pretrain
    from stgray.store import ArtifactStore

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        st = ArtifactStore(store_url)
        cfg = STGPPretrainConfig.model_validate_json(cfg_json).model_copy(
            update={"placement_strategy": "STRICT_SPREAD"})
        aid, skipped = run_stgp_pretrain(st, cfg, [prepared_id])
        m = st.manifest(aid)
        nodes = sorted(set(st.read_json(aid, "history.json")[-1]["worker_nodes"]))
        print(json.dumps({"id": aid, "skipped": skipped, "model_sha": m.files["model.pt"].sha256,
                          "worker_nodes": nodes, "cluster_nodes": len(ray.nodes())}))
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:4])
