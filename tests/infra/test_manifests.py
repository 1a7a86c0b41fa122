"""infra/ as a kustomize tree: every overlay renders, every object is valid against the
Kubernetes API schemas (strict: unknown fields fail), and the facts the pipeline depends on hold
in each overlay."""

from __future__ import annotations

import base64
import fnmatch
import re
from pathlib import Path
from urllib.parse import urlparse

import kubernetes_validate
import pytest
import yaml
from infra_tree import (
    BASE,
    INFRA,
    OVERLAY_NAMES,
    container,
    env_of,
    find,
    load_docs,
)

# kubectl on these machines is v1.32; kubernetes-validate ships schemas for 1.25 .. 1.37.
K8S_VERSION = "1.32"
NAMESPACE = "kubeflow-user-example-com"
CONFIG_MAP, S3_SECRET, PG_SECRET = "thaw-config", "thaw-s3-credentials", "mlflow-postgres"
THAW_CONFIG_KEYS = {"MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION",
                    "THAW_CHECKPOINT_URI"}
PLACEHOLDER = re.compile(r"^REPLACE_ME")
COMPILED_PIPELINE = INFRA.parent / "pipelines" / "thaw_pipeline.yaml"
CLUSTER_EXAMPLE = INFRA / "cluster.example.yaml"
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "Job", "DaemonSet", "CronJob"}
# cluster-scoped kinds in the tree: kustomize gives them no namespace (trainer-rbac.yaml)
CLUSTER_SCOPED_KINDS = {"ClusterRole", "ClusterRoleBinding"}
# fields of kubeflow/pipelines backend/src/v2/config/s3.go (S3ProviderDefault, S3Credentials)
LAUNCHER_DEFAULT_FIELDS = {"endpoint", "credentials", "region", "disableSSL", "forcePathStyle",
                           "maxRetries"}
LAUNCHER_CREDENTIAL_FIELDS = {"fromEnv", "secretRef"}
LAUNCHER_SECRETREF_FIELDS = {"secretName", "accessKeyKey", "secretKeyKey"}

BASE_FILES = sorted(p for p in BASE.glob("*.yaml") if p.name != "kustomization.yaml")
# every YAML file in infra/ that holds Kubernetes objects (ci/ holds a GitHub workflow)
TREE_FILES = sorted(p for p in INFRA.rglob("*.y*ml")
                    if p.suffix in {".yaml", ".yml"} and "ci" not in p.relative_to(INFRA).parts)


def _validate(doc: dict, where: str) -> None:
    """Strict schema validation; a kind without a schema is an error, not a warning."""
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as err:
        path = ".".join(str(p) for p in err.path)
        pytest.fail(f"{where}: {doc['kind']}/{doc['metadata'].get('name')}: {path}: {err.message}")
    except kubernetes_validate.SchemaNotFoundError as err:
        pytest.fail(f"{where}: {err.message}")


def _secret_values(secret: dict) -> dict[str, str]:
    values = dict(secret.get("stringData") or {})
    for key, encoded in (secret.get("data") or {}).items():
        values[key] = base64.b64decode(encoded).decode()
    return values


def _workloads(docs: list[dict]) -> list[dict]:
    return [d for d in docs if d["kind"] in WORKLOAD_KINDS]


def _pod_spec(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def _flags(args: list[str]) -> dict[str, str | None]:
    """`--name=value` / `--name value` / `--switch` -> {name: value or None}."""
    flags: dict[str, str | None] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        assert arg.startswith("--"), f"unexpected positional argument {arg!r}"
        if "=" in arg:
            name, value = arg.split("=", 1)
            flags[name] = value
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            flags[arg] = args[i + 1]
            i += 1
        else:
            flags[arg] = None
        i += 1
    return flags


def _expand(value: str, env: dict[str, dict]) -> str:
    """Kubernetes' $(VAR) expansion, for env entries with a literal value."""
    def sub(match: re.Match) -> str:
        entry = env.get(match.group(1))
        assert entry is not None, f"$({match.group(1)}) is not in the container's env"
        return entry.get("value", match.group(0))
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", sub, value)


def _bucket(uri: str) -> str:
    parsed = urlparse(uri)
    assert parsed.scheme == "s3" and parsed.netloc, f"not an s3:// URI: {uri!r}"
    return parsed.netloc


def _mlflow(docs: list[dict]) -> tuple[dict, dict[str, str | None], dict[str, dict]]:
    server = container(find(docs, "Deployment", "mlflow"), "mlflow")
    env = env_of(server)
    flags = {k: (None if v is None else _expand(v, env))
             for k, v in _flags(server["args"]).items()}
    return server, flags, env


def _compiled_platform() -> dict:
    docs = load_docs(COMPILED_PIPELINE.read_text())
    platforms = [d for d in docs if "platforms" in d]
    assert len(platforms) == 1, "compiled pipeline has no kubernetes platform spec"
    return platforms[0]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def _pipeline_reads() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """ConfigMap and Secret names -> keys that the compiled pipeline's steps read as env."""
    config_maps: dict[str, set[str]] = {}
    secrets: dict[str, set[str]] = {}
    for executor in _compiled_platform().values():
        for ref in executor.get("configMapAsEnv", []):
            config_maps.setdefault(ref["configMapName"], set()).update(
                k["configMapKey"] for k in ref["keyToEnv"])
        for ref in executor.get("secretAsEnv", []):
            secrets.setdefault(ref["secretName"], set()).update(
                k["secretKey"] for k in ref["keyToEnv"])
    return config_maps, secrets


def _example_secrets() -> dict[str, dict[str, str]]:
    docs = load_docs((BASE / "secrets.example.yaml").read_text())
    return {d["metadata"]["name"]: _secret_values(d) for d in docs if d["kind"] == "Secret"}


# --- the tree as written ------------------------------------------------------------------------

def test_tree_layout():
    assert {"minio", "aws-s3"} <= set(OVERLAY_NAMES)
    assert (BASE / "kustomization.yaml").is_file()
    names = {p.name for p in BASE_FILES}
    assert {"mlflow.yaml", "postgres.yaml", "thaw-config.yaml", "kfp-launcher.yaml",
            "buckets-job.yaml", "secrets.example.yaml"} <= names
    base = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    assert base["namespace"] == NAMESPACE
    # the example Secrets are never applied by `kubectl apply -k`
    assert "secrets.example.yaml" not in base["resources"]
    assert set(base["resources"]) == names - {"secrets.example.yaml"}
    assert set(_example_secrets()) == {S3_SECRET, PG_SECRET}


@pytest.mark.parametrize("path", BASE_FILES, ids=lambda p: p.name)
def test_base_file_is_valid_as_written(path: Path):
    docs = load_docs(path.read_text())
    assert docs, f"{path.name} is empty"
    for doc in docs:
        _validate(doc, f"infra/base/{path.name}")


def test_every_secret_in_the_tree_holds_only_placeholders():
    secrets = [(p, d) for p in TREE_FILES for d in load_docs(p.read_text())
               if isinstance(d, dict) and d.get("kind") == "Secret"]
    assert secrets, "no example Secret found under infra/"
    for path, secret in secrets:
        where = f"{path.relative_to(INFRA)}: Secret/{secret['metadata']['name']}"
        values = _secret_values(secret)
        assert values, f"{where} has no keys"
        for key, value in values.items():
            assert PLACEHOLDER.match(value), f"{where}: {key} holds a value, not a placeholder"
        assert secret["metadata"].get("labels", {}).get("thaw/example") == "true", where


def test_no_file_in_infra_holds_a_well_known_credential():
    # AWS access key ids, and the MinIO defaults that ship with Kubeflow
    pattern = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b|minio123")
    for path in INFRA.rglob("*"):
        if path.is_file() and "__pycache__" not in path.parts:
            text = path.read_text(errors="replace")
            assert not pattern.search(text), f"{path.relative_to(INFRA)} holds a credential"


def test_example_secrets_have_the_keys_the_pipeline_reads():
    _, secrets_read = _pipeline_reads()
    examples = _example_secrets()
    assert secrets_read, "compiled pipeline reads no Secret"
    for name, keys in secrets_read.items():
        assert name in examples, f"pipeline reads Secret {name}; secrets.example.yaml lacks it"
        assert keys <= set(examples[name]), f"Secret {name}: missing {keys - set(examples[name])}"


def test_names_agree_with_the_pipeline_code():
    from pipelines.settings import ClusterSettings
    from pipelines.thaw_pipeline import CONFIG_KEYS, S3_SECRET_KEYS

    settings = ClusterSettings()
    assert (settings.config_map, settings.s3_secret) == (CONFIG_MAP, S3_SECRET)
    assert set(CONFIG_KEYS) == THAW_CONFIG_KEYS
    assert set(S3_SECRET_KEYS) <= set(_example_secrets()[S3_SECRET])


# --- each overlay, as kubectl would apply it ----------------------------------------------------

@pytest.mark.parametrize("overlay", OVERLAY_NAMES)
def test_overlay_objects_are_valid(rendered, overlay):
    docs = rendered[overlay]
    assert docs
    for doc in docs:
        _validate(doc, f"overlays/{overlay}")
        expected = None if doc["kind"] in CLUSTER_SCOPED_KINDS else NAMESPACE
        assert doc["metadata"].get("namespace") == expected, doc["metadata"]["name"]
        assert doc["metadata"].get("labels", {}).get("app.kubernetes.io/part-of") == "thaw"


@pytest.mark.parametrize("overlay", OVERLAY_NAMES)
def test_overlay_applies_no_secret(rendered, overlay):
    """`kubectl apply -k` must never overwrite the real credentials with placeholders."""
    assert [d["metadata"]["name"] for d in rendered[overlay] if d["kind"] == "Secret"] == []


@pytest.mark.parametrize("overlay", OVERLAY_NAMES)
def test_thaw_config_has_what_the_pipeline_reads(rendered, overlay):
    docs = rendered[overlay]
    config_maps_read, _ = _pipeline_reads()
    assert set(config_maps_read) == {CONFIG_MAP}
    assert config_maps_read[CONFIG_MAP] == THAW_CONFIG_KEYS
    data = find(docs, "ConfigMap", CONFIG_MAP)["data"]
    assert set(data) == THAW_CONFIG_KEYS
    assert all(isinstance(v, str) for v in data.values())
    for key in THAW_CONFIG_KEYS - {"AWS_ENDPOINT_URL"}:  # "" there means AWS's own endpoints
        assert data[key], f"{key} is empty"
    assert _bucket(data["THAW_CHECKPOINT_URI"])
    assert urlparse(data["MLFLOW_TRACKING_URI"]).scheme == "http"


@pytest.mark.parametrize("overlay", OVERLAY_NAMES)
def test_every_reference_resolves(rendered, overlay):
    """ConfigMap keys and ServiceAccounts that workloads name exist in the overlay; Secret keys
    exist in secrets.example.yaml (the Secrets themselves are created by hand)."""
    docs = rendered[overlay]
    config_maps = {d["metadata"]["name"]: d.get("data", {}) for d in docs
                   if d["kind"] == "ConfigMap"}
    accounts = {d["metadata"]["name"] for d in docs if d["kind"] == "ServiceAccount"}
    examples = _example_secrets()
    for workload in _workloads(docs):
        spec = _pod_spec(workload)
        if "serviceAccountName" in spec:
            assert spec["serviceAccountName"] in accounts, workload["metadata"]["name"]
        for c in spec["containers"]:
            for e in c.get("env", []):
                ref = e.get("valueFrom", {})
                if "configMapKeyRef" in ref:
                    cm = ref["configMapKeyRef"]
                    assert cm["key"] in config_maps.get(cm["name"], {}), (c["name"], cm)
                if "secretKeyRef" in ref:
                    sk = ref["secretKeyRef"]
                    assert sk["key"] in examples.get(sk["name"], {}), (c["name"], sk)


@pytest.mark.parametrize("overlay", OVERLAY_NAMES)
def test_mlflow_server(rendered, overlay):
    docs = rendered[overlay]
    server, flags, env = _mlflow(docs)
    assert server["command"] == ["mlflow", "server"]
    # registry: a database-backed store on the PostgreSQL Service
    backend = urlparse(flags["--backend-store-uri"])
    assert backend.scheme.startswith("postgresql")
    find(docs, "Service", backend.hostname)
    find(docs, "StatefulSet", backend.hostname)
    assert "$(POSTGRES_PASSWORD)" in flags["--backend-store-uri"]
    assert "secretKeyRef" in env["POSTGRES_PASSWORD"]["valueFrom"]
    # artifacts proxied to object storage: clients never need S3 credentials for MLflow
    assert "--serve-artifacts" in flags and "--no-serve-artifacts" not in flags
    assert "--default-artifact-root" not in flags
    destination = flags["--artifacts-destination"]
    assert _bucket(destination) and urlparse(destination).path.strip("/")
    # the URI the steps use reaches it: Service name and port, and the Host header is allowed
    tracking = urlparse(find(docs, "ConfigMap", CONFIG_MAP)["data"]["MLFLOW_TRACKING_URI"])
    service = find(docs, "Service", "mlflow")
    assert tracking.hostname == service["metadata"]["name"]
    assert tracking.port in {p["port"] for p in service["spec"]["ports"]}
    assert str(tracking.port) == flags["--port"]
    allowed = flags["--allowed-hosts"].split(",")
    assert "*" not in allowed

    def accepted(host: str) -> bool:  # MLflow's rule: fnmatch when the pattern has a '*'
        return any(fnmatch.fnmatch(host, a) if "*" in a else host == a for a in allowed)

    fqdn = f"{service['metadata']['name']}.{NAMESPACE}.svc.cluster.local:{tracking.port}"
    assert accepted(tracking.netloc) and accepted(fqdn) and accepted("localhost:5000")
    assert not accepted(f"attacker.example:{tracking.port}")
    # a tracking URI set at compile time (cluster settings example) must be accepted too
    if CLUSTER_EXAMPLE.is_file():
        override = (yaml.safe_load(CLUSTER_EXAMPLE.read_text()) or {}).get("mlflow_tracking_uri")
        if override:
            assert accepted(urlparse(override).netloc), f"{override} not in --allowed-hosts"
    assert server["readinessProbe"]["httpGet"]["path"] == "/health"  # exempt from the host check
    # S3 credentials: only from a Secret or from the pod's service account, never literal
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "POSTGRES_PASSWORD"):
        if name in env:
            assert "value" not in env[name] and "secretKeyRef" in env[name]["valueFrom"], name


@pytest.mark.parametrize("overlay", OVERLAY_NAMES)
def test_kfp_launcher(rendered, overlay):
    docs = rendered[overlay]
    launcher = find(docs, "ConfigMap", "kfp-launcher")["data"]
    root = launcher["defaultPipelineRoot"]
    assert root.startswith("s3://") and _bucket(root) and urlparse(root).path.strip("/")
    providers = yaml.safe_load(launcher["providers"])
    assert "s3" in providers, "the s3:// root needs an s3 provider"
    region = find(docs, "ConfigMap", CONFIG_MAP)["data"]["AWS_DEFAULT_REGION"]
    examples = _example_secrets()
    for name, provider in providers.items():
        default = provider["default"]
        assert set(default) <= LAUNCHER_DEFAULT_FIELDS, (name, set(default))
        assert "://" not in default["endpoint"], "the launcher's endpoint is host[:port]"
        assert default["region"] == region
        credentials = default["credentials"]
        assert set(credentials) <= LAUNCHER_CREDENTIAL_FIELDS
        if not credentials.get("fromEnv"):
            ref = credentials["secretRef"]
            assert set(ref) == LAUNCHER_SECRETREF_FIELDS
            assert ref["secretName"] == S3_SECRET
            assert {ref["accessKeyKey"], ref["secretKeyKey"]} <= set(examples[S3_SECRET])


@pytest.mark.parametrize("overlay", OVERLAY_NAMES)
def test_one_bucket_for_pipeline_root_checkpoints_and_mlflow(rendered, overlay):
    docs = rendered[overlay]
    root = find(docs, "ConfigMap", "kfp-launcher")["data"]["defaultPipelineRoot"]
    checkpoints = find(docs, "ConfigMap", CONFIG_MAP)["data"]["THAW_CHECKPOINT_URI"]
    artifacts = _mlflow(docs)[1]["--artifacts-destination"]
    job_env = env_of(container(find(docs, "Job", "thaw-buckets"), "create-buckets"))
    created = {b.strip() for b in job_env["THAW_BUCKETS"]["value"].split(",")}
    assert _bucket(root) == _bucket(checkpoints) == _bucket(artifacts)
    assert _bucket(root) in created, "the bucket Job does not create the pipeline's bucket"
    prefixes = {urlparse(u).path.strip("/") for u in (root, checkpoints, artifacts)}
    assert len(prefixes) == 3, "pipeline root, checkpoints and MLflow share a prefix"


@pytest.mark.parametrize("overlay", OVERLAY_NAMES)
def test_pods(rendered, overlay):
    for workload in _workloads(rendered[overlay]):
        name = workload["metadata"]["name"]
        template = workload["spec"]["template"]
        # pipeline pods are outside the Istio mesh; a sidecar would also never let a Job finish
        assert template["metadata"]["annotations"]["sidecar.istio.io/inject"] == "false", name
        for c in template["spec"]["containers"]:
            image = c["image"]
            assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), image
            assert c.get("resources", {}).get("requests"), (name, c["name"])


def test_minio_overlay(rendered):
    docs = rendered["minio"]
    data = find(docs, "ConfigMap", CONFIG_MAP)["data"]
    assert data["AWS_ENDPOINT_URL"] == "http://minio-service.kubeflow:9000"
    assert data["AWS_DEFAULT_REGION"] == "us-east-1"
    providers = yaml.safe_load(find(docs, "ConfigMap", "kfp-launcher")["data"]["providers"])
    for provider in providers.values():
        default = provider["default"]
        assert default["endpoint"] == "minio-service.kubeflow:9000"
        assert default["disableSSL"] is True  # plain http, like AWS_ENDPOINT_URL
        assert default["forcePathStyle"] is True
        assert default["credentials"]["fromEnv"] is False


def test_aws_overlay(rendered):
    docs = rendered["aws-s3"]
    data = find(docs, "ConfigMap", CONFIG_MAP)["data"]
    assert data["AWS_ENDPOINT_URL"] == ""  # no endpoint override
    assert re.fullmatch(r"[a-z]{2}(-gov)?-[a-z]+-\d", data["AWS_DEFAULT_REGION"])
    root = find(docs, "ConfigMap", "kfp-launcher")["data"]["defaultPipelineRoot"]
    assert _bucket(root).startswith("replace-me"), "AWS bucket names must be placeholders"
    providers = yaml.safe_load(find(docs, "ConfigMap", "kfp-launcher")["data"]["providers"])
    assert providers["s3"]["default"]["credentials"] == {"fromEnv": True}
    assert providers["s3"]["default"]["disableSSL"] is False
    # MLflow and the bucket Job use an IRSA service account instead of static keys
    for kind, name, cname in (("Deployment", "mlflow", "mlflow"),
                              ("Job", "thaw-buckets", "create-buckets")):
        workload = find(docs, kind, name)
        account = find(docs, "ServiceAccount", _pod_spec(workload)["serviceAccountName"])
        assert account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith(
            "arn:aws:iam::")
        env = env_of(container(workload, cname))
        assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} & set(env), name
        assert "MLFLOW_S3_ENDPOINT_URL" not in env  # "" there would break boto3 in MLflow


def test_readme_documents_the_tree():
    from pipelines.thaw_pipeline import MIN_KFP_BACKEND

    readme = (INFRA / "README.md").read_text()
    assert f"Kubeflow Pipelines >= {MIN_KFP_BACKEND}" in readme
    assert "task final status not supported yet" in readme
    for overlay in OVERLAY_NAMES:
        assert f"kubectl apply -k infra/overlays/{overlay}" in readme, overlay
    for path in BASE_FILES:
        assert path.name in readme, path.name
    for example in ("gpu.md", "ci/github-actions-submit.yaml", "schedule_example.py"):
        assert example in readme and (INFRA / example).is_file(), example
