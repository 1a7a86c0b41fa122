"""The MLflow database across a schema change, through the command the cluster's MLflow
Deployment runs in its init container and the embedded stack runs before its server
(`mlflow db upgrade URI`, thaw.stack.upgrade_schema).

With the pinned MLflow (3.17.2): the server refuses a database whose schema revision is behind
the installed one while all its tables exist (mlflow/store/tracking/sqlalchemy_store.py
SqlAlchemyStore.__init__ -> mlflow/store/db/utils.py _verify_schema: "Detected out-of-date
database schema"), which is what a release whose migrations only change columns leaves; and
`mlflow db upgrade` (mlflow/db.py upgrade -> _upgrade_db) migrates a database made at the
previous revision to the head. The previous revision is made offline with MLflow's own migration
environment (alembic downgrade through mlflow/store/db/utils.py _get_alembic_config).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import alembic.command
import alembic.script
import pytest
import sqlalchemy
from mlflow.store.db import utils as db_utils
from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

from thaw.errors import ThawError
from thaw.stack import _mlflow_command, upgrade_schema

pytestmark = pytest.mark.slow
ENV = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}


def _revision(uri: str) -> str:
    return db_utils._get_schema_version(db_utils.create_sqlalchemy_engine_with_retry(uri))


def _previous_revision(uri: str) -> str:
    """Downgrade the database one migration with MLflow's own alembic environment."""
    engine = db_utils.create_sqlalchemy_engine_with_retry(uri)
    config = db_utils._get_alembic_config(uri)
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        alembic.command.downgrade(config, "-1")
    return _revision(uri)


@pytest.fixture
def database(tmp_path: Path) -> str:
    """A new database, made by the upgrade command (an empty one gets every table)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    upgrade_schema(uri, ENV)
    assert _revision(uri) == db_utils._get_latest_schema_revision()
    return uri


def test_a_database_at_the_previous_schema_is_migrated_to_the_installed_one(database, tmp_path):
    head = db_utils._get_latest_schema_revision()
    assert _previous_revision(database) != head
    upgrade_schema(database, ENV)
    assert _revision(database) == head
    SqlAlchemyStore(database, str(tmp_path / "artifacts")).create_experiment("after-upgrade")


def test_the_server_refuses_an_out_of_date_schema(database, tmp_path):
    """All tables there, the revision one behind: `mlflow server` (the stack's command) exits."""
    engine = db_utils.create_sqlalchemy_engine_with_retry(database)
    config = db_utils._get_alembic_config(database)
    script = alembic.script.ScriptDirectory.from_config(config)
    behind = script.get_revision(db_utils._get_latest_schema_revision()).down_revision
    with engine.begin() as connection:
        connection.execute(sqlalchemy.text("UPDATE alembic_version SET version_num = :rev"),
                           {"rev": behind})
    command = _mlflow_command("127.0.0.1", 1, database, f"file://{tmp_path / 'artifacts'}")
    assert command[:4] == [sys.executable, "-m", "mlflow", "server"]
    refused = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=180,
                             check=False)
    assert refused.returncode != 0
    assert "Detected out-of-date database schema" in refused.stdout + refused.stderr


def test_a_failed_upgrade_says_which_database(tmp_path):
    broken = tmp_path / "broken.db"
    broken.write_bytes(b"not a database" * 100)
    with pytest.raises(ThawError, match=r"`mlflow db upgrade` of sqlite:///.*broken\.db"):
        upgrade_schema(f"sqlite:///{broken}", ENV)
