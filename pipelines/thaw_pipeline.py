"""The staged transfer-learning pipeline:
preprocess -> probe -> partial -> full -> evaluate -> register, inside an exit handler that
closes the MLflow parent run as failed when any step fails. With ``lora`` on, a LoRA stage
trains from the probe too (beside partial and full: one more candidate for register)."""

from pathlib import Path

from kfp import compiler, dsl, kubernetes

from components import build_components
from pipelines.settings import GPU_STEPS, S3_CHECKSUM_ENV, ClusterSettings
from thaw.config import DEFAULT_STAGES, DISTRIBUTED_ENV
from thaw.config import PIPELINE_DEFAULTS as D

PIPELINE_NAME = "thaw-staged-transfer"
# The oldest Kubeflow Pipelines backend that runs the compiled spec as written, read in
# kubeflow/pipelines at the release tags (tests/pipeline/test_backend_compat.py parses the spec
# with each release's protos). 2.5.0 (the release before; Kubeflow 1.10.1 and 1.10.2 ship it)
# refuses the run: its Argo compiler knows no task final status, the exit handler's input
# (backend/src/v2/compiler/argocompiler/dag.go: "task final status not supported yet"), and it
# reads retry policies from the root DAG only, so no step inside the exit handler would be
# retried (container.go; kubeflow/pipelines#11908). 2.14.x parses the Kubernetes platform spec
# strictly and lacks SecretAsEnv/ConfigMapAsEnv.optional (added in 2.15.0, #12216, #12495):
# _configure leaves out the SDK's `optional: false`, the default. Stated in README.md,
# infra/README.md and the spec's description.
MIN_KFP_BACKEND = "2.14.0"
STAGE_TITLES = {"probe": "probe: head only", "partial": "partial: last stage + head",
                "full": "full: all layers, discriminative LRs",
                "lora": "lora (if lora=true): adapters on attention/MLP + head"}
S3_SECRET_KEYS = {"AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID",
                  "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY"}
CONFIG_KEYS = ("MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION",
               "THAW_CHECKPOINT_URI")
DATA_PARALLEL_STAGES = ("partial", "full")


def _configure(task: dsl.PipelineTask, kind: str, cfg: ClusterSettings,
               gpus: int | None = None) -> dsl.PipelineTask:
    """Environment (from the Secret and ConfigMap, by name), resources, retries, caching
    and, for GPU steps only, the GPU request (``gpus``, default ``gpu.count``), node selector
    and tolerations."""
    for secret, keys in _secret_keys(cfg).items():
        kubernetes.use_secret_as_env(task, secret_name=secret,
                                     secret_key_to_env={k: k for k in keys})
    kubernetes.use_config_map_as_env(task, config_map_name=cfg.config_map,
                                     config_map_key_to_env={k: k for k in _config_keys(cfg)})
    for name, value in _literal_env(cfg).items():
        task.set_env_variable(name, value)
    step = cfg.step(kind)
    if step.cpu:
        task.set_cpu_limit(step.cpu)
    if step.memory:
        task.set_memory_limit(step.memory)
    if step.scratch:
        kubernetes.empty_dir_mount(task, volume_name="scratch", mount_path="/tmp",
                                   size_limit=step.scratch)
    if step.retry.num_retries:
        task.set_retry(num_retries=step.retry.num_retries,
                       backoff_duration=step.retry.backoff_duration,
                       backoff_factor=step.retry.backoff_factor,
                       backoff_max_duration=cfg.retry_window(kind))
    task.set_caching_options(step.cache)
    if kind in GPU_STEPS and cfg.gpu.count:
        task.set_accelerator_type(cfg.gpu.resource).set_accelerator_limit(gpus or cfg.gpu.count)
        for label, value in cfg.gpu.node_selector.items():
            kubernetes.add_node_selector(task, label_key=label, label_value=value)
        for tol in cfg.gpu.tolerations:
            kubernetes.add_toleration(task, key=tol.key, operator=tol.operator,
                                      value=tol.value, effect=tol.effect)
        # DataLoader workers share batches through /dev/shm, 64 MB by default in a pod.
        kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm",
                                   medium="Memory", size_limit=cfg.shm_size(kind))
    if gpus and gpus > 1:
        for name, value in DISTRIBUTED_ENV.items():
            task.set_env_variable(name, value)
    _omit_default_optional(task)
    return task


def _omit_default_optional(task: dsl.PipelineTask) -> None:
    """Drop the ``optional: false`` kfp-kubernetes writes into every secretAsEnv and
    configMapAsEnv entry. False is the proto default, and the backends that know the field
    (2.15.0 on) treat it absent as false (backend/src/v2/driver/k8s.go); 2.14.x does not know
    it and refuses the run (argocompiler/container.go parses the config strictly)."""
    config = task.platform_config["kubernetes"]
    for entry in (*config.get("secretAsEnv", []), *config.get("configMapAsEnv", [])):
        if entry.get("optional") is False:
            del entry["optional"]


def _secret_keys(cfg: ClusterSettings) -> dict[str, tuple[str, ...]]:
    """Secret name -> the keys a step reads from it, each as the environment variable of the
    same name: the S3 keys, and MLflow's credentials when ``mlflow_auth`` names their Secret.
    Never ``optional``: 2.14.x refuses the field, so a Secret is mapped only when it is set."""
    secrets = {cfg.s3_secret: tuple(S3_SECRET_KEYS)}
    if cfg.mlflow_auth is not None:
        secrets[cfg.mlflow_auth.secret] = (*secrets.get(cfg.mlflow_auth.secret, ()),
                                           *cfg.mlflow_auth.keys)
    return secrets


def _literal_env(cfg: ClusterSettings) -> dict[str, str]:
    """Environment written into the spec as values: botocore's checksum settings (literal, so a
    ConfigMap made before them, lacking the keys, cannot leave every pod Pending) and MLflow's
    URI when the settings give it."""
    env = dict.fromkeys(S3_CHECKSUM_ENV, cfg.s3_checksums)
    if cfg.mlflow_tracking_uri:
        env["MLFLOW_TRACKING_URI"] = cfg.mlflow_tracking_uri
    return env


def _config_keys(cfg: ClusterSettings) -> list[str]:
    """The ConfigMap keys a step reads (MLflow's URI is a literal when the settings give it)."""
    return [k for k in CONFIG_KEYS if not (k == "MLFLOW_TRACKING_URI" and cfg.mlflow_tracking_uri)]


def trainjob_spec(cfg: ClusterSettings) -> dict:
    """What a launcher step passes to ``thaw.cluster.launcher.train_on_trainjob``: the
    TrainJob's nodes get the pipeline's image, the train step's CPU, memory and scratch (per
    node, whatever its GPU count, as a train step's pod with ``gpus_per_node`` GPUs gets them:
    size ``steps.train`` for that many), the train step's /dev/shm size, the GPU scheduling, and
    the same environment as every step (Secrets and ConfigMap by reference, never values)."""
    env = [{"name": key, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}
           for secret, keys in _secret_keys(cfg).items() for key in keys]
    env += [{"name": key, "valueFrom": {"configMapKeyRef": {"name": cfg.config_map, "key": key}}}
            for key in _config_keys(cfg)]
    env += [{"name": name, "value": value} for name, value in _literal_env(cfg).items()]
    train, training = cfg.step("train"), cfg.training
    return {
        "image": cfg.image, "num_nodes": training.num_nodes,
        "gpus_per_node": training.gpus_per_node if cfg.gpu.count else 0,
        "gpu_resource": cfg.gpu.resource, "cpu": train.cpu, "memory": train.memory,
        **{key: value for key, value in (("scratch", train.scratch),
                                         ("shm_size", cfg.shm_size("train"))) if value},
        "env": env, "node_selector": dict(cfg.gpu.node_selector),
        "tolerations": [{k: v for k, v in vars(tol).items() if v is not None}
                        for tol in cfg.gpu.tolerations],
        "runtime": training.trainer_runtime,
        "start_timeout_s": training.start_timeout_s, "timeout_s": training.timeout_s,
    }


def _spread(stage: str, cfg: ClusterSettings) -> tuple[str, dict, int | None]:
    """(step kind, extra train arguments, GPUs per pod) of a training stage: the partial and
    full stages go data-parallel as ``cfg.training`` says; the probe never does."""
    training = cfg.training
    if stage not in DATA_PARALLEL_STAGES:
        return "train", {}, None
    if training.launches_trainjobs:
        return "launcher", {"trainjob": trainjob_spec(cfg)}, None
    if training.gpus_per_node > 1:
        return "train", {"gpus_per_node": training.gpus_per_node}, training.gpus_per_node
    return "train", {}, None


def build_pipeline(settings: ClusterSettings | None = None):
    """The pipeline function, wired for the cluster that ``settings`` describe."""
    cfg = settings or ClusterSettings()
    c = build_components(cfg.image)
    s = DEFAULT_STAGES

    @dsl.pipeline(name=PIPELINE_NAME, pipeline_root=cfg.pipeline_root,
                  description="Staged transfer learning: probe, unfreeze the last stage, "
                              "fine-tune all; evaluate every stage; register the best. "
                              f"Needs Kubeflow Pipelines >= {MIN_KFP_BACKEND}.")
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
        lora: bool = D.lora,
        lora_epochs: int = s["lora"].epochs,
        lora_lr: float = s["lora"].lr,
        augment: str = s["full"].augment,
        batch_size: int = D.batch_size,
        seed: int = D.seed,
        max_bad_fraction: float = D.max_bad_fraction,
        num_workers: int = D.num_workers,
        preprocess_workers: int = D.preprocess_workers,
        image_format: str = D.image_format,
        shard_uri: str = D.shard_uri,
        mlflow_experiment: str = D.mlflow_experiment,
        model_name: str = D.model_name,
        selection_metric: str = D.selection_metric,
        promotion_margin: float = D.promotion_margin,
        promote_on_class_change: bool = D.promote_on_class_change,
    ):
        """Staged transfer learning, every stage evaluated, the best registered.

        Args:
            data_uri: Dataset: s3://bucket/prefix (or a path) in ImageFolder layout,
                <class>/<image> or train|val|test/<class>/<image>, or Fashion-MNIST idx files.
            backbone: Any timm model name, e.g. resnet50 or efficientnet_lite0.
            weights: hub (timm pretrained), packaged (offline EfficientNet-Lite0), none, or a
                .pth/.safetensors path or s3:// URI.
            image_size: Input size the images are resized to once, and trained at.
            probe_epochs: Most epochs of the head-only probe (early stopping may end sooner).
            probe_lr: Head learning rate of the probe.
            partial_epochs: Most epochs with the last stage (ResNet layer4) unfrozen.
            partial_lr: Head learning rate of the partial stage (the backbone gets less).
            full_epochs: Most epochs of the full fine-tune.
            full_lr: Head learning rate of the full fine-tune; earlier layers get less. A stage
                shorter than the recipe's nominal length (nominal_epochs in thaw/config.py)
                peaks proportionally lower.
            lora: Also train a LoRA stage from the probe: low-rank adapters on the attention
                and MLP layers plus the head (ViT-like backbones), registered with merged
                weights if it wins. Partial and full still run.
            lora_epochs: Most epochs of the LoRA stage.
            lora_lr: Learning rate of the LoRA stage's head and adapters.
            augment: Augmentation of the partial, full and lora stages: crop (random resized
                crops), crop_flip (plus horizontal flips: wrong for text, digits and other
                mirror-sensitive images) or none.
            batch_size: Images per training step.
            seed: Seeds the split, the new head and every random draw.
            max_bad_fraction: Fail preprocessing when more files than this are unusable.
            num_workers: DataLoader worker processes of each training step (0: read in the
                training process).
            preprocess_workers: Processes that decode images in preprocess (the CPUs its
                pod gets).
            image_format: How the prepared set stores images: raw (decoded pixels, fastest,
                150 KB per image at 224 px) or jpeg (about 10 KB per image: large sets).
            shard_uri: With image_format=jpeg, an s3:// prefix to keep the shards at: steps
                then stream them through a bounded cache instead of copying the whole set.
                Empty: shards inside the prepared artifact.
            mlflow_experiment: MLflow experiment of the parent and stage runs.
            model_name: Registered model name; the winner may take alias champion.
            selection_metric: macro_f1, accuracy or loss (lower is better): chooses the
                stage on validation and gates champion.
            promotion_margin: How much the new model must beat the champion by, on this
                run's validation split.
            promote_on_class_change: Let a model with another class list replace the
                champion it cannot be compared with.
        """
        run_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER
        finalize = c.finalize(mlflow_experiment=mlflow_experiment, pipeline_run_id=run_id)
        _configure(finalize.set_display_name("close MLflow run"), "finalize", cfg)
        with dsl.ExitHandler(finalize, name="staged-transfer"):
            version = c.source_version(data_uri=data_uri)
            _configure(version.set_display_name("source version: list the data"),
                       "source_version", cfg).set_caching_options(False)
            # preprocess also checks the later steps' parameters, before it reads any data
            prep = c.preprocess(data_uri=data_uri, source_version=version.output,
                                backbone=backbone, image_size=image_size, seed=seed,
                                max_bad_fraction=max_bad_fraction, weights=weights,
                                probe_epochs=probe_epochs, probe_lr=probe_lr,
                                partial_epochs=partial_epochs, partial_lr=partial_lr,
                                full_epochs=full_epochs, full_lr=full_lr, lora=lora,
                                lora_epochs=lora_epochs, lora_lr=lora_lr, augment=augment,
                                batch_size=batch_size, selection_metric=selection_metric,
                                promotion_margin=promotion_margin,
                                num_workers=num_workers,
                                preprocess_workers=preprocess_workers,
                                image_format=image_format, shard_uri=shard_uri)
            _configure(prep.set_display_name("preprocess: validate, split, resize"),
                       "preprocess", cfg)

            def train_stage(stage: str, epochs, lr, previous: dsl.PipelineTask | None,
                            **options):
                # The probe keeps its own augmentation (none: it trains on cached features).
                fine_tune = ({"init_model": previous.outputs["model"], "augment": augment}
                             if previous else {})
                kind, spread, gpus = _spread(stage, cfg)
                task = c.train(stage=stage, prepared=prep.outputs["prepared"], backbone=backbone,
                               weights=weights, epochs=epochs, lr=lr, batch_size=batch_size,
                               seed=seed, num_workers=num_workers,
                               mlflow_experiment=mlflow_experiment,
                               pipeline_run_id=run_id, **fine_tune, **spread, **options)
                title = STAGE_TITLES[stage] + (
                    f" (TrainJob, {cfg.training.num_nodes} nodes)" if kind == "launcher" else "")
                return _configure(task.set_display_name(title), kind, cfg, gpus)

            probe = train_stage("probe", probe_epochs, probe_lr, None)
            partial = train_stage("partial", partial_epochs, partial_lr, probe)
            full = train_stage("full", full_epochs, full_lr, partial)
            # The LoRA stage starts from the probe, like partial. Its task is always there and
            # the parameter switches it on: behind a dsl.If its model could reach evaluate and
            # register only through dsl.OneOf, whose artifact form kfp.local (make demo,
            # run-local) cannot resolve (README, "lora").
            lora_stage = train_stage("lora", lora_epochs, lora_lr, probe, enabled=lora)
            models = {f"{stage}_model": task.outputs["model"] for stage, task in (
                ("probe", probe), ("partial", partial), ("full", full), ("lora", lora_stage))}
            evaluate = c.evaluate(prepared=prep.outputs["prepared"], **models)
            _configure(evaluate.set_display_name("evaluate: test split, every stage"),
                       "evaluate", cfg)

            register = c.register(report=evaluate.outputs["report"],
                                  prepared=prep.outputs["prepared"], **models,
                                  mlflow_experiment=mlflow_experiment, pipeline_run_id=run_id,
                                  model_name=model_name, selection_metric=selection_metric,
                                  promotion_margin=promotion_margin,
                                  promote_on_class_change=promote_on_class_change)
            _configure(register.set_display_name("register best stage"), "register", cfg)

    return thaw_pipeline


def compile_pipeline(output: Path, settings: ClusterSettings | None = None) -> Path:
    """Write the pipeline YAML that a person uploads in the Kubeflow UI."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(build_pipeline(settings), package_path=str(output))
    return output
