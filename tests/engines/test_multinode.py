"""Multi-node for real (issue 6.6): STGP pre-training and the model zoo, their workers on
two Ray nodes of one machine sharing nothing but the S3 store, write the same artifacts,
bit for bit, as a run on one node: STGP's two workers on the suite's Ray node; the zoo's
shards trained in this process (the code a zoo worker runs, minus Ray -- a third Ray Train
start-up would cost ~15 s; tests/engines/test_zoo.py shows one-node Ray runs with one and
two workers give the same zoo, bit for bit, with and without a killed worker)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import torch

from stgray.data.ingest import import_city
from stgray.data.prepare import PrepareConfig, prepare_to_store
from stgray.engines.stgp import STGPPretrainConfig, hourly_model, run_stgp_pretrain
from stgray.engines.zoo import SHARD_KIND, ZooConfig, plan_shards, train_shard, write_zoo, zoo_id_for
from stgray.nn.gpdiff.pernode import PerNodeArch

HERE = Path(__file__).resolve().parent


def test_two_nodes_same_artifact_as_one(ray_session, s3_server):
    from stgray.store import ArtifactStore

    model = hourly_model(d_model=16, ffn_dim=32, temporal_depth=1, spatial_depth=1, decoder_blocks=1,
                         decoder_channels=8, skip_channels=8, head_hidden=16, domain_prompts=4,
                         task_prompts=4, dropout=0.0)
    cfg = STGPPretrainConfig(model=model, epochs=1, steps_per_epoch=3, batch_size=4, num_workers=2, seed=3)
    # 4 nodes in 2 shards of 2: one shard per worker
    zcfg = ZooConfig(model=PerNodeArch(arch="stgcn"), epochs=1, lr=1e-3, nodes_per_shard=2,
                     node_limit=4, num_workers=2, use_gpu=False)
    one = ArtifactStore(f"s3://{s3_server.bucket}/one-{uuid.uuid4().hex[:8]}")
    two = ArtifactStore(f"s3://{s3_server.bucket}/two-{uuid.uuid4().hex[:8]}")
    ids = []
    for st in (one, two):
        cid, _, _ = import_city(st, "hangzhou_metro")
        ids.append(prepare_to_store(st, cid, PrepareConfig(), "source")[0])
    assert ids[0] == ids[1]

    aid1, _ = run_stgp_pretrain(one, cfg, [ids[0]])  # one node (the suite's Ray), 2 workers
    threads = torch.get_num_threads()
    torch.set_num_threads(zcfg.cpus_per_worker)  # as a zoo worker does
    try:
        shards = plan_shards(one, zcfg, [ids[0]])
        for s in shards:
            train_shard(one, zcfg, s, device="cpu")
        zid1 = write_zoo(one, zcfg, [ids[0]], shards)
    finally:
        torch.set_num_threads(threads)
    assert zid1 == zoo_id_for(one, zcfg, [ids[0]]) and len(shards) == 2
    r = subprocess.run([sys.executable, str(HERE / "multinode_pretrain.py"), two.url, ids[1],
                        cfg.model_dump_json(), zcfg.model_dump_json()],
                       capture_output=True, text=True, timeout=600, env={**os.environ, "RAY_ADDRESS": ""})
    assert r.returncode == 0, r.stderr[-4000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    print("two-node cluster seconds:", out["seconds"])
    assert out["cluster_nodes"] == 2 and len(out["worker_nodes"]) == 2  # one worker on each node
    assert out["id"] == aid1 and not out["skipped"]
    assert out["model_sha"] == one.manifest(aid1).files["model.pt"].sha256

    # the zoo: one shard trained on each node; every object of every artifact identical
    zoo = out["zoo"]
    assert zoo["id"] == zid1 and not zoo["skipped"]
    assert len(set(zoo["shard_nodes"].values())) == 2
    assert set(zoo["shard_nodes"].values()) <= set(out["worker_nodes"])
    one_shards = one.ls(SHARD_KIND)
    assert zoo["files"] == {k: f.sha256 for k, f in one.manifest(zid1).files.items()}
    assert zoo["shards"] == {s.id: {k: f.sha256 for k, f in s.files.items()} for s in one_shards}
