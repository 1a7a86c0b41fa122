"""infra/'s old submission examples are pointers now: the CI workflow moved to
.github/workflows/train.yml (`thaw submit`), the recurring-run script to `thaw schedule`
(both tested in tests/cli). The Kubernetes manifests, infra/base and infra/overlays, are
tested in tests/infra."""

import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"


def test_ci_example_points_to_the_train_workflow():
    text = (INFRA / "ci" / "github-actions-submit.yaml").read_text()
    assert yaml.safe_load(text) is None  # comments only: nothing that could run
    for target in ("train.yml", "test.yml"):
        assert target in text and (REPO / ".github" / "workflows" / target).is_file()
    assert "thaw submit" in text


def test_schedule_example_points_to_thaw_schedule():
    result = subprocess.run([sys.executable, str(INFRA / "schedule_example.py")],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert 'thaw schedule create nightly --cron "0 0 3 * * *"' in result.stderr
    readme = (INFRA / "README.md").read_text()
    assert "thaw schedule create" in readme and "thaw submit" in readme
