"""`thaw schedule` against the stand-in KFP API, and KFP's cron format."""

from __future__ import annotations

import pytest

from thaw.errors import ThawError
from thawctl.cron import check_cron

NIGHTLY = "0 0 3 * * *"


def _create(thaw, name="nightly", cron=NIGHTLY, *extra):
    return thaw("schedule", "create", name, "--cron", cron, *extra)


def test_create_pins_the_version_with_cron_concurrency_1_and_no_catchup(standin, thaw):
    result = _create(thaw, "nightly", NIGHTLY, "--param", "data_uri=s3://bucket/pets",
                     "--param", "full_epochs=4", "--experiment", "retraining")
    assert result.code == 0, result.err
    (version,) = standin.versions.values()
    (posted,) = standin.calls("POST", "recurringruns")
    body = posted.body
    assert body["display_name"] == "nightly"
    assert body["trigger"] == {"cron_schedule": {"cron": NIGHTLY}}
    assert int(body["max_concurrency"]) == 1 and body["no_catchup"] is True
    assert body["mode"] == "ENABLE"
    assert body["pipeline_version_reference"] == {
        "pipeline_id": version["pipeline_id"],
        "pipeline_version_id": version["pipeline_version_id"]}
    assert "pipeline_spec" not in body  # pinned to the uploaded version, not an inline copy
    assert body["runtime_config"]["parameters"] == {"data_uri": "s3://bucket/pets",
                                                    "full_epochs": 4}
    assert type(body["runtime_config"]["parameters"]["full_epochs"]) is int
    assert standin.experiments[body["experiment_id"]]["display_name"] == "retraining"
    assert "created" in result.out and version["display_name"] in result.out


def test_create_is_idempotent_by_name_refuses_changes_and_replaces_on_request(standin, thaw):
    assert _create(thaw).code == 0
    again = _create(thaw)
    assert again.code == 0 and "nightly unchanged" in again.out
    assert len(standin.calls("POST", "recurringruns")) == 1

    other = _create(thaw, "nightly", "0 30 2 * * MON", "--param", "image_size=96")
    assert other.code == 2
    error = other.err.strip()
    assert error.startswith("thaw: error: recurring run 'nightly' exists with another cron")
    assert "parameters" in error and "--replace" in error and len(error.splitlines()) == 1
    assert len(standin.recurring_runs) == 1

    (old_id,) = standin.recurring_runs
    replaced = _create(thaw, "nightly", "0 30 2 * * MON", "--param", "image_size=96",
                       "--replace")
    assert replaced.code == 0 and "nightly replaced" in replaced.out
    assert standin.calls("DELETE", f"recurringruns/{old_id}")
    (new,) = standin.recurring_runs.values()
    assert new["trigger"]["cron_schedule"]["cron"] == "0 30 2 * * MON"
    assert new["runtime_config"]["parameters"] == {"image_size": 96}


def test_a_new_pipeline_version_is_a_change_to_the_schedule(standin, thaw, tmp_path):
    assert _create(thaw).code == 0
    config = tmp_path / "cluster.yaml"
    config.write_text("image: registry.example.com/ml/thaw:0.2.0\n")
    result = _create(thaw, "nightly", NIGHTLY, "--config", str(config))
    assert result.code == 2 and "pipeline version" in result.err
    assert _create(thaw, "nightly", NIGHTLY, "--config", str(config), "--replace").code == 0
    (run,) = standin.recurring_runs.values()
    assert run["pipeline_version_reference"]["pipeline_version_id"] == max(standin.versions)


def test_pause_resume_delete_hit_their_endpoints_and_list_shows_them(standin, thaw):
    assert _create(thaw, "nightly").code == 0
    assert _create(thaw, "weekly", "0 0 4 * * SUN").code == 0
    ids = {r["display_name"]: r["recurring_run_id"] for r in standin.recurring_runs.values()}

    assert thaw("schedule", "pause", "weekly").code == 0
    assert standin.calls("POST", f"recurringruns/{ids['weekly']}:disable")
    again = _create(thaw, "weekly", "0 0 4 * * SUN")  # same settings: left as it is, paused
    assert again.code == 0 and "weekly unchanged" in again.out and "it is paused" in again.out
    listed = thaw("schedule", "list")
    assert listed.code == 0
    rows = {line.split()[0]: line for line in listed.out.splitlines()[2:]}
    (version,) = standin.versions.values()
    assert rows["nightly"].split()[1:5] == ["enabled", "0", "0", "3"]
    assert rows["weekly"].split()[1] == "paused" and "0 0 4 * * SUN" in rows["weekly"]
    for name in ("nightly", "weekly"):
        assert version["display_name"] in rows[name] and ids[name] in rows[name]
        assert "max 1, no catch-up" in rows[name]

    assert thaw("schedule", "resume", "weekly").code == 0
    assert standin.calls("POST", f"recurringruns/{ids['weekly']}:enable")
    assert standin.recurring_runs[ids["weekly"]]["mode"] == "ENABLE"

    assert thaw("schedule", "delete", "weekly").code == 0
    assert standin.calls("DELETE", f"recurringruns/{ids['weekly']}")
    assert set(standin.recurring_runs) == {ids["nightly"]}
    assert "weekly" not in thaw("schedule", "list").out

    missing = thaw("schedule", "pause", "weekly")
    assert missing.code == 2 and "no recurring run named 'weekly'" in missing.err


def test_list_says_when_there_are_none(standin, thaw):
    result = thaw("schedule", "list")
    assert result.code == 0 and "no recurring runs" in result.out


def test_five_field_cron_is_refused_before_anything_is_sent(standin, thaw):
    result = _create(thaw, "nightly", "0 3 * * *")
    assert result.code == 2
    assert result.err.strip() == (
        "thaw: error: cron '0 3 * * *' has 5 fields; KFP's cron has 6, seconds first (it "
        "would read this as second 0, minute 3, ...): for the Unix meaning use '0 0 3 * * *'")
    assert standin.requests == []


def test_schedule_refuses_an_old_backend(kfp_env, thaw, monkeypatch):
    from kfp_standin import running

    with running(version="2.5.0") as old:
        monkeypatch.setenv("KFP_HOST", old.url)
        result = _create(thaw)
        assert result.code == 2 and "2.5.0" in result.err
        assert old.recurring_runs == {} and old.versions == {}


@pytest.mark.parametrize("cron", [
    "0 0 3 * * *", "0 30 2 * * MON", "*/30 * * * * *", "0 0 0 1 JAN-MAR ?", "0 0 9 ? * 1-5",
    "0 15,45 8-18/2 * * mon-fri", "  0 0 3 * * *  ", "@daily", "@every 6h30m",
])
def test_cron_accepted(cron):
    assert check_cron(cron) == " ".join(cron.split())


@pytest.mark.parametrize("cron, words", [
    ("0 3 * * *", "has 5 fields"),
    ("0 0 3 * * * 2027", "has 7 fields"),
    ("", "has 0 fields"),
    ("60 0 3 * * *", "second field '60': 60 is out of range"),
    ("0 0 24 * * *", "hour field '24': 24 is out of range"),
    ("0 0 3 0 * *", "day of month field '0'"),
    ("0 0 3 * 13 *", "month field '13'"),
    ("0 0 3 * * 7", "day of week field '7'"),
    ("0 0 ? * * *", "'?' is only for day of month or day of week"),
    ("0 */0 3 * * *", "a step of 0"),
    ("0 0 5-3 * * *", "runs backwards"),
    ("0 0 3 * * FUNDAY", "is not a number or name"),
    ("0 0 3 L * *", "is not a number"),
    ("@fortnightly", "has 1 field;"),
])
def test_cron_refused(cron, words):
    with pytest.raises(ThawError, match="cron") as err:
        check_cron(cron)
    assert words in str(err.value)
