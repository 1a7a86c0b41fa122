"""Bad pipeline parameters are refused before any expensive work, with the parameter and its
allowed values named: by the preprocess step before it lists or decodes a single image (a
run started from the Kubeflow UI), and by the CLI before it connects to anything."""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from thaw.errors import ThawError
from thaw.params import check_pipeline_parameters

CLI_TESTS = Path(__file__).resolve().parents[1] / "cli"


def _cli_fixtures():
    """tests/cli's KFP stand-in fixtures (its folder is importable only while its own tests
    are collected, so load its conftest by path)."""
    sys.path.insert(0, str(CLI_TESTS))
    spec = importlib.util.spec_from_file_location("cli_conftest", CLI_TESTS / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


_cli = _cli_fixtures()
kfp_env, standin, thaw = _cli.kfp_env, _cli.standin, _cli.thaw

# (override of the pipeline's defaults, words the error must contain)
BAD = [
    ({"probe_epochs": 0}, "probe_epochs must be >= 1, got 0"),
    ({"full_epochs": -2}, "full_epochs must be >= 1, got -2"),
    ({"partial_lr": 0.0}, "partial_lr must be in (0, 1], got 0.0"),
    ({"probe_lr": -1e-3}, "probe_lr must be in (0, 1], got -0.001"),
    ({"probe_lr": math.nan}, "probe_lr must be in (0, 1], got nan"),
    ({"full_lr": 20.0}, "full_lr must be in (0, 1], got 20.0"),
    ({"backbone": "resnet5O"}, "backbone must be a timm model name (timm.list_models() lists "
                               "them, e.g. resnet50, efficientnet_lite0), got 'resnet5O'"),
    ({"weights": "imagenet"}, "weights must be one of hub, packaged, none, or a path, s3:// or "
                              "file:// URI of a .pth/.pt/.safetensors/.bin file"),
    ({"weights": "gs://bucket/w.pth"}, "weights must be one of hub, packaged, none"),
    ({"weights": "packaged", "backbone": "resnet18"},
     "weights 'packaged' exists only for backbone 'efficientnet_lite0', not 'resnet18'"),
    ({"image_size": 16}, "image_size must be >= 32 pixels, got 16"),
    ({"backbone": "selecsls42", "image_size": 48},
     "image_size must be >= 64 pixels for 'selecsls42' (its total stride), got 48"),
    ({"backbone": "vit_tiny_patch16_224", "image_size": 100},
     "image_size must be a size 'vit_tiny_patch16_224' can take, got 100: not a multiple of "
     "its patch size 16"),
    ({"selection_metric": "f1"},
     "selection_metric must be one of macro_f1, accuracy, loss (loss: lower is better)"),
    ({"batch_size": 0}, "batch_size must be >= 1, got 0"),
    ({"num_workers": -1}, "num_workers must be >= 0, got -1"),
    ({"preprocess_workers": -1}, "preprocess_workers must be >= 0, got -1"),
    ({"augment": "flip"}, "augment must be one of ('none', 'crop', 'crop_flip'), got 'flip'"),
    ({"max_bad_fraction": 1.0}, "max_bad_fraction must be in [0, 1), got 1.0"),
    ({"max_bad_fraction": -0.1}, "max_bad_fraction must be in [0, 1), got -0.1"),
    ({"promotion_margin": -0.01}, "promotion_margin must be a number >= 0, got -0.01"),
    ({"image_format": "png"}, "image_format must be one of raw, jpeg, got 'png'"),
    ({"shard_uri": "s3://bucket/shards"}, "shard_uri must be an s3:// prefix and needs "
                                          "image_format=jpeg"),
    ({"image_format": "jpeg", "shard_uri": "/data/shards"}, "shard_uri must be an s3:// prefix"),
]


@pytest.fixture(scope="module")
def defaults() -> dict:
    """The compiled pipeline's own defaults, typed, as a run from the Kubeflow UI gets them."""
    from thawctl.compiled import cluster_settings, compile_spec

    return compile_spec(cluster_settings(None)).defaults


@pytest.mark.parametrize(("override", "words"), BAD)
def test_a_bad_parameter_is_refused_naming_it_and_its_allowed_values(defaults, override,
                                                                     words):
    with pytest.raises(ThawError, match="^invalid pipeline parameters: ") as err:
        check_pipeline_parameters({**defaults, **override})
    assert words in str(err.value)


@pytest.mark.parametrize("override", [
    {},
    {"backbone": "efficientnet_lite0", "weights": "packaged", "image_size": 64},
    {"backbone": "resnet50.a1_in1k", "weights": "s3://models/resnet50.safetensors"},
    {"weights": "file:///models/r50.pth", "image_size": 32, "selection_metric": "loss"},
    {"backbone": "vit_tiny_patch16_224", "image_size": 224, "augment": "crop_flip",
     "full_lr": 1.0, "max_bad_fraction": 0.0, "promotion_margin": 0.01},
    {"image_format": "jpeg", "shard_uri": "s3://bucket/thaw-shards"},
], ids=["defaults", "packaged", "hub-tag-s3-file", "file-uri", "vit", "streamed-jpeg"])
def test_good_parameters_pass(defaults, override):
    check_pipeline_parameters({**defaults, **override})


def test_every_problem_is_named_at_once(defaults):
    with pytest.raises(ThawError) as err:
        check_pipeline_parameters({**defaults, "probe_epochs": 0, "full_lr": 5.0,
                                   "backbone": "nope_net", "selection_metric": "f1"})
    for name in ("probe_epochs", "full_lr", "backbone", "selection_metric"):
        assert f"{name} must be" in str(err.value)


def test_an_unknown_backbone_gets_the_closest_timm_names(defaults):
    with pytest.raises(ThawError, match="close: .*resnet50"):
        check_pipeline_parameters({**defaults, "backbone": "resnet5O"})


# --- the preprocess step (what a run from the Kubeflow UI executes first) ------------------


# preprocess_step's own arguments; the rest reach it as ``pipeline_parameters``
OWN_ARGUMENTS = {"backbone": "arch", "image_size": "image_size",
                 "max_bad_fraction": "max_bad_fraction"}


@pytest.fixture
def undecodable_dir(tmp_path) -> Path:
    """Two classes of files named like images that no decoder can read: had preprocess
    decoded anything before checking its parameters, it would fail on these instead."""
    for label in ("cat", "dog"):
        (tmp_path / "data" / label).mkdir(parents=True)
        for i in range(4):
            (tmp_path / "data" / label / f"{i}.png").write_bytes(b"not an image")
    return tmp_path / "data"


@pytest.mark.parametrize(("override", "words"), BAD)
def test_preprocess_refuses_a_bad_parameter_before_decoding_an_image(
        defaults, undecodable_dir, tmp_path, override, words):
    from thaw.steps import preprocess_step

    params = {**defaults, **override}
    own = {arg: params.pop(name) for name, arg in OWN_ARGUMENTS.items()}
    out = tmp_path / "prepared"
    with pytest.raises(ThawError, match="^invalid pipeline parameters: ") as err:
        preprocess_step(str(undecodable_dir), out, seed=0, **own,
                        pipeline_parameters=params)
    assert words in str(err.value)
    assert not out.exists()


def test_preprocess_refuses_before_it_lists_the_data(tmp_path):
    """The source does not exist: listing it first would fail with another message."""
    from thaw.steps import preprocess_step

    with pytest.raises(ThawError, match="full_lr must be in") as err:
        preprocess_step(str(tmp_path / "no-such-data"), tmp_path / "prepared",
                        arch="efficientnet_lite0", image_size=64, seed=0,
                        max_bad_fraction=0.05, pipeline_parameters={"full_lr": 20.0})
    assert "does not exist" not in str(err.value)


def test_preprocess_decodes_nothing_when_its_own_parameters_are_bad(sample_dir, tmp_path):
    """Real, decodable images: with the check gone this would prepare them and succeed."""
    from thaw.steps import preprocess_step

    out = tmp_path / "prepared"
    with pytest.raises(ThawError, match="image_size must be >= 32 pixels, got 8"):
        preprocess_step(str(sample_dir), out, arch="efficientnet_lite0", image_size=8,
                        seed=0, max_bad_fraction=0.05)
    assert not out.exists()


def test_the_pipeline_hands_preprocess_every_parameter_it_checks(tmp_path):
    from pipelines.thaw_pipeline import compile_pipeline

    checked = {name for override, _ in BAD for name in override}
    spec = next(yaml.safe_load_all(compile_pipeline(tmp_path / "p.yaml").read_text()))
    tasks = spec["components"]["comp-exit-handler-1"]["dag"]["tasks"]
    wired = tasks["preprocess"]["inputs"]["parameters"]
    for name in checked:
        assert wired[name] == {"componentInputParameter": f"pipelinechannel--{name}"}, name


@pytest.mark.slow
def test_the_preprocess_component_fails_on_a_bad_parameter_through_kfp(tmp_path, capfd):
    """The component itself, run by kfp.local as a pod would run it."""
    import warnings

    from kfp import local

    from components import build_components

    warnings.filterwarnings("ignore", module="kfp.local")
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path))
    good = dict(data_uri=str(tmp_path / "no-such-data"), source_version="v",
                backbone="efficientnet_lite0", image_size=64, seed=0, max_bad_fraction=0.05,
                weights="packaged", probe_epochs=1, probe_lr=1e-3, partial_epochs=1,
                partial_lr=1e-3, full_epochs=1, full_lr=1e-3, lora=False, lora_epochs=1,
                lora_lr=1e-3, augment="crop", batch_size=8,
                selection_metric="macro_f1", promotion_margin=0.0, num_workers=0,
                preprocess_workers=0)
    with pytest.raises(RuntimeError, match="FAILURE"):
        build_components().preprocess(**{**good, "selection_metric": "f1"})
    log = capfd.readouterr()
    assert "ThawError: invalid pipeline parameters: selection_metric must be one of" in (
        log.out + log.err)
    assert "does not exist" not in log.out + log.err


# --- the command line: refused before connecting to anything -------------------------------


def _one_line_error(result) -> str:
    lines = result.err.strip().splitlines()
    assert result.code == 2 and len(lines) == 1, result
    assert lines[0].startswith("thaw: error: invalid pipeline parameters: ")
    return lines[0]


CLI_BAD = [
    (["--param", "full_lr=20"], "full_lr must be in (0, 1], got 20.0"),
    (["--param", "backbone=resnet5O"], "backbone must be a timm model name"),
    (["--param", "weights=packaged"],
     "weights 'packaged' exists only for backbone 'efficientnet_lite0', not 'resnet50'"),
    (["--param", "probe_epochs=0", "--param", "selection_metric=f1"],
     "probe_epochs must be >= 1, got 0; selection_metric must be one of macro_f1"),
]


# NaN is refused earlier on the command line: "nan" is not a number there
CLI_BAD_VALUES = [case for case in BAD
                  if not any(isinstance(v, float) and math.isnan(v) for v in case[0].values())]


@pytest.mark.parametrize(("override", "words"), CLI_BAD_VALUES)
def test_submit_refuses_a_bad_parameter_before_connecting(standin, thaw, override, words):
    args = [arg for name, value in override.items() for arg in ("--param", f"{name}={value}")]
    assert words in _one_line_error(thaw("submit", *args))
    assert standin.requests == []


@pytest.mark.parametrize(("args", "words"), CLI_BAD)
def test_submit_names_the_problem_against_the_defaults(standin, thaw, args, words):
    assert words in _one_line_error(thaw("submit", *args))
    assert standin.requests == []


def test_the_installed_command_exits_non_zero_without_a_traceback(tmp_path):
    """As a user runs it: a separate process, its stderr the one line of the error."""
    env = {**os.environ, "KFP_HOST": "http://127.0.0.1:9"}  # nothing listens there
    result = subprocess.run([sys.executable, "-m", "thawctl", "submit", "--param",
                             "full_epochs=0"], capture_output=True, text=True, cwd=tmp_path,
                            env=env, timeout=300)
    assert result.returncode == 2, result
    assert "full_epochs must be >= 1, got 0" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_bad_parameters_file_is_refused_too(standin, thaw, tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("backbone: efficientnet_lite0\nimage_size: 16\n")
    words = "image_size must be >= 32 pixels, got 16"
    assert words in _one_line_error(thaw("submit", "--params-file", str(params)))
    assert words in _one_line_error(thaw("schedule", "create", "nightly", "--cron",
                                         "0 0 3 * * *", "--params-file", str(params)))
    assert standin.requests == []


@pytest.mark.parametrize(("args", "words"), CLI_BAD)
def test_run_local_refuses_bad_parameters_before_anything_starts(thaw, monkeypatch, tmp_path,
                                                                 args, words):
    """No tracking server is set: anything past the check would fail on that instead."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    for isolated in ([], ["--isolated"]):
        assert words in _one_line_error(thaw("run-local", *isolated, *args))
    assert not (tmp_path / ".thaw").exists()


def test_demo_refuses_bad_parameters_before_starting_the_stack(thaw, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    try:
        result = thaw("demo", "--param", "image_size=16")  # efficientnet_lite0 at 16 px
        assert "image_size must be >= 32 pixels, got 16" in _one_line_error(result)
        assert not (tmp_path / ".thaw").exists()
    finally:  # had the check gone, the stack would be running: stop what this test started
        from thaw.stack import stack_down

        stack_down(tmp_path / ".thaw" / "stack")


def test_compile_refuses_a_spec_whose_defaults_are_bad(thaw, monkeypatch, tmp_path):
    import dataclasses

    import pipelines.thaw_pipeline as pipeline

    out = tmp_path / "thaw_pipeline.yaml"
    assert thaw("compile", "--output", str(out)).code == 0 and out.is_file()
    out.unlink()
    monkeypatch.setattr(pipeline, "D", dataclasses.replace(pipeline.D, selection_metric="f1"))
    words = "selection_metric must be one of macro_f1, accuracy, loss"
    assert words in _one_line_error(thaw("compile", "--output", str(out)))
    assert not out.exists()
