"""infra/'s examples for submitting the pipeline: the CI workflow and the recurring run.
(The Kubernetes manifests, infra/base and infra/overlays, are tested in tests/infra.)"""

import importlib.util
from pathlib import Path

import pytest
import yaml

INFRA = Path(__file__).resolve().parents[2] / "infra"


def test_ci_workflow_compiles_and_submits():
    workflow = yaml.safe_load((INFRA / "ci" / "github-actions-submit.yaml").read_text())
    steps = [s.get("run", "") for s in workflow["jobs"]["submit"]["steps"]]
    text = "\n".join(steps)
    assert "pip install ." in text and "thaw compile --image" in text
    assert "create_run_from_pipeline_package" in text


def test_schedule_example_uses_a_six_field_cron():
    spec = importlib.util.spec_from_file_location("schedule_example",
                                                  INFRA / "schedule_example.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # no side effects: main() only under __main__
    assert len(module.DEFAULT_CRON.split()) == 6
    args = module.parse_args(["--host", "http://kfp.example"])
    assert len(args.cron.split()) == 6 and args.package == "thaw_pipeline.yaml"
    with pytest.raises(SystemExit):
        module.parse_args(["--cron", "0 3 * * *"])
