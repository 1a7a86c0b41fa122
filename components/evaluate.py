"""evaluate: every stage's best checkpoint on the held-out test split."""

from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output


def evaluate(
    prepared: Input[Dataset],
    probe_model: Input[Model],
    partial_model: Input[Model],
    full_model: Input[Model],
    report: Output[Artifact],
    test_metrics: Output[Metrics],
    lora_model: Input[Model] = None,
):
    import json
    from pathlib import Path

    from thaw.steps import evaluate_step

    stage_dirs = {"probe": Path(probe_model.path), "partial": Path(partial_model.path),
                  "full": Path(full_model.path),
                  **({"lora": Path(lora_model.path)} if lora_model is not None else {})}
    result = evaluate_step(Path(prepared.path), stage_dirs)
    Path(report.path).write_text(json.dumps(result, indent=2))
    for stage in result["stages"]:
        test_metrics.log_metric(f"{stage['stage']}_test_accuracy", stage["test"]["accuracy"])
        test_metrics.log_metric(f"{stage['stage']}_test_macro_f1", stage["test"]["macro_f1"])
