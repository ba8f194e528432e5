"""The pipeline through the real CLI into S3: results table, report, and a re-run that skips."""

from __future__ import annotations

import json
import time

import yaml

TINY_PIPELINE = {
    "name": "tiny",
    "sources": ["hangzhou_metro"],
    "target": "nyc_bike",
    "prepare": {"target_test_days": 3},
    "stgp_pretrain": {"epochs": 1, "steps_per_epoch": 3, "batch_size": 4, "num_workers": 1,
                      "model": {"patch_len": 6, "num_patches": 3, "steps_per_day": 24, "d_model": 16,
                                "ffn_dim": 32, "temporal_depth": 1, "spatial_depth": 1,
                                "decoder_blocks": 1, "decoder_channels": 8, "skip_channels": 8,
                                "head_hidden": 16, "domain_prompts": 4, "task_prompts": 4}},
    "stgp_prompt": {"domain_epochs": 1, "task_epochs": 1, "finetune_epochs": 1, "pseudo_draws": 1},
    "stgp_variants": ["two_stage", "finetune"],
    "stages": ["prepare", "zoo", "tokens", "diffusion", "gpdiff", "stgp", "baselines", "report"],
    "zoo": {"epochs": 1, "lr": 0.001, "node_limit": 6, "num_workers": 1},
    "tokens": {"width": 256},
    "diffusion": {"token_width": 256, "d_model": 16, "layers": 1, "heads": 2, "train_steps": 10,
                  "batch_size": 4, "lr": 0.001},
    "gpdiff": {"samples_per_node": 2, "sampling_steps": 3, "finetune_epochs": 1, "scratch_epochs": 1,
               "pooled_epochs": 1},
}


def test_run_pipeline_twice_skips(cli, s3_server, tmp_path):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(TINY_PIPELINE))
    store = f"s3://{s3_server.bucket}/run-{time.time_ns()}"
    t0 = time.perf_counter()
    r = cli("run", str(cfg), "--store", store, "--out", str(tmp_path / "report"))
    first = time.perf_counter() - t0
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    for method in ("STGP (domain + task prompts)", "STGP full fine-tune", "historical average",
                   "persistence", "neighbour mean", "GPDiff zero-shot", "GPDiff few-shot",
                   "target-only per-node (scratch)", "pooled sources + fine-tune"):
        assert method in out
    md = (tmp_path / "report" / "report.md").read_text()
    assert "## Results" in md and "forecast_vs_truth.png" in md
    assert (tmp_path / "report" / "forecast_vs_truth.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "report" / "params_trained_vs_generated.png").read_bytes()[:4] == b"\x89PNG"
    results = json.loads((tmp_path / "report" / "results.json").read_text())
    tasks = {r["task"] for r in results["rows"]}
    assert tasks == {"forecast", "kriging", "extrapolation"}

    t0 = time.perf_counter()
    r2 = cli("run", str(cfg), "--store", store)
    second = time.perf_counter() - t0
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert "done ->" not in r2.stdout and "already in store, skipped" in r2.stdout
    assert second < first


def test_bad_config_one_line(cli, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**TINY_PIPELINE, "stgp_prompt": {"task_epochs": -1}}))
    r = cli("run", str(bad), "--store", str(tmp_path / "store"))
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "task_epochs" in lines[0]
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "store").exists()
    bad.write_text(yaml.safe_dump({**TINY_PIPELINE, "surprise": 1}))
    r = cli("run", str(bad))
    assert r.returncode != 0 and "surprise: unknown key" in r.stderr
