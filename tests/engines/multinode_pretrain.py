"""Run by tests/engines/test_multinode.py in its own process: a 2-node Ray cluster on one
machine (each node its own raylet, object store and temp dir; nothing shared but the S3
store), STGP pre-training and then the model zoo, each with one worker per node
(STRICT_SPREAD), into an S3 store. Prints JSON: artifact ids, object checksums, the node
ids the workers ran on."""

import json
import shutil
import sys
import tempfile
import time

import ray
from ray.cluster_utils import Cluster


def main(store_url: str, prepared_id: str, cfg_json: str, zoo_cfg_json: str | None = None) -> None:
    from stgray.engines.stgp import STGPPretrainConfig, run_stgp_pretrain
    from stgray.engines.zoo import SHARD_KIND, ZooConfig, run_zoo
    from stgray.store import ArtifactStore

    # each node its own temp/session dir (logs, sockets, spilled objects): no common local path
    t0 = time.perf_counter()
    tmp = [tempfile.mkdtemp(prefix=f"mn{i}", dir="/tmp") for i in range(2)]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False,
                                                            "temp_dir": tmp[0]})
    cluster.add_node(num_cpus=1, temp_dir=tmp[1])
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        st = ArtifactStore(store_url)
        cfg = STGPPretrainConfig.model_validate_json(cfg_json).model_copy(
            update={"placement_strategy": "STRICT_SPREAD"})
        t1 = time.perf_counter()
        aid, skipped = run_stgp_pretrain(st, cfg, [prepared_id])
        t2 = time.perf_counter()
        m = st.manifest(aid)
        nodes = sorted(set(st.read_json(aid, "history.json")[-1]["worker_nodes"]))
        out = {"id": aid, "skipped": skipped, "model_sha": m.files["model.pt"].sha256,
               "worker_nodes": nodes, "cluster_nodes": len(ray.nodes()),
               "seconds": {"cluster": round(t1 - t0, 1), "stgp": round(t2 - t1, 1)}}
        if zoo_cfg_json:
            zcfg = ZooConfig.model_validate_json(zoo_cfg_json).model_copy(
                update={"placement_strategy": "STRICT_SPREAD"})
            zid, zskipped = run_zoo(st, zcfg, [prepared_id])
            shards = st.ls(SHARD_KIND)
            out["zoo"] = {"id": zid, "skipped": zskipped,
                          "files": {k: f.sha256 for k, f in st.manifest(zid).files.items()},
                          "shards": {s.id: {k: f.sha256 for k, f in s.files.items()} for s in shards},
                          "shard_nodes": {s.id: s.meta["ray_node"] for s in shards}}
            out["seconds"]["zoo"] = round(time.perf_counter() - t2, 1)
        print(json.dumps(out))
    finally:
        ray.shutdown()
        cluster.shutdown()
        for d in tmp:
            shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main(*sys.argv[1:5])
