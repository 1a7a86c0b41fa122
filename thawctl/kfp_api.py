"""The Kubeflow Pipelines API, through the kfp SDK client (``kfp.Client``, v2beta1 REST).

What thaw needs and the SDK leaves to its caller: the backend's version checked before
anything is sent (from healthz, whichever of the two hosts answers it: ``backend_health``),
pipeline versions that are idempotent (named by the compiled spec's hash and looked up before
uploading, since ``upload_pipeline_version`` raises on a duplicate name), the compiled spec's
pipeline root set on every run (the backend never reads it from the spec), and API errors as
one readable line.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from thaw.errors import ThawError
from thawctl.compiled import CompiledPipeline
from thawctl.kfp_tasks import SpecTask, stages

IN_CLUSTER_HOST = "http://ml-pipeline.kubeflow.svc.cluster.local:8888"
# where a single-user install runs its pods (manifests/kustomize/env/platform-agnostic)
SINGLE_USER_NAMESPACE = "kubeflow"
SA_TOKEN_ENV = "KF_PIPELINES_SA_TOKEN_PATH"
SA_TOKEN_PATH = "/var/run/secrets/kubeflow/pipelines/token"
# v2beta1 RuntimeState values no run leaves (backend/api/v2beta1/run.proto): PENDING, RUNNING,
# CANCELING and PAUSED go on; RUNTIME_STATE_UNSPECIFIED is what an unknown Argo phase becomes
FINAL_STATES = ("SUCCEEDED", "SKIPPED", "FAILED", "CANCELED")
FOLLOW_RETRIES = 5  # API errors in a row that --wait rides out
_VERSION = re.compile(r"v?(\d+)\.(\d+)\.(\d+)")


@dataclass(frozen=True)
class Connection:
    """Where the API is and who we are: ``host`` (else ``KFP_HOST``, ``KF_PIPELINES_ENDPOINT``,
    or in a pod the in-cluster service), ``namespace`` (the Kubeflow profile; none on a
    single-user install), a bearer token (``KFP_TOKEN``, else the service-account token file
    ``KF_PIPELINES_SA_TOKEN_PATH`` names, default ``/var/run/secrets/kubeflow/pipelines/token``,
    when it exists), ``ui_host`` for links (default: the host)."""

    host: str | None = None
    namespace: str | None = None
    ui_host: str | None = None

    def resolved_host(self) -> str:
        host = (self.host or os.environ.get("KFP_HOST")
                or os.environ.get("KF_PIPELINES_ENDPOINT"))
        if not host and os.environ.get("KUBERNETES_SERVICE_HOST"):
            host = IN_CLUSTER_HOST
        if not host:
            raise ThawError("no KFP API to talk to: pass --host (e.g. "
                            "https://kubeflow.example.com/pipeline) or set KFP_HOST")
        return host.rstrip("/") if host.startswith(("http://", "https://")) \
            else "https://" + host.rstrip("/")

    def token_file(self) -> Path | None:
        named = os.environ.get(SA_TOKEN_ENV)
        path = Path(named or SA_TOKEN_PATH)
        if path.is_file():
            return path
        if named:
            raise ThawError(f"{SA_TOKEN_ENV} names {named}, which is not a file")
        return None


@dataclass(frozen=True)
class PipelineVersion:
    pipeline_id: str
    version_id: str
    name: str
    created: bool


@dataclass(frozen=True)
class BackendHealth:
    """What ``/apis/v2beta1/healthz`` tells: the API server's version tag (None: not known)
    and whether it is multi-user; ``answered_by`` says which server answered."""

    tag: str | None
    multi_user: bool
    answered_by: str


def parse_version(tag: str) -> tuple[int, int, int] | None:
    match = _VERSION.match(tag.strip())
    return (int(match[1]), int(match[2]), int(match[3])) if match else None


def backend_health(answer: Any) -> BackendHealth | None:
    """healthz as either host answers it; None when it is neither answer.

    The API server (``ml-pipeline``) writes ``commit_sha``, ``tag_name``, ``multi_user`` (and
    from 2.14.0 ``pipeline_store``): ``backend/src/apiserver/main.go`` at 2.5.0-2.17.0, where
    ``tag_name`` is the image's TAG_NAME, ``"unknown"`` unless the build sets it (the release
    builds do from 2.16.0 on: ``.github/workflows/build-and-push.yml``). The Kubeflow gateway's
    ``.../pipeline`` goes to the UI server (``ml-pipeline-ui``), which answers healthz itself
    (``frontend/server/app.ts`` and ``handlers/healthz.ts``, 2.5.0-2.17.0): the API server's
    answer renamed to ``apiServerTagName``, ``apiServerCommitHash``, ``apiServerMultiUser`` /
    ``multi_user``, ``apiServerReady``, and only the UI's build keys when the API server did not
    answer it within a second."""
    if not isinstance(answer, dict):
        return None
    if "tag_name" in answer:
        return BackendHealth(_known(answer["tag_name"]), answer.get("multi_user") is True,
                             "the API server")
    if "apiServerReady" in answer or "apiServerTagName" in answer:
        multi_user = answer.get("apiServerMultiUser") is True or answer.get("multi_user") is True
        return BackendHealth(_known(answer.get("apiServerTagName")), multi_user,
                             "the UI server" if answer.get("apiServerReady") else
                             "the UI server, which could not reach the API server")
    return None


def _known(tag: Any) -> str | None:
    return str(tag) if tag and parse_version(str(tag)) is not None else None


@contextlib.contextmanager
def api_errors(what: str, host: str) -> Iterator[None]:
    """ApiException and connection errors from the SDK as a one-line ThawError."""
    import kfp_server_api
    import urllib3

    try:
        yield
    except kfp_server_api.ApiException as err:
        raise ThawError(f"{what}: the KFP API at {host} answered {err.status} {err.reason}"
                        f"{_server_message(err.body)}") from err
    except urllib3.exceptions.HTTPError as err:
        reason = getattr(err, "reason", None) or err
        raise ThawError(f"{what}: cannot reach the KFP API at {host}: {reason}") from err


def _server_message(body: Any) -> str:
    if not body:
        return ""
    text = body.decode(errors="replace") if isinstance(body, bytes) else str(body)
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return f": {' '.join(text.split())[:200]}"
    if isinstance(data, dict):
        for key in ("message", "error_message", "error"):
            if data.get(key):
                return f": {data[key]}"
    return ""


class Kfp:
    """A connected, version-checked ``kfp.Client`` with the calls thaw makes."""

    def __init__(self, connection: Connection, *, min_backend: str) -> None:
        self.host = connection.resolved_host()
        self.namespace = connection.namespace or None
        self.ui_host = (connection.ui_host or os.environ.get("KF_PIPELINES_UI_ENDPOINT")
                        or self.host).rstrip("/")
        token = os.environ.get("KFP_TOKEN") or None
        token_file = None if token else connection.token_file()
        self.backend_version, multi_user = self._check_backend(token or _read(token_file),
                                                               min_backend)
        self.client = self._client(token, token_file)
        # kfp.Client takes a pod's own namespace on a multi-user backend when none is given
        self.namespace = self.namespace or self.client.get_user_namespace() or None
        if multi_user and not self.namespace:
            raise ThawError(f"the KFP backend at {self.host} is multi-user: pass --namespace "
                            "(your Kubeflow profile, e.g. kubeflow-user-example-com) or set "
                            "KFP_NAMESPACE")

    # -- connecting -------------------------------------------------------------------
    def _check_backend(self, token: str | None, min_backend: str) -> tuple[str, bool]:
        """The backend's version ("unknown" when healthz does not tell it) and whether it is
        multi-user, read from healthz's raw answer (the SDK's model knows neither form of the
        version): a version below ``min_backend`` is refused, an unknown one only warned of."""
        import kfp_server_api

        config = kfp_server_api.Configuration(host=self.host)
        if token:
            config.api_key["authorization"] = token
            config.api_key_prefix["authorization"] = "Bearer"
        api = kfp_server_api.HealthzServiceApi(kfp_server_api.ApiClient(config))
        with api_errors("checking the backend (healthz)", self.host):
            answer = api.healthz_service_get_healthz(_preload_content=False)
        try:
            health = backend_health(json.loads(answer.data))
        except ValueError:
            health = None
        if health is None:
            raise ThawError(f"{self.host}/apis/v2beta1/healthz did not answer as the KFP API "
                            "does (a login page? set KFP_TOKEN); check --host, e.g. "
                            "https://kubeflow.example.com/pipeline")
        if health.tag is None:
            print(f"thaw: warning: the Kubeflow Pipelines version at {self.host} cannot be "
                  f"known ({health.answered_by} does not report it: official API-server images "
                  f"before 2.16.0 say 'unknown'); thaw needs >= {min_backend}, and an older "
                  "backend refuses the run when it starts", file=sys.stderr)
            return "(version unknown)", health.multi_user
        found, needed = parse_version(health.tag), parse_version(min_backend)
        if needed is not None and found is not None and found < needed:
            raise ThawError(f"the Kubeflow Pipelines backend at {self.host} is {health.tag}; "
                            f"thaw needs >= {min_backend}: upgrade Kubeflow Pipelines")
        return health.tag, health.multi_user

    def _client(self, token: str | None, token_file: Path | None) -> Any:
        import kfp

        credentials = None
        if token_file is not None:  # re-read on every call: projected tokens rotate
            from kfp.client.set_volume_credentials import ServiceAccountTokenVolumeCredentials

            credentials = ServiceAccountTokenVolumeCredentials(str(token_file))
        with warnings.catch_warnings(), self.errors("connecting"):
            warnings.simplefilter("ignore", FutureWarning)
            return kfp.Client(host=self.host, namespace=self.namespace or "kubeflow",
                              existing_token=token, credentials=credentials,
                              ui_host=self.ui_host)

    def errors(self, what: str) -> contextlib.AbstractContextManager[None]:
        return api_errors(what, self.host)

    def call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` with API errors as ThawError and the SDK's prints (links
        it prints for notebooks) kept off the terminal."""
        with self.errors(what), contextlib.redirect_stdout(io.StringIO()):
            return fn(*args, **kwargs)

    def run_url(self, run_id: str) -> str:
        return f"{self.ui_host}/#/runs/details/{run_id}"

    # -- pipelines --------------------------------------------------------------------
    def pipeline_version(self, compiled: CompiledPipeline, pipeline_name: str,
                         description: str) -> PipelineVersion:
        """The version of ``pipeline_name`` holding exactly ``compiled``: found by its name
        (the spec's hash), uploaded only if missing; the pipeline is created if missing."""
        pipeline_id = self._find_pipeline(pipeline_name) or self._create_pipeline(pipeline_name)
        found = self._find_version(pipeline_id, compiled.version_name)
        if found:
            return PipelineVersion(pipeline_id, found, compiled.version_name, created=False)
        import kfp_server_api

        with tempfile.TemporaryDirectory(prefix="thaw-upload-") as tmp:
            try:
                version = self.call(f"uploading pipeline version {compiled.version_name}",
                                    self._upload, compiled.write(Path(tmp)), pipeline_id,
                                    compiled.version_name, description)
            except ThawError as err:  # uploaded at the same moment by another submit?
                found = self._find_version(pipeline_id, compiled.version_name)
                if not found or not isinstance(err.__cause__, kfp_server_api.ApiException):
                    raise
                return PipelineVersion(pipeline_id, found, compiled.version_name, created=False)
        return PipelineVersion(pipeline_id, version.pipeline_version_id, compiled.version_name,
                               created=True)

    def _upload(self, path: Path, pipeline_id: str, name: str, description: str) -> Any:
        return self.client.upload_pipeline_version(str(path), name, pipeline_id=pipeline_id,
                                                   description=description)

    def _find_pipeline(self, name: str) -> str | None:
        answer = self.call(f"looking up pipeline {name}", self.client.list_pipelines,
                           filter=name_filter(name), namespace=self.namespace, page_size=100)
        found = [p.pipeline_id for p in answer.pipelines or [] if p.display_name == name]
        if len(found) > 1:
            raise ThawError(f"{len(found)} pipelines are named {name!r}: {found}; "
                            "pass --pipeline-name to use another name")
        return found[0] if found else None

    def _create_pipeline(self, name: str) -> str:
        import kfp_server_api

        body = kfp_server_api.V2beta1Pipeline(
            display_name=name, namespace=self.namespace,
            description="thaw: staged transfer learning (versions named by spec hash)")
        try:
            created = self.call(f"creating pipeline {name}",
                                self.client.pipelines.pipeline_service_create_pipeline,
                                pipeline=body)
        except ThawError:
            found = self._find_pipeline(name)  # created at the same moment elsewhere?
            if found is None:
                raise
            return found
        return created.pipeline_id

    def _find_version(self, pipeline_id: str, name: str) -> str | None:
        answer = self.call(f"looking up pipeline version {name}",
                           self.client.list_pipeline_versions, pipeline_id=pipeline_id,
                           filter=name_filter(name), page_size=100)
        for version in answer.pipeline_versions or []:
            if name in (version.display_name, version.name):
                return version.pipeline_version_id
        return None

    def version_name(self, pipeline_id: str, version_id: str) -> str:
        try:
            version = self.call("reading a pipeline version", self.client.get_pipeline_version,
                                pipeline_id, version_id)
        except ThawError:
            return version_id
        return version.display_name or version.name or version_id

    # -- experiments and runs ---------------------------------------------------------
    def experiment_id(self, name: str) -> str:
        experiment = self.call(f"getting experiment {name}", self.client.create_experiment,
                               name, namespace=self.namespace)
        return experiment.experiment_id

    def start_run(self, experiment_id: str, run_name: str, version: PipelineVersion,
                  parameters: dict[str, Any], pipeline_root: str | None) -> str:
        """Start a run of ``version``; ``pipeline_root`` (the compiled spec's) is sent as
        ``runtime_config.pipeline_root``, since the backend takes a run's root from there, else
        from the kfp-launcher ConfigMap, else ``minio://mlpipeline/v2/artifacts``, and never
        from the spec (``backend/src/v2/driver/root_dag.go``, 2.14.0-2.17.0)."""
        run = self.call("starting the run", self.client.run_pipeline, experiment_id,
                        run_name, params=parameters, pipeline_id=version.pipeline_id,
                        version_id=version.version_id, pipeline_root=pipeline_root)
        return run.run_id

    def follow(self, run_id: str, tasks: list[SpecTask], *, poll_s: float,
               timeout_s: float | None, echo: Callable[[str], None]) -> Any:
        """Poll the run until it ends, echoing a line whenever one of ``tasks`` (the compiled
        spec's) changes state; return the final run (``V2beta1Run``)."""
        seen: dict[str, str] = {}
        started = time.monotonic()
        failures = 0
        while True:
            try:
                run = self.call("following the run", self.client.get_run, run_id)
                failures = 0
            except ThawError as err:  # a gateway hiccup must not end hours of following
                failures += 1
                if failures > FOLLOW_RETRIES:
                    raise ThawError(f"{err} ({failures} times in a row; the run goes on: "
                                    f"{self.run_url(run_id)})") from err
                echo(f"  (KFP API error, looking again: {err})")
                time.sleep(poll_s)
                continue
            for stage in stages(run, tasks):
                state = stage.describe()
                if stage.state is not None and seen.get(stage.task.name) != state:
                    seen[stage.task.name] = state
                    echo(f"  {time.strftime('%H:%M:%S')} {stage.task.title:<40} {state}")
            if run.state in FINAL_STATES:
                return run
            if timeout_s is not None and time.monotonic() - started > timeout_s:
                raise ThawError(f"run {run_id} is still {run.state} after {timeout_s:.0f} s; "
                                f"follow it at {self.run_url(run_id)}")
            time.sleep(poll_s)


def name_filter(name: str) -> str:
    """The v2beta1 list filter for ``display_name == name``."""
    return json.dumps({"predicates": [{"operation": "EQUALS", "key": "display_name",
                                       "stringValue": name}]})


def _read(path: Path | None) -> str | None:
    return path.read_text().strip() if path is not None else None
