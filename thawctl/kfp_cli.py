"""`thaw submit` and `thaw schedule ...`: the pipeline on a Kubeflow Pipelines cluster."""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from thawctl.compiled import (
    CompiledPipeline,
    checked_parameters,
    cluster_settings,
    compile_spec,
    read_params_file,
    split_pairs,
)
from thawctl.cron import HELP as CRON_HELP
from thawctl.cron import check_cron
from thawctl.env_sources import EnvSource, check_env_sources, env_sources
from thawctl.kfp_api import SINGLE_USER_NAMESPACE, Connection, Kfp, PipelineVersion
from thawctl.kfp_tasks import SpecTask, failure, spec_tasks

echo = functools.partial(print, flush=True)
_CRON_LINES = ('cron: six fields, seconds first, in UTC: "0 0 3 * * *" is every day at 03:00:00,\n'
               '"0 30 2 * * MON" every Monday at 02:30. Five fields are refused (KFP would\n'
               'read them as seconds first too).')

CONNECTION_HELP = """\
connection: --host (or KFP_HOST; in a pod, the in-cluster service), --namespace (or
KFP_NAMESPACE: your Kubeflow profile; leave it out on a single-user install), a bearer token
in KFP_TOKEN, else the service-account token file that KF_PIPELINES_SA_TOKEN_PATH names
(default /var/run/secrets/kubeflow/pipelines/token) when it exists. A backend older than
the pipeline needs (MIN_KFP_BACKEND in pipelines/thaw_pipeline.py) is refused before
anything is sent; one that does not report its version (official images before 2.16.0) is
warned of. --host may be the Kubeflow gateway (…/pipeline, the UI server) or the API server.
Every run gets the compiled spec's pipeline root (the backend ignores the spec's own). Where
the Kubernetes API is reachable (in-cluster or kubeconfig), the Secret and ConfigMap keys the
steps read are checked first in the namespace (default kubeflow on a single-user install)."""

SUBMIT_HELP = """\
Compiles the pipeline (as `thaw compile`), uploads it as a version of the named pipeline
only when the compiled spec changed (versions are named spec-<sha256 prefix>; the same spec
is never uploaded twice), starts a run in the experiment and prints its URL. With --wait it
follows the run, one line per task as it changes state.

exit status: 0 started (with --wait: succeeded); 1 the run failed or was canceled (the
failed task and its message are named); 2 thaw could not do it (bad input, unreachable or
old backend, API error).

""" + CONNECTION_HELP

SCHEDULE_HELP = """\
Recurring runs for scheduled retraining, by name. `create` compiles and uploads the pipeline
as `thaw submit` does and pins that version; every schedule runs with max_concurrency 1 and
no catch-up.

{cron}

create with a name that exists: nothing happens when cron, version, parameters and
pipeline root are the same; otherwise it is refused and says what differs, unless --replace,
which deletes the old recurring run and creates the new one (KFP cannot update a recurring
run in place). KFP keeps no name unique: a name several recurring runs share is refused.

""" + CONNECTION_HELP


def add_kfp_commands(commands: Any) -> None:
    """Add `submit` and `schedule` to the `thaw` parser's subcommands."""
    formatter = argparse.RawDescriptionHelpFormatter
    submit = commands.add_parser(
        "submit", help="run the pipeline on a Kubeflow Pipelines cluster",
        description=SUBMIT_HELP,
        formatter_class=formatter)
    _pipeline_args(submit)
    submit.add_argument("--run-name", help="default: 'thaw <date> <time>'")
    submit.add_argument("--wait", action="store_true",
                        help="follow the run to its end; exit 1 if it fails")
    submit.add_argument("--timeout", type=float, metavar="SECONDS",
                        help="with --wait: give up after this long (exit 2; the run goes on)")
    submit.add_argument("--poll-interval", type=float, default=15.0, metavar="SECONDS",
                        help="with --wait: seconds between looks at the run (default 15)")
    _connection_args(submit)
    submit.set_defaults(func=_submit)

    schedule = commands.add_parser(
        "schedule", help="recurring runs for scheduled retraining (create, list, pause, "
                         "resume, delete)",
        description=SCHEDULE_HELP.format(cron=_CRON_LINES),
        formatter_class=formatter)
    actions = schedule.add_subparsers(dest="action", required=True)
    create = actions.add_parser(
        "create", help="create a recurring run of the current pipeline version",
        description=SCHEDULE_HELP.format(cron=_CRON_LINES),
        formatter_class=formatter)
    create.add_argument("name", help="recurring run name (unique in the namespace)")
    create.add_argument("--cron", required=True, help=CRON_HELP)
    create.add_argument("--replace", action="store_true",
                        help="if NAME exists with other settings, delete it and create anew")
    _pipeline_args(create)
    _connection_args(create)
    create.set_defaults(func=_schedule_create)
    listing = actions.add_parser("list", help="the recurring runs in the namespace")
    _connection_args(listing)
    listing.set_defaults(func=_schedule_list)
    for action, func, text in (("pause", _schedule_pause, "stop starting runs"),
                               ("resume", _schedule_resume, "start runs again"),
                               ("delete", _schedule_delete, "delete the recurring run")):
        cmd = actions.add_parser(action, help=text)
        cmd.add_argument("name")
        _connection_args(cmd)
        cmd.set_defaults(func=func)


def _pipeline_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path,
                        help="cluster settings YAML, as for `thaw compile`")
    parser.add_argument("--image", default=os.environ.get("THAW_IMAGE"),
                        help="step image, overriding the settings file (env THAW_IMAGE)")
    parser.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                        help="pipeline parameter, typed as the pipeline declares it "
                             "(repeatable; wins over --params-file)")
    parser.add_argument("--params-file", type=Path, metavar="YAML",
                        help="pipeline parameters as a YAML mapping")
    parser.add_argument("--pipeline-name",
                        help="KFP pipeline to add versions to (default: the spec's name, "
                             "thaw-staged-transfer)")
    parser.add_argument("--experiment", default="thaw", help="KFP experiment (default thaw)")


def _connection_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Kubeflow Pipelines API")
    group.add_argument("--host", help="API endpoint, e.g. https://kubeflow.example.com/pipeline "
                                      "(env KFP_HOST)")
    group.add_argument("--namespace", default=os.environ.get("KFP_NAMESPACE"),
                       help="Kubeflow profile namespace (env KFP_NAMESPACE)")
    group.add_argument("--ui-host", help="base URL of the KFP UI for links (default: --host)")


def _connect(args: argparse.Namespace) -> Kfp:
    from pipelines.thaw_pipeline import MIN_KFP_BACKEND

    kfp = Kfp(Connection(args.host, args.namespace, args.ui_host), min_backend=MIN_KFP_BACKEND)
    where = f", namespace {kfp.namespace}" if kfp.namespace else ""
    echo(f"Kubeflow Pipelines {kfp.backend_version} at {kfp.host}{where}")
    return kfp


@dataclass(frozen=True)
class Prepared:
    """The compiled pipeline, the run's checked parameters, the image, and what the spec's
    two documents tell the cluster commands: the pipeline root (None: the cluster's default),
    the container tasks and the Secrets and ConfigMaps they read."""

    compiled: CompiledPipeline
    parameters: dict[str, Any]
    image: str
    pipeline_root: str | None
    tasks: list[SpecTask]
    env_sources: list[EnvSource]


def _prepare(args: argparse.Namespace) -> Prepared:
    """Compile, type and check the parameters before talking to the cluster: input errors
    first."""
    settings = cluster_settings(args.config, args.image)
    compiled = compile_spec(settings)
    raw = {**read_params_file(args.params_file), **split_pairs(args.param)}
    spec, *platform = yaml.safe_load_all(compiled.text)
    return Prepared(compiled, checked_parameters(raw, compiled), settings.image,
                    spec.get("defaultPipelineRoot") or None, spec_tasks(spec),
                    env_sources(platform[0] if platform else {}))


def _namespace(kfp: Kfp) -> str:
    return kfp.namespace or SINGLE_USER_NAMESPACE


def _pipeline_root_line(root: str | None) -> str:
    return (f"pipeline root {root} (the compiled spec's)" if root else
            "pipeline root: the cluster's default (the kfp-launcher ConfigMap, else "
            "minio://mlpipeline/v2/artifacts)")


def _upload(kfp: Kfp, args: argparse.Namespace, compiled: CompiledPipeline,
            image: str) -> PipelineVersion:
    name = args.pipeline_name or compiled.name
    version = kfp.pipeline_version(compiled, name,
                                   description=f"image {image}; spec sha256 {compiled.sha256}")
    what = "uploaded" if version.created else "unchanged, already uploaded"
    echo(f"pipeline {name}: version {version.name} ({what}; image {image})")
    return version


def _submit(args: argparse.Namespace) -> int:
    prepared = _prepare(args)
    kfp = _connect(args)
    check_env_sources(prepared.env_sources, _namespace(kfp), echo)
    version = _upload(kfp, args, prepared.compiled, prepared.image)
    experiment = kfp.experiment_id(args.experiment)
    name = args.run_name or f"thaw {time.strftime('%Y-%m-%d %H:%M:%S')}"
    run_id = kfp.start_run(experiment, name, version, prepared.parameters,
                           prepared.pipeline_root)
    echo(f"run {run_id} started in experiment {args.experiment}, parameters "
         f"{prepared.parameters}, {_pipeline_root_line(prepared.pipeline_root)}")
    echo(f"  {kfp.run_url(run_id)}")
    if not args.wait:
        return 0
    run = kfp.follow(run_id, prepared.tasks, poll_s=args.poll_interval,
                     timeout_s=args.timeout, echo=echo)
    if run.state == "SUCCEEDED":
        echo(f"run {run_id} SUCCEEDED: {kfp.run_url(run_id)}")
        return 0
    print(f"thaw: error: {failure(run, prepared.tasks, _namespace(kfp))} "
          f"({kfp.run_url(run_id)})", file=sys.stderr)
    return 1


def _schedule_create(args: argparse.Namespace) -> int:
    from thawctl.schedule import Schedule, create

    cron = check_cron(args.cron)
    prepared = _prepare(args)
    kfp = _connect(args)
    check_env_sources(prepared.env_sources, _namespace(kfp), echo)
    version = _upload(kfp, args, prepared.compiled, prepared.image)
    schedule = Schedule(args.name, cron, kfp.experiment_id(args.experiment), version,
                        prepared.parameters, prepared.pipeline_root)
    outcome, run = create(kfp, schedule, replace=args.replace)
    echo(f"recurring run {args.name} {outcome} ({run.recurring_run_id}): cron {cron!r}, "
         f"version {version.name}, max_concurrency 1, no catch-up, parameters "
         f"{prepared.parameters}, {_pipeline_root_line(prepared.pipeline_root)}")
    if run.mode == "DISABLE":
        echo(f"  it is paused: `thaw schedule resume {args.name}` starts it again")
    return 0


def _schedule_list(args: argparse.Namespace) -> int:
    from thawctl.schedule import table

    rows = table(_connect(args))
    if len(rows) == 1:
        echo("no recurring runs")
        return 0
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
             .rstrip())
    return 0


def _schedule_pause(args: argparse.Namespace) -> int:
    from thawctl.schedule import set_enabled

    run = set_enabled(_connect(args), args.name, enabled=False)
    echo(f"recurring run {args.name} paused ({run.recurring_run_id})")
    return 0


def _schedule_resume(args: argparse.Namespace) -> int:
    from thawctl.schedule import set_enabled

    run = set_enabled(_connect(args), args.name, enabled=True)
    echo(f"recurring run {args.name} resumed ({run.recurring_run_id})")
    return 0


def _schedule_delete(args: argparse.Namespace) -> int:
    from thawctl.schedule import delete

    run = delete(_connect(args), args.name)
    echo(f"recurring run {args.name} deleted ({run.recurring_run_id})")
    return 0
