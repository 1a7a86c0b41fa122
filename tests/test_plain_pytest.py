"""Plain `pytest` (the console script, which puts no working directory on sys.path, unlike
`python -m pytest`) collects the modules that import ``tests.*``: pyproject.toml's
[tool.pytest.ini_options] pythonpath puts the repository root there."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
IMPORTING_TESTS = ["tests/distributed/test_ddp.py", "tests/trainjob/test_stage_on_trainjob.py",
                   "tests/cli/test_submit.py"]


def test_plain_pytest_collects_the_modules_that_import_tests():
    pytest_script = Path(sys.executable).parent / "pytest"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([str(pytest_script), "--collect-only", "-q", "-p", "no:cacheprovider",
                             *IMPORTING_TESTS], cwd=REPO, env=env, capture_output=True,
                            text=True, check=False, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    collected = {line.split("::")[0] for line in result.stdout.splitlines() if "::" in line}
    assert collected == set(IMPORTING_TESTS)
