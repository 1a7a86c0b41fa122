"""What a person sees of a run names the training steps by their stage (probe, partial, full),
as the KFP UI does through their display names, although KFP names the tasks of the one
train component ``train``, ``train-2``, ``train-3`` (``Pipeline.add_task``,
kfp/dsl/pipeline_context.py, kfp 2.17.0) and ``kfp.local`` prints those
(``task_dispatcher.py``: "Executing task 'train-2'")."""


import shutil
from pathlib import Path

import pytest
import yaml
from kfp import compiler, dsl, local

from pipelines.thaw_pipeline import build_pipeline
from thawctl.console import kfp_local_console
from thawctl.fidelity import ClusterPlay, FidelityRunner
from thawctl.kfp_tasks import spec_tasks
from thawctl.local_run import local_step_names
from thawctl.sandbox import Sandbox

STAGES = ("probe", "partial", "full")


@dsl.component(base_image="python:3.11")
def train(stage: str, epochs: int) -> str:
    print(f"{stage} epoch 1/{epochs}: val_macro_f1 0.5")
    return stage


@dsl.pipeline(name="three-stages")
def three_stages(epochs: int = 1):
    previous = None
    for stage in STAGES:
        task = train(stage=stage, epochs=epochs).set_display_name(f"{stage}: a stage")
        task.set_caching_options(False)  # the fidelity runner would keep its cache on S3
        if previous is not None:
            task.after(previous)
        previous = task


def test_thaws_pipeline_names_its_training_tasks_by_stage(tmp_path: Path) -> None:
    """From the pipeline function (as run-local runs it) and from its compiled YAML (as the
    fidelity runner and `thaw submit` read it) alike."""
    pipeline = build_pipeline()
    names = local_step_names(pipeline)
    assert [names[task] for task in ("train", "train-2", "train-3")] == list(STAGES)
    assert names["preprocess"] == "preprocess" and names["register"] == "register"
    compiler.Compiler().compile(pipeline, package_path=str(tmp_path / "p.yaml"))
    spec = next(yaml.safe_load_all((tmp_path / "p.yaml").read_text()))
    assert {task.name: task.step for task in spec_tasks(spec)} == names


@pytest.mark.filterwarnings("ignore:Task .* have no effect in the current local runner")
def test_kfp_local_step_lines_and_logs_say_the_stage(tmp_path: Path) -> None:
    """The real kfp.local (SubprocessRunner, this environment) runs a pipeline of three
    tasks of one component; the console names them by stage, lines and log files."""
    local.init(runner=local.SubprocessRunner(use_venv=False),
               pipeline_root=str(tmp_path / "root"))
    lines: list[str] = []
    logs = tmp_path / "logs"
    with kfp_local_console(logs, echo=lines.append, names=local_step_names(three_stages)):
        three_stages(epochs=2)
    started = [line.split()[1] for line in lines if line.startswith("▶")]
    assert started == list(STAGES), lines
    assert [line.split()[1] for line in lines if line.startswith("✔")] == list(STAGES)
    assert "    partial epoch 1/2  val_macro_f1 0.5" in lines
    assert sorted(p.name for p in logs.iterdir()) == sorted(f"{s}.log" for s in STAGES)
    assert "full epoch 1/2" in (logs / "full.log").read_text()
    assert not any("train" in line for line in lines), lines


@pytest.mark.fidelity
@pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed")
def test_the_fidelity_runner_names_logs_by_stage(tmp_path: Path) -> None:
    compiler.Compiler().compile(three_stages, package_path=str(tmp_path / "p.yaml"))
    lines: list[str] = []
    runner = FidelityRunner(Sandbox.detect("bwrap"), ClusterPlay(),
                            pipeline_root="s3://unused/root", work_dir=tmp_path / "work",
                            echo=lines.append)
    result = runner.run(tmp_path / "p.yaml")
    assert result.state == "SUCCEEDED", lines
    assert sorted(Path(t.log).name for t in result.tasks.values()) == \
        sorted(f"{s}.log" for s in STAGES)
    assert any(line.startswith("▶ partial: a stage") and line.endswith("partial.log)")
               for line in lines), lines
