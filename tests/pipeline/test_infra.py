"""infra/: the Kubernetes manifests agree with what the pipeline reads, hold no credentials,
and the example scripts are well formed."""

import importlib.util
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from pipelines.thaw_pipeline import CONFIG_KEYS, CONFIG_MAP, S3_SECRET, S3_SECRET_KEYS

INFRA = Path(__file__).resolve().parents[2] / "infra"
MANIFESTS = sorted(INFRA.glob("*.yaml"))


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _all_docs() -> list[dict]:
    return [d for path in MANIFESTS for d in _docs(path)]


def _find(kind: str, name: str) -> dict:
    found = [d for d in _all_docs() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} documents"
    return found[0]


def test_manifests_exist():
    names = {p.name for p in MANIFESTS}
    assert {"mlflow.yaml", "thaw-config.yaml", "kfp-launcher.yaml"} <= names


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_every_document_is_a_kubernetes_object(path):
    docs = _docs(path)
    assert docs
    for doc in docs:
        assert doc.get("apiVersion") and doc.get("kind"), doc
        assert doc.get("metadata", {}).get("name"), doc


def test_config_map_has_exactly_the_keys_the_pipeline_reads():
    config = _find("ConfigMap", CONFIG_MAP)
    assert set(config["data"]) == set(CONFIG_KEYS)
    assert all(isinstance(v, str) and v for v in config["data"].values())


def test_secret_example_has_the_keys_the_pipeline_reads_and_no_credentials():
    secret = _find("Secret", S3_SECRET)
    values = {**secret.get("stringData", {}), **secret.get("data", {})}
    assert set(values) == set(S3_SECRET_KEYS)
    assert set(values.values()) == {"REPLACE_ME"}


def test_no_secret_in_infra_holds_a_value():
    for doc in _all_docs():
        if doc["kind"] == "Secret":
            values = {**doc.get("stringData", {}), **doc.get("data", {})}
            assert set(values.values()) <= {"REPLACE_ME"}, doc["metadata"]["name"]


def test_kfp_launcher_providers_point_at_the_pipeline_secret():
    launcher = _find("ConfigMap", "kfp-launcher")
    assert launcher["data"]["defaultPipelineRoot"].startswith("minio://mlpipeline/")
    providers = yaml.safe_load(launcher["data"]["providers"])
    assert {"minio", "s3"} <= set(providers)
    for provider in providers.values():
        credentials = provider["default"]["credentials"]
        assert credentials["fromEnv"] is False
        ref = credentials["secretRef"]
        assert ref["secretName"] == S3_SECRET
        assert {ref["accessKeyKey"], ref["secretKeyKey"]} == set(S3_SECRET_KEYS)


def test_mlflow_server_accepts_the_tracking_uri_the_pipeline_uses():
    uri = urlparse(_find("ConfigMap", CONFIG_MAP)["data"]["MLFLOW_TRACKING_URI"])
    deployment = _find("Deployment", "mlflow")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    args = container["args"]
    allowed = args[args.index("--allowed-hosts") + 1].split(",")
    assert uri.netloc in allowed  # MLflow matches the Host header with its port
    assert str(uri.port) == args[args.index("--port") + 1]
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    for env in container["env"]:
        if env["name"].startswith(("AWS_ACCESS", "AWS_SECRET", "POSTGRES")):
            assert "secretKeyRef" in env["valueFrom"], env["name"]
    service = _find("Service", "mlflow")
    assert uri.hostname.split(".")[:2] == ["mlflow", service["metadata"]["namespace"]]


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
