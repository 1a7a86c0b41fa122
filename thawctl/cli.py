"""`thaw` command line: compile, run-local, demo, stack, prepare, submit, schedule."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from thaw.errors import ThawError

LOCAL_ROOT = Path(".thaw")


def _compile(args: argparse.Namespace) -> int:
    from thawctl.compiled import checked_parameters, cluster_settings, compile_spec

    settings = cluster_settings(args.config, args.image)
    compiled = compile_spec(settings)
    checked_parameters({}, compiled)  # the defaults the Kubeflow UI will offer
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(compiled.text)
    print(f"wrote {args.output} (image {settings.image}): upload it in the Kubeflow UI")
    return 0


def _parameters(pairs: list[str], base: dict[str, Any] | None = None) -> dict[str, Any]:
    """``--param name=value`` pairs over ``base``, typed as the pipeline declares them and
    checked (``thaw.params``) before anything starts."""
    from thawctl.compiled import checked_parameters, cluster_settings, compile_spec, split_pairs

    raw = {**(base or {}), **split_pairs(pairs)}
    return checked_parameters(raw, compile_spec(cluster_settings(None)))


def _print_outcome(outcome: dict, ui_url: str | None) -> None:
    """The run's result and, with the MLflow UI at ``ui_url``, the links that open on it."""
    from thaw.steps import summary_markdown
    from thawctl.mlflow_ui import answer_links

    run = outcome.get("pipeline_run")
    if run is not None:
        print(f"\npipeline run {run.run_id}: {run.state}")
        for task in run.tasks.values():
            if task.attempts or task.state == "CACHED":
                print(f"  {task.display_name:<40} {task.state:<9} attempts {task.attempts} "
                      f"{task.seconds:6.0f} s")
    print("\n" + summary_markdown(outcome))
    print(f"Serve it:  mlflow models serve -m '{outcome['model_uri']}'  "
          f"(or models:/{outcome['model_name']}@champion)")
    if ui_url:
        links = answer_links(ui_url, outcome)
        print(f"\nStage comparison (MLflow): {links.comparison}"
              f"\nAll runs of the experiment: {links.experiment}")


def _run_local(args: argparse.Namespace) -> int:
    from thawctl.local_run import run_isolated, run_local

    parameters = _parameters(args.param)
    if args.isolated:
        outcome = run_isolated(parameters, LOCAL_ROOT / "isolated",
                               engine=args.engine, image=args.image,
                               settings_file=args.config)
    else:
        outcome = run_local(parameters, LOCAL_ROOT / "local_outputs")
    tracking_uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    _print_outcome(outcome, tracking_uri if tracking_uri.startswith("http") else None)
    return 0


def _demo(args: argparse.Namespace) -> int:
    import shutil

    from thaw.stack import stack_up
    from thawctl.local_run import DEMO_PARAMETERS, run_local, upload_sample

    parameters = _parameters(args.param, DEMO_PARAMETERS)
    info = stack_up(LOCAL_ROOT / "stack")
    os.environ.update(info.env())
    print(f"stack up: S3 {info.s3_endpoint}, MLflow {info.tracking_uri}")
    print(f"sample dataset uploaded to {upload_sample()}")
    outcome = run_local(parameters, LOCAL_ROOT / "local_outputs")
    _print_outcome(outcome, info.ui_url)
    # kfp.local's output file has no .html suffix, which a browser needs to open it as a page
    report = shutil.copyfile(outcome["report"], (LOCAL_ROOT / "run_report.html").resolve())
    print(f"\nRun report (open it in a browser): {report}")
    print("\nStop the local servers with: make stack-down")
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from thaw.steps import preprocess_step

    summary = preprocess_step(args.source, args.output, arch=args.backbone,
                              image_size=args.image_size, seed=args.seed,
                              max_bad_fraction=args.max_bad_fraction,
                              num_workers=args.workers, image_format=args.image_format,
                              shard_uri=args.shard_uri)
    print(json.dumps(summary, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from thaw.config import PIPELINE_DEFAULTS as D
    from thaw.stack import add_stack_commands
    from thawctl.kfp_cli import add_kfp_commands

    parser = argparse.ArgumentParser(prog="thaw", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    compile_cmd = commands.add_parser("compile", help="write the pipeline YAML")
    compile_cmd.add_argument("--output", type=Path, default=Path("thaw_pipeline.yaml"))
    compile_cmd.add_argument("--config", type=Path, default=None,
                             help="cluster settings YAML (see infra/cluster.example.yaml)")
    compile_cmd.add_argument("--image", default=os.environ.get("THAW_IMAGE"),
                             help="container image the steps run in, overriding the "
                                  "settings file (env THAW_IMAGE)")
    compile_cmd.set_defaults(func=_compile)

    for name, func, help_text in (
        ("run-local", _run_local, "run the pipeline here through kfp.local"),
        ("demo", _demo, "stack up, upload the sample, run the pipeline, print the result"),
    ):
        cmd = commands.add_parser(name, help=help_text)
        cmd.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                         help="pipeline parameter, e.g. --param full_epochs=2 (repeatable)")
        cmd.set_defaults(func=func)
    run_local = commands.choices["run-local"]
    run_local.add_argument("--isolated", action="store_true",
                           help="run as a cluster does: each step in a fresh container of "
                                "the image, artifacts only through S3, retries and caching "
                                "as compiled")
    run_local.add_argument("--engine", choices=("podman", "docker", "bwrap"),
                           help="with --isolated: container engine (default: podman, then "
                                "docker), or bwrap to run this venv with the same isolation")
    run_local.add_argument("--image", help="with --isolated: image instead of the compiled one")
    run_local.add_argument("--config", type=Path,
                           help="with --isolated: cluster settings YAML to compile with")

    prepare = commands.add_parser("prepare", help="validate, split and resize a dataset")
    prepare.add_argument("source", help="local folder, s3://bucket/prefix or idx folder")
    prepare.add_argument("output", type=Path)
    prepare.add_argument("--backbone", default=D.backbone)
    prepare.add_argument("--image-size", type=int, default=D.image_size)
    prepare.add_argument("--seed", type=int, default=D.seed)
    prepare.add_argument("--max-bad-fraction", type=float, default=D.max_bad_fraction)
    prepare.add_argument("--workers", type=int, default=D.preprocess_workers,
                         help="decoding processes")
    prepare.add_argument("--image-format", default=D.image_format,
                         help="raw (pixels) or jpeg (about 15x smaller; large sets)")
    prepare.add_argument("--shard-uri", default=D.shard_uri,
                         help="with jpeg: s3:// prefix to keep the shards at (streamed)")
    prepare.set_defaults(func=_prepare)

    add_stack_commands(commands)
    add_kfp_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("botocore").setLevel(logging.WARNING)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ThawError as err:
        print(f"thaw: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
