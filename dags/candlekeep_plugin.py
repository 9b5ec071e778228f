"""Airflow plugin: a "Data quality" tab on each DAG run, showing that run's stored report.

A FastAPI app mounted at ``/candlekeep`` inside Airflow's API server, with one route,
``GET /candlekeep/report/{dag_id}/{run_id}``: the run's period (its ``start``/``end`` conf,
else its data interval, as the DAG itself decides) and that period's ``dq_reports`` HTML.
The route is behind Airflow's own authentication and authorization (``requires_access_dag``:
a JWT as ``Authorization: Bearer`` or the UI's ``_token`` cookie, and read access to the
DAG's runs). Load it with ``AIRFLOW__CORE__PLUGINS_FOLDER`` set to this directory (or copy
this file to ``$AIRFLOW_HOME/plugins``); the API server needs ``DATABASE_URL``. See
docs/airflow.md.
"""

from __future__ import annotations

from html import escape
from typing import Any, ClassVar

from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity
from airflow.api_fastapi.common.db.common import SessionDep
from airflow.api_fastapi.core_api.security import requires_access_dag
from airflow.models.dagrun import DagRun
from airflow.plugins_manager import AirflowPlugin
from fastapi import Depends, FastAPI
from fastapi.responses import HTMLResponse
from sqlalchemy import select

from shared.batch.batch_run import PeriodError, run_period_of
from shared.batch.report import stored_report_html
from shared.config import Settings
from shared.errors import CandlekeepError

DAG_ID = "candle_reconciliation"
app = FastAPI(title="candlekeep", docs_url=None, redoc_url=None, openapi_url=None)


def _page(title: str, text: str, status: int = 200) -> HTMLResponse:
    return HTMLResponse(
        f"<!doctype html><html><head><meta charset='utf-8'><title>{escape(title)}</title></head>"
        "<body style='font-family: sans-serif; margin: 2rem'>"
        f"<h2>{escape(title)}</h2><p>{escape(text)}</p></body></html>",
        status_code=status,
    )


@app.get(
    "/report/{dag_id}/{run_id}",
    response_class=HTMLResponse,
    dependencies=[Depends(requires_access_dag("GET", DagAccessEntity.RUN))],
)
def report(dag_id: str, run_id: str, session: SessionDep) -> HTMLResponse:
    """The data-quality report of one DAG run, or a page saying why there is none."""
    if dag_id != DAG_ID:
        return _page("No data-quality report", f"Only {DAG_ID} runs publish a report.")
    run = session.scalar(select(DagRun).where(DagRun.dag_id == dag_id, DagRun.run_id == run_id))
    if run is None:
        return _page("No such DAG run", f"{dag_id} has no run {run_id!r}.", 404)
    try:
        start, end = run_period_of(run.conf, run.data_interval_start, run.data_interval_end)
    except PeriodError as exc:
        return _page("No period", f"Run {run_id}: {exc}.")
    period = f"[{start.isoformat()}, {end.isoformat()})"
    url = Settings().database_url
    if not url:
        return _page("Not configured", "DATABASE_URL is not set for Airflow's API server.", 503)
    try:
        html = stored_report_html(url, start, end)
    except CandlekeepError as exc:
        return _page("Market database unavailable", str(exc), 503)
    if html is None:
        return _page(
            "No report yet",
            f"No data-quality report exists yet for the period {period}: the run's"
            " publish task writes it.",
        )
    return HTMLResponse(html)


class CandlekeepPlugin(AirflowPlugin):
    name = "candlekeep"
    fastapi_apps: ClassVar[list[dict[str, Any]]] = [
        {"app": app, "url_prefix": "/candlekeep", "name": "candlekeep"}
    ]
    external_views: ClassVar[list[dict[str, Any]]] = [
        {
            "name": "Data quality",
            "href": "candlekeep/report/{DAG_ID}/{RUN_ID}",  # relative to Airflow's base URL
            "destination": "dag_run",
            "url_route": "data-quality",  # the tab only appears with a url_route
        }
    ]
