"""preprocess: validate, split and resize the source images once into a prepared dataset.

It also receives the parameters of the later steps and refuses bad ones before it reads
any data, so a run started from the Kubeflow UI with, say, ``full_lr=20`` fails here at
once with the parameter named, not in a GPU step after preprocessing.
"""

from kfp.dsl import Dataset, Markdown, Output


def preprocess(
    data_uri: str,
    source_version: str,
    backbone: str,
    image_size: int,
    seed: int,
    max_bad_fraction: float,
    weights: str,
    probe_epochs: int,
    probe_lr: float,
    partial_epochs: int,
    partial_lr: float,
    full_epochs: int,
    full_lr: float,
    lora: bool,
    lora_epochs: int,
    lora_lr: float,
    augment: str,
    batch_size: int,
    selection_metric: str,
    promotion_margin: float,
    num_workers: int,
    preprocess_workers: int,
    prepared: Output[Dataset],
    validation_report: Output[Markdown],
    image_format: str = "raw",
    shard_uri: str = "",
):
    import shutil
    from pathlib import Path

    from thaw.steps import preprocess_step

    checked = {"weights": weights, "probe_epochs": probe_epochs, "probe_lr": probe_lr,
               "partial_epochs": partial_epochs, "partial_lr": partial_lr,
               "full_epochs": full_epochs, "full_lr": full_lr, "lora": lora,
               "lora_epochs": lora_epochs, "lora_lr": lora_lr, "augment": augment,
               "batch_size": batch_size, "selection_metric": selection_metric,
               "promotion_margin": promotion_margin, "num_workers": num_workers,
               "preprocess_workers": preprocess_workers}
    summary = preprocess_step(data_uri, Path(prepared.path), arch=backbone,
                              image_size=image_size, seed=seed,
                              max_bad_fraction=max_bad_fraction, pipeline_parameters=checked,
                              num_workers=preprocess_workers, image_format=image_format,
                              shard_uri=shard_uri)
    shutil.copyfile(Path(prepared.path) / "validation_report.md", validation_report.path)
    prepared.metadata.update({"source_version": source_version,
                              "classes": summary["classes"],
                              "fingerprint": summary["fingerprint"],
                              "skipped_files": summary["skipped"]})
