"""A throwaway PostgreSQL server on loopback for tests (initdb + pg_ctl in a temp dir).

Import the ``postgres_server`` fixture into a test module. One server serves the whole
session, however many modules import the fixture; each test takes its own database from
``PostgresServer.create_database``. When PostgreSQL is missing or does not start, the
fixture FAILS (never skips): the Postgres profile must be tested, not silently ignored.
"""

from __future__ import annotations

import atexit
import glob
import os
import pwd
import secrets
import shlex
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

INSTALL_HINT = (
    "install the PostgreSQL server (Debian: `apt-get install -y postgresql`; .ci/run does "
    "this) or point RECAP_PG_BIN at the folder holding initdb and pg_ctl"
)


def find_pg_bin() -> Path:
    """The folder holding initdb/pg_ctl: $RECAP_PG_BIN, Debian's newest, or $PATH."""
    if os.environ.get("RECAP_PG_BIN"):
        chosen = Path(os.environ["RECAP_PG_BIN"])
        if not (chosen / "initdb").exists():
            raise FileNotFoundError(f"RECAP_PG_BIN={chosen} holds no initdb: {INSTALL_HINT}")
        return chosen
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0,
    )
    if candidates:
        return Path(candidates[-1]).parent
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).resolve().parent
    raise FileNotFoundError(
        f"PostgreSQL server binaries (initdb, pg_ctl) not found: {INSTALL_HINT}"
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class PostgresServer:
    """A running cluster: its port, superuser credentials and data directory."""

    port: int
    user: str
    password: str
    root: Path
    databases: list[str] = field(default_factory=list)

    def url(self, database: str = "postgres", driver: str = "") -> str:
        """libpq URL; ``driver="psycopg2"`` gives the SQLAlchemy form Dagster needs."""
        scheme = f"postgresql+{driver}" if driver else "postgresql"
        return f"{scheme}://{self.user}:{self.password}@127.0.0.1:{self.port}/{database}"

    def connect(self, database: str = "postgres"):
        import psycopg2

        return psycopg2.connect(self.url(database))

    def create_database(self, prefix: str = "recap") -> str:
        """A fresh, empty database; returns its name."""
        name = f"{prefix}_{secrets.token_hex(4)}"
        conn = self.connect()
        conn.autocommit = True  # CREATE DATABASE cannot run inside a transaction block
        try:
            with conn.cursor() as cur:
                cur.execute(f'CREATE DATABASE "{name}"')
        finally:
            conn.close()
        self.databases.append(name)
        return name


def _runner() -> tuple[list[str], int | None, int | None]:
    """(command prefix, uid, gid): PostgreSQL refuses to run as root, so drop to `postgres`."""
    if os.geteuid() != 0:
        return [], None, None
    try:
        account = pwd.getpwnam("postgres")
    except KeyError as exc:
        raise RuntimeError(
            "running as root and there is no `postgres` user to run the server as "
            "(the Debian package creates it)"
        ) from exc
    runuser = shutil.which("runuser")
    prefix = (
        [runuser, "-u", "postgres", "--"] if runuser else ["su", "postgres", "-s", "/bin/sh", "-c"]
    )
    return prefix, account.pw_uid, account.pw_gid


def _run(prefix: list[str], args: list[str], env: dict[str, str]) -> None:
    # `su -c` takes one shell string; runuser (or no prefix) takes the argument list.
    command = [*prefix, shlex.join(args)] if prefix[:1] == ["su"] else [*prefix, *args]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:2])} failed:\n{result.stdout}\n{result.stderr}")


def start_server() -> PostgresServer:
    """initdb + pg_ctl start on 127.0.0.1 and a free port, in a fresh temp dir."""
    bin_dir = find_pg_bin()
    prefix, uid, gid = _runner()
    # Not pytest's tmp_path: that lives under a 0700 root-owned tree `postgres` cannot enter.
    root = Path(tempfile.mkdtemp(prefix="recap-pg-"))
    server = PostgresServer(
        port=_free_port(), user="recap", password=secrets.token_hex(8), root=root
    )
    try:
        _init_and_start(server, bin_dir, prefix, uid, gid)
        deadline = time.monotonic() + 30
        while True:  # pg_ctl -w waits for the socket; make sure TCP with a password works too
            try:
                server.connect().close()
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
    except BaseException as exc:
        log = root / "server.log"
        detail = log.read_text()[-2000:] if log.exists() else ""
        stop_server(server)
        if isinstance(exc, Exception):
            raise RuntimeError(f"{exc}\n{detail}") from exc
        raise
    # A session killed before fixture teardown still stops the server at interpreter exit.
    atexit.register(stop_server, server)
    return server


def _init_and_start(
    server: PostgresServer, bin_dir: Path, prefix: list[str], uid: int | None, gid: int | None
) -> None:
    root = server.root
    data, sockets = root / "data", root / "sock"
    sockets.mkdir()
    (root / "pwfile").write_text(server.password + "\n")
    if uid is not None:
        for path in (root, sockets, root / "pwfile"):
            os.chown(path, uid, gid)
    env = {**os.environ, "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8"}
    _run(
        prefix,
        [
            str(bin_dir / "initdb"),
            "-D",
            str(data),
            "-U",
            server.user,
            f"--pwfile={root / 'pwfile'}",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",  # the URL's password is really checked
            "-E",
            "UTF8",
            "--no-sync",  # throwaway cluster: skip fsync for speed
        ],
        env,
    )
    options = (
        f"-c listen_addresses=127.0.0.1 -c port={server.port} "
        f"-c unix_socket_directories={sockets} -c max_connections=200 "
        "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
    )
    _run(
        prefix,
        [
            str(bin_dir / "pg_ctl"),
            "-D",
            str(data),
            "-l",
            str(root / "server.log"),
            "-o",
            options,
            "-w",
            "-t",
            "60",
            "start",
        ],
        env,
    )


def stop_server(server: PostgresServer) -> None:
    """Stop the cluster (if it runs) and delete its directory; safe to call twice."""
    if not server.root.exists():
        return
    try:
        if (server.root / "data" / "postmaster.pid").exists():
            prefix, _, _ = _runner()
            _run(
                prefix,
                [
                    str(find_pg_bin() / "pg_ctl"),
                    "-D",
                    str(server.root / "data"),
                    "-m",
                    "immediate",
                    "-w",
                    "stop",
                ],
                dict(os.environ),
            )
    finally:
        shutil.rmtree(server.root, ignore_errors=True)


_shared: dict[str, object] = {"server": None, "users": 0}


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One real PostgreSQL server for the session (FAILS the test when it cannot start)."""
    if _shared["server"] is None:
        try:
            _shared["server"] = start_server()
        except Exception as exc:
            pytest.fail(f"could not start a PostgreSQL server for the test: {exc}\n{INSTALL_HINT}")
    _shared["users"] = int(_shared["users"]) + 1  # type: ignore[arg-type]
    server = _shared["server"]
    assert isinstance(server, PostgresServer)
    try:
        yield server
    finally:
        _shared["users"] = int(_shared["users"]) - 1  # type: ignore[arg-type]
        if _shared["users"] == 0:
            _shared["server"] = None
            stop_server(server)
