"""Runs the DAG in-process with ``dag.test()``, in its own Python process.

Airflow reads its configuration when imported, so each test run gets a fresh process with
``AIRFLOW_HOME`` and the metadata database (a real PostgreSQL database) set by the caller.
Usage: ``python -m tests.airflow_harness test START END`` or ``... dagbag``; prints JSON.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

DAGS = Path(__file__).resolve().parent.parent / "dags"


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
