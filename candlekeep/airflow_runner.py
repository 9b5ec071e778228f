"""Runs the DAG in-process with ``dag.test()``, in a Python process of its own.

Airflow reads its configuration when imported, so the caller (``candlekeep demo``, the tests)
starts a fresh process with ``AIRFLOW_HOME`` and the metadata database set in the environment
(see :func:`airflow_env`). Usage: ``python -m candlekeep.airflow_runner test START END`` or
``... dagbag``; prints one JSON line.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

#: The DAG folder of a source checkout (``pip install -e .``, as the Makefile does).
DAGS = Path(__file__).resolve().parent.parent / "dags"


def airflow_env(base: dict, home: Path, metadata_url: str) -> dict:
    """The environment for Airflow with its metadata in PostgreSQL (``postgresql://`` URL)."""
    sqlalchemy_url = metadata_url.replace("postgresql://", "postgresql+psycopg://", 1)
    env = {k: v for k, v in base.items() if not k.startswith("AIRFLOW")}
    env.update(
        AIRFLOW_HOME=str(home),
        AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=sqlalchemy_url,
        AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC=sqlalchemy_url,
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__CORE__DAGS_FOLDER=str(DAGS),
        AIRFLOW__CORE__PLUGINS_FOLDER=str(DAGS),
    )
    return env


def main(argv: list[str]) -> int:
    from airflow.utils import db as airflow_db

    airflow_db.upgradedb()
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(DAGS))
    if argv[0] == "dagbag":
        print(json.dumps({"dags": sorted(bag.dag_ids), "errors": bag.import_errors}))
        return 0
    dag = bag.get_dag("candle_reconciliation")
    start, end = argv[1], argv[2]
    conf = {"start": start, "end": end} if len(argv) < 4 or argv[3] != "scheduled" else None
    import pendulum

    kwargs = {"run_conf": conf} if conf else {"logical_date": pendulum.parse(start)}
    run = dag.test(**kwargs)
    states = {ti.task_id: ti.state for ti in run.get_task_instances()}
    print(json.dumps({"state": str(run.state), "tasks": {k: str(v) for k, v in states.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
