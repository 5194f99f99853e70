"""A throwaway OpenSSH server on 127.0.0.1 for tests that need a real SSH remote.

`start_sshd(workdir)` generates a host key and a client key pair into `workdir`, writes an
sshd_config that accepts only that client key, and starts `sshd -D` as a child process on a
free loopback port. Call `.stop()` on the result (a fixture finalizer) to end it.

sshd ships in Debian's `openssh-server`. When /usr/sbin/sshd is missing and we run as root
with apt-get available, the package is installed; otherwise `SSHDUnavailable` says what to
install. Logging in as root needs sshd to run as root too (privilege separation), so the
server is only usable by root; as any other user the error says so.
"""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from aptget import apt_install
from pgserver import free_port

SSHD = Path("/usr/sbin/sshd")
PRIVSEP_DIR = Path("/run/sshd")  # Debian's sshd refuses to start without it


class SSHDUnavailable(RuntimeError):
    """No OpenSSH server can be started here; the message says what to do."""


def ensure_sshd() -> Path:
    """Path of sshd, installing Debian's openssh-server first when possible."""
    if SSHD.exists():
        return SSHD
    if os.geteuid() != 0:
        raise SSHDUnavailable(
            f"{SSHD} is missing and installing it needs root: run `sudo apt-get install openssh-server` "
            "(the SSH remote tests also need to run as root, since sshd must run as root to log anyone in)"
        )
    if shutil.which("apt-get") is None:
        raise SSHDUnavailable(f"{SSHD} is missing and there is no apt-get here: install an OpenSSH server")
    failure = apt_install(("openssh-server",))
    if failure:
        raise SSHDUnavailable(failure)
    if not SSHD.exists():
        raise SSHDUnavailable(f"openssh-server was installed but {SSHD} is still missing")
    return SSHD


def _keygen(path: Path, comment: str) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
                   check=True, capture_output=True, text=True)


@dataclass
class SSHServer:
    host: str
    port: int
    user: str
    keyfile: Path  # the client's private key, accepted by this server only
    workdir: Path
    process: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def log(self) -> Path:
        return self.workdir / "sshd.log"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def ssh(self, *command: str) -> subprocess.CompletedProcess:
        """Run a command over SSH with the throwaway key, trusting only this server's host key."""
        return subprocess.run(
            ["ssh", "-p", str(self.port), "-i", str(self.keyfile),
             "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
             "-o", f"UserKnownHostsFile={self.workdir / 'known_hosts'}", "-o", "StrictHostKeyChecking=yes",
             "-o", "ConnectTimeout=10",
             f"{self.user}@{self.host}", *command],
            capture_output=True, text=True, timeout=60,
        )

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.process = None


def _wait_until_listening(server: SSHServer, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert server.process is not None
        if server.process.poll() is not None:
            raise SSHDUnavailable(f"sshd exited with status {server.process.returncode}:\n{server.log_text()}")
        try:
            with socket.create_connection((server.host, server.port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise SSHDUnavailable(f"sshd did not listen on {server.host}:{server.port} within {timeout:.0f}s:\n"
                          f"{server.log_text()}")


def start_sshd(workdir: Path) -> SSHServer:
    """Start a key-only sshd on 127.0.0.1 with keys and config in `workdir`; check a login works."""
    sshd = ensure_sshd()
    if os.geteuid() != 0:
        raise SSHDUnavailable("the SSH remote tests must run as root: sshd can only log in other users as root")
    workdir.mkdir(parents=True, exist_ok=True)
    PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)

    host_key = workdir / "ssh_host_ed25519_key"
    client_key = workdir / "id_ed25519"
    _keygen(host_key, "throwaway test host key")
    _keygen(client_key, "throwaway test client key")
    authorized = workdir / "authorized_keys"
    authorized.write_text(client_key.with_suffix(".pub").read_text())
    authorized.chmod(0o600)

    port = free_port()
    host = "127.0.0.1"
    # Pin this server's host key for the `ssh` client used to check the login.
    public_host_key = host_key.with_suffix(".pub").read_text().split()
    (workdir / "known_hosts").write_text(f"[{host}]:{port} {public_host_key[0]} {public_host_key[1]}\n")

    config = workdir / "sshd_config"
    config.write_text("\n".join([
        f"Port {port}",
        f"ListenAddress {host}",
        f"HostKey {host_key}",
        f"PidFile {workdir / 'sshd.pid'}",
        f"AuthorizedKeysFile {authorized}",
        "StrictModes no",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "PermitRootLogin prohibit-password",
        "UsePAM no",
        "X11Forwarding no",
        "PrintMotd no",
        "LogLevel INFO",
        # DVC's SSH remote talks SFTP; the built-in server needs no helper binary.
        "Subsystem sftp internal-sftp",
        "",
    ]))
    check = subprocess.run([str(sshd), "-t", "-f", str(config)], capture_output=True, text=True)
    if check.returncode != 0:
        raise SSHDUnavailable(f"sshd rejected its test config:\n{check.stderr}")

    log = (workdir / "sshd.log").open("w")
    server = SSHServer(host=host, port=port, user=getpass.getuser(), keyfile=client_key, workdir=workdir)
    # -D: stay in the foreground as our child; -e: log to stderr (our log file).
    server.process = subprocess.Popen([str(sshd), "-D", "-e", "-f", str(config)],
                                      stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    log.close()
    try:
        _wait_until_listening(server)
        probe = server.ssh("true")
        if probe.returncode != 0:
            raise SSHDUnavailable(f"test login to {host}:{port} failed ({probe.returncode}): {probe.stderr}\n"
                                  f"sshd log:\n{server.log_text()}")
    except BaseException:
        server.stop()
        raise
    return server
