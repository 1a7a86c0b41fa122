"""Files thaw writes are complete or absent, never half written: a writer that fails or a
process killed half way leaves the previous file (or none), and no visible temporary."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from thaw import steps, storage
from thaw.errors import ThawError

# Serialises a few hundred KB, then meets a value JSON cannot take.
HALF_SERIALISABLE = {"history": [{"epoch": i, "loss": 0.5} for i in range(20_000)],
                     "z_last": object()}


def _visible(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


def test_a_plain_write_would_leave_half_a_file(tmp_path: Path) -> None:
    """The failure used below does happen half way through the output."""
    path = tmp_path / "plain.json"
    with pytest.raises(TypeError), path.open("w") as handle:
        json.dump(HALF_SERIALISABLE, handle)
    assert path.stat().st_size > 100_000


def test_json_that_fails_half_way_leaves_no_file(tmp_path: Path) -> None:
    path = tmp_path / "result.json"
    with pytest.raises(TypeError, match="not JSON serializable"):
        storage.write_json_atomic(path, HALF_SERIALISABLE)
    assert list(tmp_path.iterdir()) == []


def test_json_that_fails_half_way_keeps_the_previous_file(tmp_path: Path) -> None:
    path = storage.write_json_atomic(tmp_path / "outcome.json", {"version": "1"})
    with pytest.raises(TypeError):
        storage.write_json_atomic(path, HALF_SERIALISABLE)
    assert json.loads(path.read_text()) == {"version": "1"}
    assert list(tmp_path.iterdir()) == [path]


def test_text_and_binary_writes(tmp_path: Path) -> None:
    text = storage.write_text_atomic(tmp_path / "sub" / "report.md", "| a |\n")
    assert text.read_text() == "| a |\n"
    blob = storage.write_atomic(tmp_path / "b.bin", lambda h: h.write(b"\x00\x01"), binary=True)
    assert blob.read_bytes() == b"\x00\x01"


def test_a_process_killed_mid_write_leaves_the_previous_file(tmp_path: Path) -> None:
    path = storage.write_text_atomic(tmp_path / "stage_run.json", '{"run_id": "old"}')
    script = textwrap.dedent(f"""
        import sys, time
        from thaw.storage import write_atomic

        def write(handle):
            handle.write('{{"run_id": "new", "pad": "' + 'x' * 100000)
            handle.flush()
            print("half", flush=True)
            time.sleep(60)

        write_atomic({str(path)!r}, write)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "half"
        proc.kill()
    finally:
        proc.wait(timeout=30)
    assert json.loads(path.read_text()) == {"run_id": "old"}
    assert _visible(tmp_path) == ["stage_run.json"]


def test_failure_marker_is_written_whole(tmp_path: Path) -> None:
    """The marker that stops retries of a step that failed on its input."""
    steps._record_failure(str(tmp_path / "ckpt"), ThawError("bad input"))
    marker = tmp_path / "ckpt" / steps.FAILURE_FILE
    assert json.loads(marker.read_text()) == {"error": "bad input"}
    with pytest.raises(ThawError, match="not retrying: an earlier attempt failed on its "
                                        "input: bad input"):
        steps.refuse_known_failure(str(tmp_path / "ckpt"))
    assert _visible(marker.parent) == [steps.FAILURE_FILE]


def test_evaluate_names_a_stage_that_left_no_record(tmp_path: Path, prepared_sample) -> None:
    """A stage folder without its records (a step that never finished) is refused clearly."""
    stage_dir = tmp_path / "probe"
    stage_dir.mkdir()
    with pytest.raises(ThawError, match=r"result\.json is missing or unreadable.*did not "
                                        r"finish; run its training step again"):
        steps.evaluate_step(prepared_sample.root, {"probe": stage_dir})
