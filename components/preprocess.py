"""preprocess: validate, split and resize the source images once into a prepared dataset."""

from kfp.dsl import Dataset, Markdown, Output


def preprocess(
    data_uri: str,
    source_version: str,
    backbone: str,
    image_size: int,
    seed: int,
    max_bad_fraction: float,
    prepared: Output[Dataset],
    validation_report: Output[Markdown],
):
    import shutil
    from pathlib import Path

    from thaw.steps import preprocess_step

    summary = preprocess_step(data_uri, Path(prepared.path), arch=backbone,
                              image_size=image_size, seed=seed,
                              max_bad_fraction=max_bad_fraction)
    shutil.copyfile(Path(prepared.path) / "validation_report.md", validation_report.path)
    prepared.metadata.update({"source_version": source_version,
                              "classes": summary["classes"],
                              "fingerprint": summary["fingerprint"],
                              "skipped_files": summary["skipped"]})
