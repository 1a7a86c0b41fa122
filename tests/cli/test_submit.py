"""`thaw submit` through the real kfp client against the stand-in KFP API."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from kfp_standin import Frame, running

from pipelines.settings import load_settings
from pipelines.thaw_pipeline import MIN_KFP_BACKEND, PIPELINE_NAME, compile_pipeline

REPO = Path(__file__).resolve().parents[2]


def _compiled(tmp_path: Path, config: Path | None = None) -> str:
    return compile_pipeline(tmp_path / "expected.yaml", load_settings(config)).read_text()


def _one_line_error(result) -> str:
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("thaw: error: "), result.err
    return lines[0]


def test_submit_uploads_the_compiled_spec_and_starts_a_run(standin, thaw, tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("data_uri: s3://bucket/pets\nimage_size: 96\nfull_lr: 5.0e-4\n"
                      "backbone: resnet18\n")
    result = thaw("submit", "--params-file", str(params), "--param", "backbone=convnext_tiny",
                  "--param", "probe_epochs=3", "--param", "probe_lr=1e-3",
                  "--param", "model_name=123", "--param", "promote_on_class_change=true")
    assert result.code == 0, result.err

    # the pipeline exists once, with one version holding exactly what `thaw compile` writes
    (pipeline,) = standin.pipelines.values()
    assert pipeline["display_name"] == PIPELINE_NAME
    (version,) = standin.versions.values()
    assert version["pipeline_id"] == pipeline["pipeline_id"]
    assert version["display_name"].startswith("spec-")
    assert standin.specs[version["pipeline_version_id"]] == _compiled(tmp_path)

    # one run of that version, in experiment thaw, with the parameters typed as declared
    (run,) = standin.runs.values()
    assert run["pipeline_version_reference"] == {
        "pipeline_id": pipeline["pipeline_id"],
        "pipeline_version_id": version["pipeline_version_id"]}
    assert standin.experiments[run["experiment_id"]]["display_name"] == "thaw"
    sent = run["runtime_config"]["parameters"]
    assert sent == {"data_uri": "s3://bucket/pets", "image_size": 96, "full_lr": 0.0005,
                    "backbone": "convnext_tiny", "probe_epochs": 3, "probe_lr": 0.001,
                    "model_name": "123", "promote_on_class_change": True}
    assert type(sent["image_size"]) is int and type(sent["probe_epochs"]) is int
    assert type(sent["full_lr"]) is float and type(sent["probe_lr"]) is float
    assert type(sent["model_name"]) is str and sent["promote_on_class_change"] is True
    assert "pipeline_spec" not in run  # runs the uploaded version, not an inline copy
    assert f"{standin.url}/#/runs/details/{run['run_id']}" in result.out


def test_an_unchanged_spec_makes_no_new_version_a_changed_one_does(standin, thaw, tmp_path):
    assert thaw("submit").code == 0
    second = thaw("submit")
    assert second.code == 0, second.err
    assert "unchanged, already uploaded" in second.out
    assert len(standin.versions) == 1 and len(standin.runs) == 2
    assert len(standin.calls("POST", "pipelines/upload_version")) == 1
    assert not standin.calls("POST", "pipelines/upload")  # never the non-idempotent upload

    config = tmp_path / "cluster.yaml"
    config.write_text("image: registry.example.com/ml/thaw:0.2.0\n")
    third = thaw("submit", "--config", str(config))
    assert third.code == 0, third.err
    assert len(standin.versions) == 2 and len(standin.pipelines) == 1
    new = max(standin.versions)  # ids grow
    assert standin.specs[new] == _compiled(tmp_path, config)
    assert "registry.example.com/ml/thaw:0.2.0" in standin.specs[new]
    assert {v["display_name"] for v in standin.versions.values()} \
        == {line.split("version ")[1].split()[0] for line in (second.out + third.out)
            .splitlines() if line.startswith("pipeline ")}
    last_run = standin.runs[max(standin.runs)]
    assert last_run["pipeline_version_reference"]["pipeline_version_id"] == new

    # the image flag is a change too, and submitting it again is not
    assert thaw("submit", "--image", "registry.example.com/ml/thaw:0.3.0").code == 0
    assert thaw("submit", "--image", "registry.example.com/ml/thaw:0.3.0").code == 0
    assert len(standin.versions) == 3


def test_a_version_uploaded_meanwhile_by_another_submit_is_used(standin, thaw):
    standin.lose_upload_race = True  # the upload answers 409: the same name exists now
    result = thaw("submit")
    assert result.code == 0, result.err
    (version,) = standin.versions.values()
    (run,) = standin.runs.values()
    assert run["pipeline_version_reference"]["pipeline_version_id"] \
        == version["pipeline_version_id"]


def test_a_params_file_must_be_a_mapping(standin, thaw, tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("- data_uri\n")
    result = thaw("submit", "--params-file", str(params))
    assert result.code == 2 and "expected a mapping" in _one_line_error(result)


def _stage_lines(out: str) -> list[tuple[str, str]]:
    """(stage title, state) of each task line --wait echoed."""
    line = re.compile(r"(?m)^  \d\d:\d\d:\d\d (.+?) +([A-Z_]+(?: \(.*\))?)$")
    return [(m[1], m[2]) for m in line.finditer(out)]


def test_wait_follows_the_stages_and_exits_0_on_success(standin, thaw):
    """Task details as the API server fills them from Argo nodes (display names
    ``source-version``, ``preprocess-driver``, ``executor``...: backend/src/apiserver/server/
    api_converter.go@2.14.0..2.17.0) are shown as thaw's stages, by the spec's display names."""
    standin.run_frames = [
        Frame("PENDING"),
        Frame("RUNNING", {"source-version": "Running"}),
        Frame("RUNNING", {"source-version": "Succeeded", "preprocess": "Running"}),
        Frame("RUNNING", {"source-version": "Succeeded", "preprocess": "Running"}),
        Frame("SUCCEEDED", {"source-version": "Succeeded", "preprocess": "Succeeded"}),
    ]
    result = thaw("submit", "--wait", "--poll-interval", "0.01")
    assert result.code == 0, result.err
    assert _stage_lines(result.out) == [  # within one look, in the spec's task order
        ("source version: list the data", "RUNNING"),
        ("preprocess: validate, split, resize", "RUNNING"),
        ("source version: list the data", "SUCCEEDED"),
        ("preprocess: validate, split, resize", "SUCCEEDED")]
    assert "SUCCEEDED" in result.out.splitlines()[-1]
    assert len(standin.calls("GET", r"runs/[^/]+")) == 5


def test_wait_rides_out_api_errors_but_not_endless_ones(standin, thaw):
    standin.run_frames = [Frame("RUNNING", {"preprocess": "Running"}),
                          Frame("SUCCEEDED", {"preprocess": "Succeeded"})]
    standin.run_get_outages = 3
    result = thaw("submit", "--wait", "--poll-interval", "0.01")
    assert result.code == 0, result.err
    assert result.out.count("KFP API error, looking again") == 3

    standin.run_get_outages = 100
    result = thaw("submit", "--wait", "--poll-interval", "0.01")
    assert result.code == 2
    line = _one_line_error(result)
    assert "503" in line and "6 times in a row" in line and "the run goes on" in line


def test_wait_gives_up_after_the_timeout(standin, thaw):
    standin.run_frames = [Frame("RUNNING", {"preprocess": "Running"})]
    result = thaw("submit", "--wait", "--poll-interval", "0.01", "--timeout", "0.05")
    assert result.code == 2
    assert "still RUNNING after" in _one_line_error(result)


def test_an_old_backend_is_refused_before_anything_is_sent(kfp_env, thaw, monkeypatch):
    with running(version="2.2.0") as old:
        monkeypatch.setenv("KFP_HOST", old.url)
        result = thaw("submit")
    assert result.code == 2
    line = _one_line_error(result)
    assert "2.2.0" in line and f">= {MIN_KFP_BACKEND}" in line
    assert {r.path for r in old.requests} == {"/apis/v2beta1/healthz"}


@pytest.mark.parametrize("tag", [MIN_KFP_BACKEND, f"v{MIN_KFP_BACKEND}",
                                 f"{MIN_KFP_BACKEND}-rc.1", "2.17.0"])
def test_backends_at_or_above_the_minimum_are_accepted(kfp_env, thaw, monkeypatch, tag):
    with running(version=tag) as server:
        monkeypatch.setenv("KFP_HOST", server.url)
        result = thaw("submit")
    assert result.code == 0, result.err


def test_bearer_token_from_env_or_the_service_account_file(kfp_env, thaw, monkeypatch,
                                                           tmp_path):
    with running(token="s3cret") as server:
        monkeypatch.setenv("KFP_HOST", server.url)
        refused = thaw("submit")
        assert refused.code == 2 and "401" in _one_line_error(refused)

        monkeypatch.setenv("KFP_TOKEN", "s3cret")
        assert thaw("submit").code == 0
        monkeypatch.delenv("KFP_TOKEN")

        token_file = tmp_path / "token"
        token_file.write_text("s3cret\n")
        monkeypatch.setenv("KF_PIPELINES_SA_TOKEN_PATH", str(token_file))
        assert thaw("submit").code == 0
        assert len(server.runs) == 2
        authorized = [r for r in server.requests if r.authorization == "Bearer s3cret"]
        assert len(authorized) == len(server.requests) - 1  # all but the refused healthz

        monkeypatch.setenv("KF_PIPELINES_SA_TOKEN_PATH", str(tmp_path / "missing"))
        assert "is not a file" in _one_line_error(thaw("submit"))


def test_multi_user_namespace_reaches_pipeline_experiment_and_list(kfp_env, thaw,
                                                                   monkeypatch):
    with running(multi_user=True) as server:
        monkeypatch.setenv("KFP_HOST", server.url)
        assert thaw("submit", "--namespace", "team-a").code == 0
        assert thaw("submit", "--namespace", "team-a").code == 0
        (pipeline,) = server.pipelines.values()
        (experiment,) = server.experiments.values()
        assert pipeline["namespace"] == experiment["namespace"] == "team-a"
        assert len(server.versions) == 1
        result = thaw("submit")
        assert result.code == 2 and "multi-user: pass --namespace" in _one_line_error(result)


@pytest.mark.parametrize("args, words", [
    (["--param", "nope=1"], "unknown pipeline parameter(s) ['nope']"),
    (["--param", "image_size=big"], "parameter image_size must be an integer, got 'big'"),
    (["--param", "image_size=96.5"], "parameter image_size must be an integer"),
    (["--param", "promote_on_class_change=maybe"], "must be true or false"),
    (["--param", "probe_lr"], "must look like name=value"),
    (["--config", "/nonexistent/cluster.yaml"], "cannot read cluster settings"),
])
def test_bad_input_is_refused_before_connecting(standin, thaw, args, words):
    result = thaw("submit", *args)
    assert result.code == 2
    assert words in _one_line_error(result)
    assert standin.requests == []


def test_unreachable_or_missing_host(kfp_env, thaw):
    result = thaw("submit", "--host", "http://127.0.0.1:9")
    assert result.code == 2 and "cannot reach the KFP API" in _one_line_error(result)
    result = thaw("submit")
    assert result.code == 2 and "pass --host" in _one_line_error(result)


def test_a_host_that_is_not_the_kfp_api(kfp_env, thaw, httpserver):
    httpserver.expect_request("/apis/v2beta1/healthz").respond_with_data(
        "<html>Sign in</html>", content_type="text/html")
    result = thaw("submit", "--host", httpserver.url_for("/").rstrip("/"))
    assert result.code == 2 and "did not answer as the KFP API does" in _one_line_error(result)


def test_submit_needs_no_training_dependencies():
    """train.yml installs thaw without its dependencies, plus kfp: the CLI, compiling and
    the KFP calls must not import torch and the rest."""
    from thawctl.compiled import cluster_settings, compile_spec

    code = ("import sys\n"
            "from thawctl.cli import build_parser\n"
            "from thawctl.compiled import cluster_settings, compile_spec\n"
            "import thawctl.kfp_api, thawctl.schedule, kfp\n"
            "build_parser(); compiled = compile_spec(cluster_settings(None))\n"
            "heavy = {'torch', 'timm', 'mlflow', 'boto3', 'numpy'} & set(sys.modules)\n"
            "assert not heavy, heavy\n"
            "print(compiled.version_name)\n")
    done = subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, text=True,
                          capture_output=True, env={**os.environ, "PYTHONHASHSEED": "12345"})
    # another process compiles the same spec: the version name (idempotency) holds across runs
    assert done.stdout.strip() == compile_spec(cluster_settings(None)).version_name


def test_the_compiled_spec_declares_every_parameter_submit_types():
    from thawctl.compiled import cluster_settings, compile_spec

    compiled = compile_spec(cluster_settings(None))
    spec = next(yaml.safe_load_all(compiled.text))
    assert compiled.parameter_types["image_size"] == "NUMBER_INTEGER"
    assert set(compiled.parameter_types) == set(spec["root"]["inputDefinitions"]["parameters"])
    assert compiled.version_name == f"spec-{compiled.sha256[:16]}"
