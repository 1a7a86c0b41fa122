"""register: the best stage by validation metric into the MLflow registry, champion-gated
(the champion is scored on this run's prepared data, hence the ``prepared`` input). Its
``run_report`` (the run report, ``thaw.report``) shows in the Kubeflow UI's Visualizations."""

from kfp.dsl import (
    HTML,
    Artifact,
    ClassificationMetrics,
    Dataset,
    Input,
    Markdown,
    Metrics,
    Model,
    Output,
)


def register(
    report: Input[Artifact],
    prepared: Input[Dataset],
    probe_model: Input[Model],
    partial_model: Input[Model],
    full_model: Input[Model],
    mlflow_experiment: str,
    pipeline_run_id: str,
    model_name: str,
    selection_metric: str,
    promotion_margin: float,
    promote_on_class_change: bool,
    summary: Output[Markdown],
    chosen_metrics: Output[Metrics],
    confusion: Output[ClassificationMetrics],
    run_report: Output[HTML],
    lora_model: Input[Model] = None,
) -> str:
    import json
    from pathlib import Path

    from thaw.steps import register_step, summary_markdown

    stage_dirs = {"probe": Path(probe_model.path), "partial": Path(partial_model.path),
                  "full": Path(full_model.path),
                  **({"lora": Path(lora_model.path)} if lora_model is not None else {})}
    evaluated = json.loads(Path(report.path).read_text())
    outcome = register_step(
        evaluated, stage_dirs, Path(prepared.path),
        experiment=mlflow_experiment, pipeline_run_id=pipeline_run_id, model_name=model_name,
        selection_metric=selection_metric, promotion_margin=promotion_margin,
        promote_on_class_change=promote_on_class_change, report_file=Path(run_report.path),
    )
    Path(summary.path).write_text(summary_markdown(outcome))
    # The KFP UI shows the chosen stage: its test confusion matrix and numbers.
    chosen = next(s for s in evaluated["stages"] if s["stage"] == outcome["stage"])
    confusion.log_confusion_matrix(evaluated["classes"], chosen["test"]["confusion_matrix"])
    for split in ("val", "test"):
        for key in ("accuracy", "macro_f1"):
            chosen_metrics.log_metric(f"{outcome['stage']}_{split}_{key}", chosen[split][key])
    return outcome["model_uri"]
