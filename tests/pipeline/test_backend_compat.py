"""Which Kubeflow Pipelines backends take the compiled spec: parsed the way they parse it.

The API server parses an uploaded pipeline spec and its platform spec with ``protojson.Unmarshal``
(strict: an unknown field is an error; kubeflow/pipelines ``backend/src/apiserver/template/
v2_template.go`` at 2.5.0-2.17.0), and from 2.14.0 on the Argo compiler parses each task's
Kubernetes executor config strictly too, when a run is created
(``backend/src/v2/compiler/argocompiler/container.go`` at 2.14.0-2.17.0: "failed to unmarshal
kubernetes config"). The backend's go.mod replaces the api and kubernetes_platform modules with
its own ``./api`` and ``./kubernetes_platform``, so the protos at a release tag are the schemas
that release parses with. They are vendored in ``upstream_protos/<tag>/`` (README there), built
with protoc into a fresh descriptor pool, and the compiled specs are parsed with
``json_format.ParseDict(..., ignore_unknown_fields=False)``: the default settings and every
option of ``infra/cluster.example.yaml``.
"""

import shutil
import subprocess
from functools import cache
from pathlib import Path

import google.rpc.status_pb2
import pytest
import yaml
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory
from kfp import compiler, dsl, kubernetes

from pipelines.settings import settings_from_dict
from pipelines.thaw_pipeline import MIN_KFP_BACKEND, compile_pipeline

REPO = Path(__file__).resolve().parents[2]
PROTOS = Path(__file__).resolve().parent / "upstream_protos"
GOLDEN = REPO / "pipelines" / "thaw_pipeline.yaml"
EXAMPLE = yaml.safe_load((REPO / "infra" / "cluster.example.yaml").read_text())
SUPPORTED = ("2.14.0", "2.15.0", "2.16.0", "2.17.0")
RELEASE_BEFORE = "2.5.0"  # there is no 2.6-2.13
PIPELINE_SPEC = "ml_pipelines.PipelineSpec"
PLATFORM_SPEC = "ml_pipelines.PlatformSpec"
EXECUTOR_CONFIG = "kfp_kubernetes.KubernetesExecutorConfig"
# What each option of infra/cluster.example.yaml changes, on top of that file.
VARIANTS = {
    "cluster.example": {},
    "trainjobs: 2 nodes x 4 GPUs": {"training": {"num_nodes": 2, "gpus_per_node": 4}},
    "4 GPUs in one pod": {"training": {"gpus_per_node": 4}},
    "no GPUs": {"gpu": {"count": 0}},
    "MLflow behind basic auth": {"mlflow_auth": {"secret": "mlflow-auth", "kind": "basic"}},
    "MLflow token, checksums when supported": {
        "mlflow_auth": {"secret": "mlflow-auth", "kind": "token"},
        "s3_checksums": "when_supported"},
    "scratch, /dev/shm and retries everywhere": {
        "gpu": {**EXAMPLE["gpu"], "shm_size": "8Gi"},
        "steps": {kind: {"scratch": "50Gi", "retry": {"num_retries": 3,
                                                      "backoff_max_duration": "36h"}}
                  for kind in ("source_version", "preprocess", "train", "evaluate",
                               "register", "finalize")}},
}


@cache
def _pool(tag: str) -> descriptor_pool.DescriptorPool:
    """The release's pipeline-spec and Kubernetes-platform protos, built with protoc into a
    fresh pool (the default pool already holds kfp-pipeline-spec's ml_pipelines)."""
    if shutil.which("protoc") is None:
        pytest.fail("protoc is missing: apt-get install protobuf-compiler libprotobuf-dev "
                    "(.ci/run installs them)")
    googleapis = Path(google.rpc.status_pb2.__file__).parents[2]  # google/rpc/status.proto
    built = subprocess.run(
        ["protoc", "--include_imports", "--descriptor_set_out=/dev/stdout",
         f"-I{PROTOS / tag}", f"-I{googleapis}", "pipeline_spec.proto",
         "kubernetes_executor_config.proto"], capture_output=True)
    assert built.returncode == 0, built.stderr.decode()
    pool = descriptor_pool.DescriptorPool()
    for file in descriptor_pb2.FileDescriptorSet.FromString(built.stdout).file:
        pool.Add(file)
    return pool


def _parse(tag: str, document: dict, message: str):
    """``document`` parsed strictly as the release's ``message``; ParseError names the field."""
    cls = message_factory.GetMessageClass(_pool(tag).FindMessageTypeByName(message))
    return json_format.ParseDict(document, cls(), ignore_unknown_fields=False)


def _parse_all(tag: str, documents: list[dict]) -> None:
    """What the release parses strictly: the spec, the platform spec, each executor config."""
    pipeline, platform = documents
    _parse(tag, pipeline, PIPELINE_SPEC)
    _parse(tag, platform, PLATFORM_SPEC)
    for executor in platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"].values():
        _parse(tag, executor, EXECUTOR_CONFIG)


def _documents(path: Path) -> list[dict]:
    return list(yaml.safe_load_all(path.read_text()))


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict[str, list[dict]]:
    """The default spec (the golden YAML users upload) and one per cluster option."""
    out = tmp_path_factory.mktemp("variants")
    specs = {"defaults": _documents(GOLDEN)}
    for i, (name, overrides) in enumerate(VARIANTS.items()):
        settings = settings_from_dict({**EXAMPLE, **overrides})
        specs[name] = _documents(compile_pipeline(out / f"{i}.yaml", settings))
    return specs


@pytest.fixture(scope="module")
def sdk_as_is(tmp_path_factory) -> list[dict]:
    """A pipeline whose step reads a Secret as kfp-kubernetes writes it, untouched by thaw."""

    @dsl.container_component
    def hello():
        return dsl.ContainerSpec(image="busybox", command=["true"])

    @dsl.pipeline(name="sdk-as-is")
    def pipeline():
        kubernetes.use_secret_as_env(hello(), secret_name="s", secret_key_to_env={"k": "K"})

    path = tmp_path_factory.mktemp("sdk") / "p.yaml"
    compiler.Compiler().compile(pipeline, package_path=str(path))
    return _documents(path)


@pytest.mark.parametrize("tag", SUPPORTED)
@pytest.mark.parametrize("variant", ["defaults", *VARIANTS])
def test_every_compiled_spec_parses_strictly_on_every_supported_release(compiled, tag,
                                                                         variant):
    _parse_all(tag, compiled[variant])


def test_the_minimum_is_the_oldest_release_proved_here():
    assert MIN_KFP_BACKEND == SUPPORTED[0] == "2.14.0"


def test_kfp_kubernetes_writes_a_field_2_14_refuses_and_thaw_leaves_it_out(sdk_as_is, compiled):
    """kfp-kubernetes 2.17 writes ``optional: false`` into every secretAsEnv / configMapAsEnv;
    SecretAsEnv.optional and ConfigMapAsEnv.optional came with 2.15.0
    (kubernetes_platform/proto/kubernetes_executor_config.proto; kubeflow/pipelines#12216,
    #12495), so 2.14.x refuses such a run. False is the default (absent is read as false by
    backend/src/v2/driver/k8s.go at 2.15.0-2.17.0), so thaw's compile leaves it out."""
    _parse_all("2.15.0", sdk_as_is)
    with pytest.raises(json_format.ParseError, match='"kfp_kubernetes.SecretAsEnv" has no '
                                                     'field named "optional"'):
        _parse_all("2.14.0", sdk_as_is)
    for documents in compiled.values():
        assert "optional:" not in yaml.safe_dump(documents[1])


def _parameter_inputs(spec) -> dict[str, str]:
    """``task.input`` -> the kind of every task input parameter, in every DAG of the spec."""
    dags = {"root": spec.root.dag, **{name: c.dag for name, c in spec.components.items()
                                      if c.HasField("dag")}}
    return {f"{task_name}.{name}": value.WhichOneof("kind")
            for dag in dags.values() for task_name, task in dag.tasks.items()
            for name, value in task.inputs.parameters.items()}


def test_the_release_before_refuses_the_run_though_the_schema_parses(compiled):
    """2.5.0 (Kubeflow 1.10.1 and 1.10.2 ship it) knows every field the spec uses, but its
    Argo compiler refuses any task input of kind taskFinalStatus — the exit handler's input —
    with "task final status not supported yet" (backend/src/v2/compiler/argocompiler/dag.go at
    2.5.0), and it looks retry policies up in the root DAG only (container.go at 2.5.0,
    getTaskRetryPolicySpec; kubeflow/pipelines#11908), where no training step sits."""
    for documents in compiled.values():
        _parse_all(RELEASE_BEFORE, documents)
        spec = _parse(RELEASE_BEFORE, documents[0], PIPELINE_SPEC)
        final_status = [name for name, kind in _parameter_inputs(spec).items()
                        if kind == "task_final_status"]
        assert final_status == ["finalize.status"]
        nested = spec.components["comp-exit-handler-1"].dag.tasks
        retried = {name for name, task in nested.items() if task.HasField("retry_policy")}
        assert {"train", "train-2", "train-3"} <= retried
        assert not retried & set(spec.root.dag.tasks)  # 2.5.0 finds none of their policies


def test_a_streaming_run_changes_parameters_only(compiled):
    """image_format=jpeg with a shard_uri (streaming) is chosen per run, in the run's
    runtime config, not compiled in: the spec declares both as string parameters."""
    parameters = compiled["defaults"][0]["root"]["inputDefinitions"]["parameters"]
    assert {parameters[name]["parameterType"] for name in ("image_format", "shard_uri")} == {
        "STRING"}
    runtime = {"parameterValues": {"image_format": "jpeg", "shard_uri": "s3://thaw/shards"}}
    for tag in SUPPORTED:
        _parse(tag, runtime, "ml_pipelines.PipelineJob.RuntimeConfig")
