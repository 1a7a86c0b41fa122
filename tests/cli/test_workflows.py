"""The GitHub Actions workflows: they match GitHub's workflow schema, do what they say, and name
credentials only through the ``secrets`` context."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
WORKFLOWS = REPO / ".github" / "workflows"
EXPRESSION = re.compile(r"\$\{\{\s*(.*?)\s*\}\}")
ALLOWED_CONTEXTS = ("secrets.", "vars.", "inputs.", "github.", "env.", "runner.", "steps.",
                    "matrix.", "needs.", "job.")
CREDENTIAL = re.compile(r"TOKEN|SECRET|PASSWORD|KEY|CREDENTIAL", re.I)
ALL_WORKFLOWS = sorted(p.name for p in WORKFLOWS.glob("*.y*ml"))


def _load(name: str) -> dict[str, Any]:
    workflow = yaml.safe_load((WORKFLOWS / name).read_text())
    assert isinstance(workflow, dict) and workflow.get("jobs"), name
    workflow["on"] = workflow.pop(True, workflow.get("on"))  # YAML 1.1 reads `on` as true
    return workflow


def _comments(name: str) -> str:
    lines = (WORKFLOWS / name).read_text().splitlines()
    return "\n".join(line for line in lines if line.lstrip().startswith("#"))


def _steps(workflow: dict[str, Any]) -> list[dict[str, Any]]:
    return [step for job in workflow["jobs"].values() for step in job["steps"]]


def _strings(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [s for key, value in node.items() for s in _strings(key) + _strings(value)]
    if isinstance(node, list):
        return [s for item in node for s in _strings(item)]
    return [node] if isinstance(node, str) else []


def _envs(workflow: dict[str, Any]) -> dict[str, str]:
    env = dict(workflow.get("env") or {})
    for job in workflow["jobs"].values():
        env.update(job.get("env") or {})
        for step in job["steps"]:
            env.update(step.get("env") or {})
    return env


def _check_schema(*paths: Path) -> subprocess.CompletedProcess[str]:
    """check-jsonschema with the GitHub workflow schema it ships (vendored: no network)."""
    return subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema",
                           "vendor.github-workflows", *map(str, paths)],
                          capture_output=True, text=True, check=False)


def test_every_workflow_matches_the_github_workflow_schema():
    assert {"test.yml", "train.yml", "e2e-kind.yml"} <= set(ALL_WORKFLOWS)
    result = _check_schema(*(WORKFLOWS / name for name in ALL_WORKFLOWS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_schema_check_refuses_a_misspelt_workflow(tmp_path):
    broken = tmp_path / "broken.yml"
    broken.write_text((WORKFLOWS / "e2e-kind.yml").read_text().replace("runs-on:", "run-on:"))
    result = _check_schema(broken)
    assert result.returncode == 1 and "broken.yml" in result.stdout, result.stdout


@pytest.mark.parametrize("name", ALL_WORKFLOWS)
def test_workflows_parse_and_name_credentials_only_as_secrets(name):
    workflow = _load(name)
    for text in _strings(workflow):
        for expression in EXPRESSION.findall(text):
            unquoted = re.sub(r"'[^']*'", "''", expression)
            names = re.findall(r"[a-z_]+\.[A-Za-z0-9_]+", unquoted)
            assert names and all(n.startswith(ALLOWED_CONTEXTS) for n in names), expression
    for key, value in _envs(workflow).items():
        if CREDENTIAL.search(key):
            assert re.fullmatch(r"\$\{\{ secrets\.[A-Z0-9_]+ \}\}", str(value)), (key, value)
    assert workflow["permissions"] == {"contents": "read"}
    for step in _steps(workflow):  # inputs reach scripts through env, never spliced in
        assert "${{" not in step.get("run", ""), step


def test_test_workflow_runs_the_ci_script_on_every_push_and_everything_nightly():
    workflow = _load("test.yml")
    assert "push" in workflow["on"] and workflow["on"]["push"] is None  # every branch, tag
    assert workflow["on"]["schedule"]
    (job,) = workflow["jobs"].values()
    assert job["runs-on"].startswith("ubuntu")
    python = [s for s in job["steps"] if s.get("uses", "").startswith("actions/setup-python")]
    assert python and python[0]["with"]["python-version"] == "3.11"
    runs = [s["run"] for s in job["steps"] if "run" in s]
    assert any(r.strip() == 'sudo -E env "PATH=$PATH" bash .ci/run "$TARGET"' for r in runs)
    [target] = [s["env"]["TARGET"] for s in job["steps"] if "TARGET" in s.get("env", {})]
    assert target == "${{ github.event_name == 'schedule' && 'test-all' || 'test' }}"
    ci = (REPO / ".ci" / "run").read_text()
    assert "apt-get install" in ci and 'make "${1:-test}"' in ci  # why it runs as root
    assert not [s for s in _strings(workflow) if "secrets." in s]


def test_train_workflow_submits_on_tags_or_by_hand_and_waits():
    workflow = _load("train.yml")
    assert workflow["on"]["push"] == {"tags": ["v*"]}
    inputs = workflow["on"]["workflow_dispatch"]["inputs"]
    assert {"config", "params_file", "data_uri"} <= set(inputs)
    env = _envs(workflow)
    assert env["KFP_HOST"] == "${{ secrets.KFP_HOST }}"
    assert env["KFP_TOKEN"] == "${{ secrets.KFP_TOKEN }}"
    script = "\n".join(s.get("run", "") for s in _steps(workflow))
    assert 'args=(--config "$CONFIG" --wait' in script and 'thaw submit "${args[@]}"' in script
    assert "pip install --no-deps ." in script


def test_train_workflow_installs_the_kfp_versions_pyproject_pins(tmp_path):
    """The install step's Python prints the kfp pins from pyproject.toml (run here)."""
    script = "\n".join(s.get("run", "") for s in _steps(_load("train.yml")))
    snippet = re.search(r"<<'PY'\n(.*?)\nPY\n", script, re.S)
    assert snippet, script
    printed = subprocess.run([sys.executable, "-c", snippet[1]], cwd=REPO, check=True,
                             capture_output=True, text=True).stdout.split()
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert printed == [d for d in deps if d.startswith(("kfp==", "kfp-kubernetes=="))]
    assert len(printed) == 2


def test_e2e_kind_runs_nightly_on_the_minimum_and_newest_backend_through_one_script():
    """As kubeflow/pipelines' own .github/workflows/e2e-test.yml (2.17.0): kind, KFP standalone,
    one job per backend; here every step of the run is the script `make e2e-kind` runs."""
    workflow = _load("e2e-kind.yml")
    assert [entry["cron"] for entry in workflow["on"]["schedule"]] == ["17 3 * * *"]
    assert "workflow_dispatch" in workflow["on"]
    (job,) = workflow["jobs"].values()
    matrix = job["strategy"]["matrix"]["kfp"]
    assert matrix[0] == "minimum" and re.fullmatch(r"\d+\.\d+\.\d+", matrix[1]), matrix
    assert job["strategy"]["fail-fast"] is False
    runs = [s for s in job["steps"] if "run" in s]
    script = [s for s in runs if "e2e-kind.sh" in s["run"]]
    assert len(script) == 1 and script[0]["run"].strip() == "infra/ci/e2e-kind.sh"
    assert script[0]["env"]["KFP_VERSION"] == "${{ matrix.kfp }}"
    assert "make e2e-kind" in _comments("e2e-kind.yml")
    assert (REPO / "infra" / "ci" / "e2e-kind.sh").stat().st_mode & 0o111
    kind = [s for s in job["steps"] if s.get("uses", "").startswith("helm/kind-action@")]
    assert kind and kind[0]["with"]["install_only"] is True  # the script creates the cluster
    (upload,) = [s for s in job["steps"] if s.get("uses", "").startswith("actions/upload-artifact")]
    assert upload["if"] == "failure()"
    assert upload["with"]["path"] == script[0]["env"]["ARTIFACTS_DIR"]
