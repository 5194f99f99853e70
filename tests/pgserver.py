"""A throwaway PostgreSQL cluster for tests: its own data directory, a free loopback port,
trust authentication for local connections only, and a database `mlflow`.

PostgreSQL refuses to run as root, so when the tests run as root the cluster belongs to the
`postgres` system user (its directory is created outside pytest's tmp_path, which that user
cannot enter). Everything is removed again by `PgServer.stop()`.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

DATABASE = "mlflow"
SUPERUSER = "postgres"


def free_port() -> int:
    """A TCP port nobody listens on right now (the caller binds it soon after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def pg_bindir() -> Path:
    """Where initdb and pg_ctl live: $PG_BINDIR, Debian's versioned directory, or PATH."""
    override = os.environ.get("PG_BINDIR")
    if override:
        return Path(override)
    versioned = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if versioned:
        return Path(versioned[-1]).parent
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    message = "PostgreSQL server binaries (initdb, pg_ctl) not found; install postgresql or set PG_BINDIR"
    if os.environ.get("CI"):  # .ci/run installs it: in CI a missing server is a failure
        pytest.fail(message)
    pytest.skip(message)


@dataclass
class PgServer:
    root: Path
    port: int
    bindir: Path
    as_user: list[str] = field(default_factory=list)
    running: bool = False

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def log_file(self) -> Path:
        return self.root / "server.log"

    @property
    def uri(self) -> str:
        """What `mlflow server --backend-store-uri` takes (psycopg2 is SQLAlchemy's default driver)."""
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{DATABASE}"

    def _run(self, tool: str, *args: str) -> subprocess.CompletedProcess:
        cmd = [*self.as_user, str(self.bindir / tool), *args]
        # LC_ALL=C: initdb refuses locales that are not installed, and C is always there.
        env = {**os.environ, "LC_ALL": "C", "LANG": "C"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
        if proc.returncode != 0:
            log = self.log_file.read_text(errors="replace")[-2000:] if self.log_file.exists() else ""
            raise RuntimeError(f"{tool} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}\n{log}")
        return proc

    def start(self) -> None:
        self._run("initdb", "-D", str(self.data_dir), "-U", SUPERUSER, "-E", "UTF8",
                  "--auth-local=trust", "--auth-host=trust")
        # Replace initdb's pg_hba.conf: trust the Unix socket and 127.0.0.1, nothing else
        # (no ::1, no networks), so the trust rule can only ever apply to this machine.
        self._write_as_owner(self.data_dir / "pg_hba.conf",
                             "local all all trust\nhost all all 127.0.0.1/32 trust\n")
        options = " ".join([
            f"-p {self.port}",
            "-c listen_addresses=127.0.0.1",
            f"-c unix_socket_directories={self.root}",
            # A test cluster: durability buys nothing and fsync costs seconds on shared disks.
            "-c fsync=off", "-c synchronous_commit=off", "-c full_page_writes=off",
        ])
        self._run("pg_ctl", "-D", str(self.data_dir), "-l", str(self.log_file), "-o", options,
                  "-w", "-t", "60", "start")
        self.running = True
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", SUPERUSER, DATABASE)

    def _write_as_owner(self, path: Path, text: str) -> None:
        path.write_text(text)
        if self.as_user:
            shutil.chown(path, user=SUPERUSER, group=SUPERUSER)

    def shutdown(self) -> None:
        if self.running:
            # immediate: nothing in a throwaway cluster needs a clean checkpoint.
            self._run("pg_ctl", "-D", str(self.data_dir), "-m", "immediate", "-w", "stop")
            self.running = False

    def stop(self) -> None:
        """Shut the server down and delete the cluster."""
        try:
            self.shutdown()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def start_postgres(attempts: int = 3) -> PgServer:
    """Start a fresh cluster; the caller must call `stop()` (a finalizer) when done."""
    bindir = pg_bindir()
    as_user: list[str] = []
    root = Path(tempfile.mkdtemp(prefix="imgclf-pg-"))
    if os.geteuid() == 0:
        as_user = ["runuser", "-u", SUPERUSER, "--"]
        shutil.chown(root, user=SUPERUSER, group=SUPERUSER)
    last: Exception | None = None
    for _ in range(attempts):
        server = PgServer(root=root, port=free_port(), bindir=bindir, as_user=as_user)
        try:
            server.start()
            return server
        except RuntimeError as exc:
            # Most likely another process took the port between free_port() and start.
            last = exc
            server.shutdown()
            shutil.rmtree(server.data_dir, ignore_errors=True)
            time.sleep(0.5)
    shutil.rmtree(root, ignore_errors=True)
    raise RuntimeError(f"could not start PostgreSQL after {attempts} attempts: {last}")
