"""register: the best stage by validation metric into the MLflow registry, champion-gated."""

from kfp.dsl import Artifact, Input, Markdown, Output


def register(
    report: Input[Artifact],
    mlflow_experiment: str,
    pipeline_run_id: str,
    model_name: str,
    selection_metric: str,
    promotion_margin: float,
    summary: Output[Markdown],
) -> str:
    import json
    from pathlib import Path

    from thaw.steps import register_step, summary_markdown

    outcome = register_step(
        json.loads(Path(report.path).read_text()), experiment=mlflow_experiment,
        pipeline_run_id=pipeline_run_id, model_name=model_name,
        selection_metric=selection_metric, promotion_margin=promotion_margin,
    )
    Path(summary.path).write_text(summary_markdown(outcome))
    return outcome["model_uri"]
