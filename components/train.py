"""train: one stage of the recipe (probe, partial, full, or the optional lora); the stage name
picks its defaults (lora: adapters + head, its checkpoint merged: ``thaw.training.lora``).

``augment`` empty keeps the stage's own (the probe trains on cached features: none).
``gpus_per_node`` > 1: data-parallel in this pod, one torchrun process per GPU. ``trainjob``
given (``num_nodes`` > 1 at compile time): this step only launches a Kubeflow Trainer TrainJob
that trains the stage on several nodes, follows it and hands its model on. ``enabled`` false
(the ``lora`` pipeline parameter) leaves an optional stage off: its model output then only says
so, and evaluate and register leave the stage out."""

from kfp.dsl import Dataset, Input, Metrics, Model, Output


def train(
    stage: str,
    prepared: Input[Dataset],
    backbone: str,
    weights: str,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    mlflow_experiment: str,
    pipeline_run_id: str,
    model: Output[Model],
    metrics: Output[Metrics],
    init_model: Input[Model] = None,
    augment: str = "",
    num_workers: int = 0,
    gpus_per_node: int = 1,
    trainjob: dict = None,
    enabled: bool = True,
):
    from pathlib import Path

    if not enabled:  # an optional stage (lora) this run leaves off: no training, no GPU work
        from thaw.steps import stage_off_step

        stage_off_step(Path(model.path), stage)
        model.metadata.update({"stage": stage, "trained": False})
        return

    step = {"stage": stage, "arch": backbone, "weights": weights,
            "experiment": mlflow_experiment, "pipeline_run_id": pipeline_run_id,
            "settings": {"epochs": epochs, "lr": lr, "batch_size": batch_size, "seed": seed,
                         "num_workers": num_workers,
                         **({"augment": augment} if augment else {})}}
    if trainjob:
        from thaw.cluster.launcher import train_on_trainjob

        result = train_on_trainjob(
            prepared_uri=prepared.uri, out_dir=Path(model.path), job=trainjob,
            init_uri=init_model.uri if init_model is not None else None, **step)
    else:
        from thaw.steps import train_step

        result = train_step(
            Path(prepared.path), Path(model.path), processes=gpus_per_node,
            init_dir=Path(init_model.path) if init_model is not None else None, **step)
    for name, value in result["best_val"].items():
        metrics.log_metric(f"val_{name}", value)
    metrics.log_metric("best_epoch", result["best_epoch"])
    metrics.log_metric("train_images_per_sec", result["train_images_per_sec"])
    model.metadata.update({"stage": stage, "backbone": backbone,
                           "best_epoch": result["best_epoch"], **result["best_val"]})
