"""finalize: the exit handler; closes the MLflow parent run as finished or failed."""

from kfp.dsl import PipelineTaskFinalStatus


def finalize(mlflow_experiment: str, pipeline_run_id: str, status: PipelineTaskFinalStatus):
    from thaw.tracking import finish_parent_run, pipeline_succeeded

    succeeded = pipeline_succeeded(status.state)
    finish_parent_run(mlflow_experiment, pipeline_run_id, succeeded=succeeded,
                      message="" if succeeded else (status.error_message or status.state))
