"""The "Data quality" view (dags/candlekeep_plugin.py) in a real Airflow API server.

``airflow api-server`` runs in a subprocess against a fresh PostgreSQL metadata database, with
the plugins folder set to ``dags/`` and the default SimpleAuthManager (two users, passwords in
the file it reads). Nothing about authentication is mocked: tokens come from ``/auth/token``,
DAG runs are created through the REST API, reports are rows in the market database.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from urllib.parse import quote

import httpx
import pytest

from shared.store import db

from .conftest import REPO
from .services import _admin, with_database

pytestmark = pytest.mark.integration

DAG_ID = "candle_reconciliation"
PASSWORDS = {"admin": secrets.token_urlsafe(12), "vera": secrets.token_urlsafe(12)}
MARKER = "<h1>candlekeep test report 2030-01-01T00</h1>"


class Api:
    def __init__(self, base: str, market_url: str) -> None:
        self.base, self.market_url = base, market_url
        self.http = httpx.Client(base_url=base, timeout=30)

    def token(self, user: str) -> str:
        response = self.http.post(
            "/auth/token", json={"username": user, "password": PASSWORDS[user]}
        )
        assert response.status_code == 201, response.text
        return response.json()["access_token"]

    def trigger(self, **body) -> str:
        response = self.http.post(
            f"/api/v2/dags/{DAG_ID}/dagRuns",
            json={"logical_date": None, **body},
            headers={"Authorization": f"Bearer {self.token('admin')}"},
        )
        assert response.status_code == 200, response.text
        return response.json()["dag_run_id"]

    def report(self, run_id: str, dag_id: str = DAG_ID, **kwargs) -> httpx.Response:
        # the URL the UI's iframe loads: the plugin's href, {DAG_ID}/{RUN_ID} URI-encoded
        url = f"{self.base}/candlekeep/report/{quote(dag_id, '')}/{quote(run_id, '')}"
        return httpx.get(url, timeout=30, **kwargs)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _airflow(env: dict, *args: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "airflow", *args], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, f"airflow {' '.join(args)} failed:\n{proc.stderr[-3000:]}"


@pytest.fixture(scope="module")
def api(database_url, tmp_path_factory) -> Iterator[Api]:
    home = tmp_path_factory.mktemp("airflow_home")
    meta = f"airflow_meta_{uuid.uuid4().hex[:12]}"
    _admin(database_url, "CREATE DATABASE {}", meta)
    db.upgrade(database_url)
    passwords = home / "passwords.json"
    passwords.write_text(json.dumps(PASSWORDS))
    meta_url = db.sqlalchemy_url(with_database(database_url, meta))
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env |= {
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": meta_url,
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC": meta_url,
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin,vera:viewer",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
        "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(32),
        "DATABASE_URL": database_url,
    }
    port = _free_port()
    log = home / "api-server.log"
    proc = None
    try:
        _airflow(env, "db", "migrate")
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "airflow", "api-server", "-H", "127.0.0.1", "-p", str(port)],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        _airflow(env, "dags", "reserialize")  # meanwhile the API server starts
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, f"api-server exited:\n{log.read_text()[-3000:]}"
            try:
                if httpx.get(f"{base}/api/v2/monitor/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"api-server not up:\n{log.read_text()[-3000:]}"
            time.sleep(0.5)
        client = Api(base, database_url)
        yield client
        client.http.close()
    finally:
        if proc is not None:
            os.killpg(proc.pid, 15)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait()
        _admin(database_url, "DROP DATABASE IF EXISTS {} WITH (FORCE)", meta)


def _store_report(url: str, start: str, end: str, html: str) -> None:
    with db.connect(url) as conn:
        conn.execute(
            "INSERT INTO dq_reports (interval_start, interval_end, status, summary, html)"
            " VALUES (%s, %s, 'pass', '{}', %s) ON CONFLICT (interval_start, interval_end)"
            " DO UPDATE SET html = EXCLUDED.html",
            (start, end, html),
        )
        conn.commit()


def test_plugin_loads_with_a_data_quality_tab_on_dag_runs(api):
    headers = {"Authorization": f"Bearer {api.token('vera')}"}
    plugins = api.http.get("/api/v2/plugins", headers=headers).json()["plugins"]
    (plugin,) = [p for p in plugins if p["name"] == "candlekeep"]
    (view,) = plugin["external_views"]
    assert view["name"] == "Data quality" and view["destination"] == "dag_run"
    assert view["url_route"] and view["href"] == "candlekeep/report/{DAG_ID}/{RUN_ID}"
    assert [a["url_prefix"] for a in plugin["fastapi_apps"]] == ["/candlekeep"]
    # the plugin sits in the DAGs folder: the DAG processor still parses it cleanly
    errors = api.http.get("/api/v2/importErrors", headers=headers).json()
    assert errors["total_entries"] == 0, errors


def test_the_report_route_requires_airflow_authentication(api):
    start, end = "2030-01-01T00:00:00Z", "2030-01-01T01:00:00Z"
    run_id = api.trigger(conf={"start": start, "end": end})
    _store_report(api.market_url, start, end, f"<html><body>{MARKER}</body></html>")
    anonymous = api.report(run_id)
    assert anonymous.status_code == 401 and MARKER not in anonymous.text
    for auth in ({"headers": {"Authorization": "Bearer not-a-jwt"}}, {"cookies": {"_token": "x"}}):
        refused = api.report(run_id, **auth)
        assert refused.status_code == 403 and MARKER not in refused.text
    # a well-formed token signed with another secret is no better
    forged = "eyJhbGciOiJIUzUxMiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJhZG1pbiJ9.c2lnbmF0dXJl"
    assert api.report(run_id, headers={"Authorization": f"Bearer {forged}"}).status_code == 403

    token = api.token("vera")  # role viewer: may read DAG runs
    as_bearer = api.report(run_id, headers={"Authorization": f"Bearer {token}"})
    assert as_bearer.status_code == 200, as_bearer.text
    assert as_bearer.text == f"<html><body>{MARKER}</body></html>"
    assert as_bearer.headers["content-type"].startswith("text/html")
    # the UI's iframe sends no header, only the session cookie the UI logged in with
    as_iframe = api.report(run_id, cookies={"_token": token})
    assert as_iframe.status_code == 200 and MARKER in as_iframe.text


def test_clear_pages_when_there_is_no_report(api):
    headers = {"Authorization": f"Bearer {api.token('vera')}"}
    # a run with a logical date reconciles its data interval: [02:00, 03:00)
    run_id = api.trigger(logical_date="2030-01-01T03:00:00Z")
    page = api.report(run_id, headers=headers)
    assert page.status_code == 200 and "No report yet" in page.text
    assert "2030-01-01T02:00:00+00:00, 2030-01-01T03:00:00+00:00" in page.text
    _store_report(api.market_url, "2030-01-01T02:00Z", "2030-01-01T03:00Z", "<p>published</p>")
    assert api.report(run_id, headers=headers).text == "<p>published</p>"

    no_interval = api.report(api.trigger(), headers=headers)  # no params, no logical date
    assert no_interval.status_code == 200 and "has no interval" in no_interval.text
    missing = api.report("manual__nope", headers=headers)
    assert missing.status_code == 404 and "No such DAG run" in missing.text
    other = api.report("any", dag_id="some_other_dag", headers=headers)
    assert other.status_code == 200 and f"Only {DAG_ID} runs" in other.text
