"""The staged transfer-learning pipeline:
preprocess -> probe -> partial -> full -> evaluate -> register, inside an exit handler that
closes the MLflow parent run as failed when any step fails."""

from pathlib import Path

from kfp import compiler, dsl, kubernetes

from components import DEFAULT_IMAGE, build_components
from thaw.config import DEFAULT_STAGES
from thaw.config import PIPELINE_DEFAULTS as D

PIPELINE_NAME = "thaw-staged-transfer"
STAGE_TITLES = {"probe": "probe: head only", "partial": "partial: last stage + head",
                "full": "full: all layers, discriminative LRs"}
# Cluster wiring (see infra/): S3 credentials from a Secret, endpoints from a ConfigMap.
S3_SECRET = "thaw-s3-credentials"
S3_SECRET_KEYS = {"AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID",
                  "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY"}
CONFIG_MAP = "thaw-config"
CONFIG_KEYS = {k: k for k in ("MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION")}


def _cluster_env(task: dsl.PipelineTask) -> dsl.PipelineTask:
    kubernetes.use_secret_as_env(task, secret_name=S3_SECRET, secret_key_to_env=S3_SECRET_KEYS)
    kubernetes.use_config_map_as_env(task, config_map_name=CONFIG_MAP,
                                     config_map_key_to_env=CONFIG_KEYS)
    return task


def build_pipeline(image: str = DEFAULT_IMAGE):
    """The pipeline function with every component running in container ``image``."""
    c = build_components(image)
    s = DEFAULT_STAGES

    @dsl.pipeline(name=PIPELINE_NAME,
                  description="Staged transfer learning: probe, unfreeze the last stage, "
                              "fine-tune all; evaluate every stage; register the best.")
    def thaw_pipeline(
        data_uri: str = D.data_uri,
        backbone: str = D.backbone,
        weights: str = D.weights,
        image_size: int = D.image_size,
        probe_epochs: int = s["probe"].epochs,
        probe_lr: float = s["probe"].lr,
        partial_epochs: int = s["partial"].epochs,
        partial_lr: float = s["partial"].lr,
        full_epochs: int = s["full"].epochs,
        full_lr: float = s["full"].lr,
        batch_size: int = D.batch_size,
        seed: int = D.seed,
        max_bad_fraction: float = D.max_bad_fraction,
        mlflow_experiment: str = D.mlflow_experiment,
        model_name: str = D.model_name,
        selection_metric: str = D.selection_metric,
        promotion_margin: float = D.promotion_margin,
    ):
        run_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER
        finalize = c.finalize(mlflow_experiment=mlflow_experiment, pipeline_run_id=run_id)
        finalize.set_display_name("close MLflow run").set_caching_options(False)
        _cluster_env(finalize)
        with dsl.ExitHandler(finalize, name="staged-transfer"):
            prep = c.preprocess(data_uri=data_uri, backbone=backbone, image_size=image_size,
                                seed=seed, max_bad_fraction=max_bad_fraction)
            prep.set_display_name("preprocess: validate, split, resize").set_caching_options(True)
            prep.set_cpu_limit("4").set_memory_limit("16G")
            _cluster_env(prep)

            previous = None
            trained = {}
            for stage, epochs, lr in (("probe", probe_epochs, probe_lr),
                                      ("partial", partial_epochs, partial_lr),
                                      ("full", full_epochs, full_lr)):
                warm_start = {"init_model": previous.outputs["model"]} if previous else {}
                task = c.train(stage=stage, prepared=prep.outputs["prepared"], backbone=backbone,
                               weights=weights, epochs=epochs, lr=lr, batch_size=batch_size,
                               seed=seed, mlflow_experiment=mlflow_experiment,
                               pipeline_run_id=run_id, **warm_start)
                task.set_display_name(STAGE_TITLES[stage]).set_caching_options(False)
                task.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(1)
                task.set_cpu_limit("8").set_memory_limit("32G")
                task.set_retry(num_retries=2, backoff_duration="60s", backoff_factor=2.0)
                kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm",
                                           medium="Memory")
                _cluster_env(task)
                trained[stage] = previous = task

            evaluate = c.evaluate(prepared=prep.outputs["prepared"],
                                  probe_model=trained["probe"].outputs["model"],
                                  partial_model=trained["partial"].outputs["model"],
                                  full_model=trained["full"].outputs["model"])
            evaluate.set_display_name("evaluate: test split, every stage")
            evaluate.set_caching_options(False)
            evaluate.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(1)
            evaluate.set_retry(num_retries=2, backoff_duration="30s")
            _cluster_env(evaluate)

            register = c.register(report=evaluate.outputs["report"],
                                  mlflow_experiment=mlflow_experiment, pipeline_run_id=run_id,
                                  model_name=model_name, selection_metric=selection_metric,
                                  promotion_margin=promotion_margin)
            register.set_display_name("register best stage").set_caching_options(False)
            _cluster_env(register)

    return thaw_pipeline


def compile_pipeline(output: Path, image: str = DEFAULT_IMAGE) -> Path:
    """Write the pipeline YAML that a person uploads in the Kubeflow UI."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(build_pipeline(image), package_path=str(output))
    return output
