"""Multi-node for real: STGP pre-training workers on two Ray nodes sharing nothing but the
S3 store write the same artifact, bit for bit, as two workers on one node."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

from stgray.data.ingest import import_city
from stgray.data.prepare import PrepareConfig, prepare_to_store
from stgray.engines.stgp import STGPPretrainConfig, hourly_model, run_stgp_pretrain

HERE = Path(__file__).resolve().parent


def test_two_nodes_same_artifact_as_one(ray_session, s3_server):
    from stgray.store import ArtifactStore

    model = hourly_model(d_model=16, ffn_dim=32, temporal_depth=1, spatial_depth=1, decoder_blocks=1,
                         decoder_channels=8, skip_channels=8, head_hidden=16, domain_prompts=4,
                         task_prompts=4, dropout=0.0)
    cfg = STGPPretrainConfig(model=model, epochs=1, steps_per_epoch=3, batch_size=4, num_workers=2, seed=3)
    one = ArtifactStore(f"s3://{s3_server.bucket}/one-{uuid.uuid4().hex[:8]}")
    two = ArtifactStore(f"s3://{s3_server.bucket}/two-{uuid.uuid4().hex[:8]}")
    ids = []
    for st in (one, two):
        cid, _, _ = import_city(st, "hangzhou_metro")
        ids.append(prepare_to_store(st, cid, PrepareConfig(), "source")[0])
    assert ids[0] == ids[1]

    aid1, _ = run_stgp_pretrain(one, cfg, [ids[0]])  # one node (the suite's Ray), 2 workers
    r = subprocess.run([sys.executable, str(HERE / "multinode_pretrain.py"), two.url, ids[1],
                        cfg.model_dump_json()], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "RAY_ADDRESS": ""})
    assert r.returncode == 0, r.stderr[-4000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["cluster_nodes"] == 2 and len(out["worker_nodes"]) == 2  # one worker on each node
    assert out["id"] == aid1 and not out["skipped"]
    assert out["model_sha"] == one.manifest(aid1).files["model.pt"].sha256
