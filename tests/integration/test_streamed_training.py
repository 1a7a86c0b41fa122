"""The large-set path through the real steps: preprocess stores JPEG shards at an S3 prefix
and hands on a small artifact; training and evaluation stream the shards through a cache
smaller than the dataset (the embedded stack's S3 and MLflow)."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from tests.conftest import SAMPLE_DIR, TEST_ARCH
from thaw import storage
from thaw.data.prepared import open_prepared
from thaw.data.remote_shards import minimum_cache_bytes
from thaw.steps import evaluate_step, preprocess_step, train_step

pytestmark = pytest.mark.slow


def test_a_stage_trains_and_is_evaluated_on_streamed_shards(stack, tmp_path: Path,
                                                            monkeypatch) -> None:
    run_id = f"streamed-{uuid.uuid4().hex[:8]}"
    shard_uri = f"s3://{stack.bucket}/tests/{run_id}/shards"
    prepared = tmp_path / "prepared"
    preprocess_step(str(SAMPLE_DIR), prepared, arch=TEST_ARCH, image_size=64, seed=0,
                    max_bad_fraction=0.05, image_format="jpeg", shard_uri=shard_uri)
    remote = storage.list_s3_objects(shard_uri)
    local_bytes = sum(p.stat().st_size for p in prepared.rglob("*") if p.is_file())
    sizes = {key: storage.s3_client().head_object(Bucket=stack.bucket, Key=key)
             ["ContentLength"] for key in remote if key.endswith(".jpgs")}
    assert len(sizes) >= 3 and not list(prepared.glob("images-*"))  # no images in the artifact
    assert local_bytes < sum(sizes.values())

    cache = tmp_path / "cache"
    monkeypatch.setenv("THAW_SHARD_CACHE", str(cache))
    # the smallest cache allowed: one reader's window and read-ahead
    monkeypatch.setenv("THAW_SHARD_CACHE_BYTES", str(minimum_cache_bytes(sizes.values())))
    monkeypatch.delenv("THAW_CHECKPOINT_URI", raising=False)
    summary = train_step(prepared, tmp_path / "partial", stage="partial",
                         settings={"epochs": 1, "batch_size": 32}, arch=TEST_ARCH,
                         weights="packaged", init_dir=None, experiment="thaw-streamed",
                         pipeline_run_id=run_id)
    assert summary["history"][-1]["train_images"] > 0
    assert list(cache.rglob("*.jpgs"))  # shards came through the cache

    report = evaluate_step(prepared, {"partial": tmp_path / "partial"})
    (stage,) = report["stages"]
    tested = sum(map(sum, stage["test"]["confusion_matrix"]))
    assert tested == open_prepared(prepared).manifest.split_size("test")
