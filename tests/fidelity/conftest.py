"""Fixtures for running the compiled pipeline through the cluster-fidelity runner."""

from __future__ import annotations

import uuid

import pytest
import yaml

from thawctl.local_run import DEMO_PARAMETERS, upload_sample

# Short stages on the sample; partial gets 3 epochs so a step can be killed mid-stage.
FAST = {"probe_epochs": 2, "partial_epochs": 3, "full_epochs": 1}


@pytest.fixture(scope="module")
def fidelity_names(stack):
    suffix = uuid.uuid4().hex[:8]
    uri = upload_sample(f"s3://{stack.bucket}/datasets/fidelity-{suffix}")
    return {**DEMO_PARAMETERS, **FAST, "data_uri": uri,
            "mlflow_experiment": f"fidelity-{suffix}", "model_name": f"fidelity-{suffix}"}


@pytest.fixture(scope="module")
def quick_retry_settings(tmp_path_factory):
    """The cluster settings a test compiles with: the defaults, but retries after 1 s."""
    path = tmp_path_factory.mktemp("settings") / "cluster.yaml"
    retry = {"retry": {"num_retries": 2, "backoff_duration": "1s"}}
    path.write_text(yaml.safe_dump({"steps": {"train": retry, "evaluate": retry}}))
    return path
