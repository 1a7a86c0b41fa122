"""Recurring runs (KFP's v2beta1 ``recurringruns``) for scheduled retraining, by name.

Every schedule thaw creates runs a pinned pipeline version (never "the latest"), with
``max_concurrency`` 1 (a slow run is never overlapped by the next) and ``no_catchup`` (after
a pause, one run instead of one per missed slot). KFP has no update call for recurring
runs, so creating one whose name exists is a no-op when nothing differs, refused when
something does, and with ``replace`` a delete and a new create. The API server does not
keep names unique (no unique index on the jobs' DisplayName, the ScheduledWorkflow made with
``GenerateName``: ``backend/src/apiserver/model/job.go`` and ``template/v2_template.go`` at
2.5.0-2.17.0), so several recurring runs of one name are refused rather than guessed among.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from thaw.errors import ThawError
from thawctl.kfp_api import Kfp, PipelineVersion, name_filter

MAX_CONCURRENCY = 1


@dataclass(frozen=True)
class Schedule:
    name: str
    cron: str
    experiment_id: str
    version: PipelineVersion
    parameters: dict[str, Any]
    pipeline_root: str | None  # the compiled spec's; None: the cluster's default


def find(kfp: Kfp, name: str) -> Any | None:
    """The recurring run called ``name`` in this namespace, or None."""
    found = [r for r in _all(kfp, name_filter(name)) if r.display_name == name]
    if len(found) > 1:
        ids = [r.recurring_run_id for r in found]
        raise ThawError(f"{len(found)} recurring runs are named {name!r} ({ids}); "
                        "delete the extra ones in the KFP UI")
    return found[0] if found else None


def get(kfp: Kfp, name: str) -> Any:
    found = find(kfp, name)
    if found is None:
        raise ThawError(f"no recurring run named {name!r}"
                        f"{' in namespace ' + kfp.namespace if kfp.namespace else ''}: "
                        "`thaw schedule list` shows them")
    return found


def create(kfp: Kfp, schedule: Schedule, *, replace: bool = False) -> tuple[str, Any]:
    """Create ``schedule``; returns ("created" | "unchanged" | "replaced", recurring run)."""
    existing = find(kfp, schedule.name)
    outcome = "created"
    if existing is not None:
        changes = differences(existing, schedule)
        if not changes:
            return "unchanged", existing
        if not replace:
            raise ThawError(f"recurring run {schedule.name!r} exists with another "
                            f"{'; '.join(changes)}: pass --replace to delete and recreate it, "
                            "or choose another name")
        kfp.call(f"deleting recurring run {schedule.name}",
                 kfp.client.delete_recurring_run, existing.recurring_run_id)
        outcome = "replaced"
    created = kfp.call(
        f"creating recurring run {schedule.name}", kfp.client.create_recurring_run,
        experiment_id=schedule.experiment_id, job_name=schedule.name,
        description=f"thaw retraining, pipeline version {schedule.version.name}",
        cron_expression=schedule.cron, max_concurrency=MAX_CONCURRENCY, no_catchup=True,
        params=schedule.parameters, pipeline_id=schedule.version.pipeline_id,
        version_id=schedule.version.version_id, enabled=True,
        pipeline_root=schedule.pipeline_root)
    return outcome, created


def differences(existing: Any, schedule: Schedule) -> list[str]:
    """What ``existing`` has that ``schedule`` would not, in words."""
    changes = []
    cron = _cron(existing)
    if cron != schedule.cron:
        changes.append(f"cron ({cron!r}, not {schedule.cron!r})")
    version = _version_id(existing)
    if version != schedule.version.version_id:
        changes.append(f"pipeline version ({version}, not {schedule.version.version_id} = "
                       f"{schedule.version.name})")
    config = existing.runtime_config
    parameters = (config.parameters if config else None) or {}
    if parameters != schedule.parameters:
        changes.append(f"parameters ({parameters}, not {schedule.parameters})")
    root = (config.pipeline_root if config else None) or None
    if root != schedule.pipeline_root:
        changes.append(f"pipeline root ({root or 'the default'}, not "
                       f"{schedule.pipeline_root or 'the default'})")
    if existing.experiment_id and existing.experiment_id != schedule.experiment_id:
        changes.append(f"experiment ({existing.experiment_id})")
    if _int(existing.max_concurrency) != MAX_CONCURRENCY or existing.no_catchup is not True:
        changes.append(f"max_concurrency/no_catchup ({existing.max_concurrency}/"
                       f"{existing.no_catchup}, not {MAX_CONCURRENCY}/True)")
    return changes


def set_enabled(kfp: Kfp, name: str, enabled: bool) -> Any:
    run = get(kfp, name)
    fn = kfp.client.enable_recurring_run if enabled else kfp.client.disable_recurring_run
    kfp.call(f"{'resuming' if enabled else 'pausing'} recurring run {name}", fn,
             run.recurring_run_id)
    return run


def delete(kfp: Kfp, name: str) -> Any:
    run = get(kfp, name)
    kfp.call(f"deleting recurring run {name}", kfp.client.delete_recurring_run,
             run.recurring_run_id)
    return run


def table(kfp: Kfp) -> list[list[str]]:
    """One row per recurring run: name, state, cron, pipeline version, concurrency/catch-up,
    id; with a header row."""
    rows = [["NAME", "STATE", "CRON", "PIPELINE VERSION", "LIMITS", "ID"]]
    names: dict[tuple[str, str], str] = {}
    for run in sorted(_all(kfp, None), key=lambda r: r.display_name or ""):
        ref = run.pipeline_version_reference
        version = _version_id(run)
        if ref is not None and ref.pipeline_id and version:
            key = (ref.pipeline_id, version)
            if key not in names:
                names[key] = kfp.version_name(*key)
            version = names[key]
        state = "enabled" if run.mode == "ENABLE" else "paused"
        limits = (f"max {run.max_concurrency}, "
                  f"{'no catch-up' if run.no_catchup else 'catch-up'}")
        rows.append([run.display_name or "", state, _cron(run) or "(periodic)",
                     version or "(inline spec)", limits, run.recurring_run_id])
    return rows


def _all(kfp: Kfp, filter_: str | None) -> list[Any]:
    runs: list[Any] = []
    token = ""
    while True:
        page = kfp.call("listing recurring runs", kfp.client.list_recurring_runs,
                        page_token=token, page_size=100, namespace=kfp.namespace,
                        filter=filter_)
        runs += page.recurring_runs or []
        token = page.next_page_token or ""
        if not token:
            return runs


def _cron(run: Any) -> str | None:
    trigger = run.trigger
    return trigger.cron_schedule.cron if trigger and trigger.cron_schedule else None


def _version_id(run: Any) -> str | None:
    ref = run.pipeline_version_reference
    return (ref.pipeline_version_id if ref else None) or run.pipeline_version_id


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None
