"""The bucket Job's script, run as its container would run it (python -c, the Job's env), against
a local S3-compatible server (moto) on loopback instead of MinIO/AWS."""

from __future__ import annotations

import os
import subprocess
import sys

import boto3
import pytest
from infra_tree import OVERLAY_NAMES, container, env_of, find
from moto.server import ThreadedMotoServer


@pytest.fixture()
def s3_server():
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


def _job_environment(docs: list[dict], endpoint: str) -> dict[str, str]:
    """The Job container's env as the kubelet would set it; the endpoint points at the test
    server and Secret values are test keys."""
    config = find(docs, "ConfigMap", "thaw-config")["data"]
    env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp"),
           "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": os.devnull,
           "AWS_SHARED_CREDENTIALS_FILE": os.devnull}
    job = container(find(docs, "Job", "thaw-buckets"), "create-buckets")
    for name, entry in env_of(job).items():
        if "value" in entry:
            env[name] = entry["value"]
        elif "configMapKeyRef" in entry["valueFrom"]:
            env[name] = config[entry["valueFrom"]["configMapKeyRef"]["key"]]
        elif "secretKeyRef" in entry["valueFrom"]:
            env[name] = "testing"
    # on AWS (IRSA) the pod gets a web identity instead of keys; here, test keys
    env.setdefault("AWS_ACCESS_KEY_ID", "testing")
    env.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    env["AWS_ENDPOINT_URL"] = endpoint
    return env


@pytest.mark.parametrize("overlay", OVERLAY_NAMES)
def test_bucket_job_creates_the_buckets_and_is_idempotent(rendered, overlay, s3_server):
    docs = rendered[overlay]
    job = container(find(docs, "Job", "thaw-buckets"), "create-buckets")
    assert job["command"] == ["python", "-c"] and len(job["args"]) == 1
    assert job["image"].startswith("ghcr.io/thaw-ml/thaw:")
    env = _job_environment(docs, s3_server)
    buckets = [b.strip() for b in env["THAW_BUCKETS"].split(",")]
    region = env["AWS_DEFAULT_REGION"]

    outputs = []
    for _ in range(2):  # a second run (Job retry, re-apply) keeps what is there
        result = subprocess.run([sys.executable, "-c", job["args"][0]], env=env,
                                capture_output=True, text=True, timeout=120, check=False)
        assert result.returncode == 0, result.stderr
        outputs.append(result.stdout)
    for bucket in buckets:
        assert f"bucket {bucket}: created in {region}" in outputs[0]
        assert f"bucket {bucket}: exists" in outputs[1]

    s3 = boto3.client("s3", endpoint_url=s3_server, region_name=region,
                      aws_access_key_id="testing", aws_secret_access_key="testing")
    for bucket in buckets:
        location = s3.get_bucket_location(Bucket=bucket)["LocationConstraint"]
        assert (location or "us-east-1") == region
