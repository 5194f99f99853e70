"""Secrets never leak: every printed URL masked in every form a credential takes, the tracking
client's password never sent on to another host, and the server script's database URI and
safety rules out of reach of its extra arguments."""

from __future__ import annotations

import http.server
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from fixtures import ROOT
from imgclf import tracking
from imgclf.config import check_mirrors
from imgclf.redact import masked, printable, quoted
from teamserver import SCRIPT, script_env

# Built at run time: the credential scan of tracked files stays clean.
PW = "s3" + "cr3t-" + "Xq9"


def login(user: str, password: str = PW) -> str:
    """`user:password`, joined here so that no URL in this file holds one literally."""
    return f"{user}:{password}"


@pytest.mark.parametrize("url, shown", [
    (f"postgresql://{login('mlflow')}@db:5432/mlflow", "postgresql://***@db:5432/mlflow"),
    (f"https://{PW}@github.com/org/repo.git", "https://***@github.com/org/repo.git"),  # token-only user
    (f"https://{login(PW, 'x-oauth-basic')}@github.com/r", "https://***@github.com/r"),  # token as the user name
    (f"postgresql://{login('u', PW + '/with?odd#chars')}@db/mlflow", "postgresql://***@db/mlflow"),  # unencoded '/?#'
    (f"postgresql://db/mlflow?sslmode=require&password={PW}", "postgresql://db/mlflow?sslmode=***&password=***"),
    (f"https://h/x?token={PW}", "https://h/x?token=***"),
    (f"https://acct.blob.core.windows.net/c?sv=2022&sig={PW}", "https://acct.blob.core.windows.net/c?sv=***&sig=***"),
    (f"https://s3.example/b/k?X-Amz-Credential={PW}&X-Amz-Signature={PW}",
     "https://s3.example/b/k?X-Amz-Credential=***&X-Amz-Signature=***"),
    ("https://host:8443/path/a@b", "https://***@b"),  # ambiguous: masked rather than risked
    ("https://host/path/a@b", "https://host/path/a@b"),  # an '@' in a path is not user info
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
    ("sqlite:////home/me/mlflow.db", "sqlite:////home/me/mlflow.db"),
])
def test_masked_hides_every_form_of_credential(url, shown):
    assert masked(url) == shown
    assert PW not in masked(url)


def test_names_are_quoted_with_every_unprintable_character_escaped():
    raw = "a\nb\x1b[2Jc\u202etxt.png\udcff"  # newline, terminal escape, bidi override, a non-UTF-8 byte
    assert quoted(raw) == r"'a\x0ab\x1b[2Jc\u202etxt.png\xff'"
    assert quoted("it's") == r"'it\'s'" and quoted("Corn_(maize)") == "'Corn_(maize)'"
    assert printable("Pfirsich_Blätter 桃") == "Pfirsich_Blätter 桃"  # readable text stays as it is


def test_every_error_and_log_line_of_an_entry_point_is_masked_and_on_one_line(tmp_path):
    """cli.run is the one place lines leave a stage: a message that forgot to mask a URL or
    quote a name still shows no credential, and no raw newline or escape sequence."""
    code = (
        "import logging\n"
        "from imgclf import cli\n"
        "from imgclf.errors import DataError\n"
        "def main():\n"
        f"    logging.getLogger('x').warning('fetching %s', 'https://h/f?token={PW}')\n"
        f"    raise DataError('bad name a\\nb\\x1b[31m from https://{login('u')}@h/d')\n"
        "cli.run(main)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin"},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.splitlines()
    assert len(lines) == 2 and PW not in proc.stderr and "\x1b" not in proc.stderr
    assert lines[0].endswith("WARNING x: fetching https://h/f?token=***")
    assert lines[1] == r"error: bad name a\x0ab\x1b[31m from https://***@h/d"


@pytest.mark.parametrize("mirror", [f"https://h/mnist/?token={PW}", f"https://{PW}@h/mnist/"])
def test_mirror_with_a_credential_is_refused_masked(mirror):
    with pytest.raises(ValueError) as info:
        check_mirrors(["https://ok.example/", mirror])
    assert PW not in str(info.value) and "mirrors[1] 'https://" in str(info.value)


def test_a_wrongly_typed_mirror_list_is_echoed_masked(tmp_path):
    from imgclf.config import ConfigError, load_dataset

    params = {"datasets": {"mnist": {"format": "idx", "mirrors": f"https://{login('u')}@h/", "files": {}}}}
    with pytest.raises(ConfigError) as info:
        load_dataset("mnist", params)
    assert PW not in str(info.value) and "***@h/" in str(info.value), str(info.value)


# --- credentials never follow a redirect to another host ---------------------------------------

@contextmanager
def _server(host: str, answer) -> Iterator[tuple[str, list[dict[str, str]]]]:
    """A loopback HTTP server on `host`; `answer(handler)` replies; yields its URL and the
    headers of every request it got."""
    seen: list[dict[str, str]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append({k.lower(): v for k, v in self.headers.items()})
            answer(self)

        do_POST = do_GET

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer((host, 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://{host}:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()


def _json(handler, body: dict) -> None:
    data = json.dumps(body).encode()
    handler.send_response(200)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


@pytest.mark.parametrize("client", ["probe", "mlflow"])
def test_basic_auth_never_follows_a_redirect_to_another_host(client, monkeypatch):
    """The tracking server (127.0.0.1) redirects every request to another host (127.0.0.2,
    another port): the password reaches the first and never the second, whether the project's
    own probe (urllib, which copies headers on redirect) or MLflow's client (requests) asks."""
    with _server("127.0.0.2", lambda h: _json(h, {"experiments": [], "user": {"username": "x"}})) as (other, taken):
        def redirect(handler):
            handler.send_response(307)
            handler.send_header("Location", other + handler.path)
            handler.send_header("Content-Length", "0")
            handler.end_headers()

        with _server("127.0.0.1", redirect) as (url, asked):
            monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
            monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PW)
            monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
            if client == "probe":
                tracking.check_reachable(url)
            else:
                import mlflow

                mlflow.MlflowClient(tracking_uri=url).search_experiments()
    assert asked and all(h.get("authorization", "").startswith("Basic ") for h in asked)
    assert taken, "the redirect was not followed: the test proves nothing"
    assert [h for h in taken if "authorization" in h] == []


def test_the_probe_keeps_its_credentials_on_a_same_origin_redirect(monkeypatch):
    def answer(handler):
        if handler.path.startswith("/moved"):
            _json(handler, {"user": {"username": "alice", "is_admin": True}})
            return
        handler.send_response(302)
        handler.send_header("Location", "/moved" + handler.path)
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    with _server("127.0.0.1", answer) as (url, asked):
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PW)
        tracking.check_reachable(url)
    moved = [h for h in asked if h.get("authorization")]
    assert len(moved) == len(asked) >= 2


# --- the server script ----------------------------------------------------------------------------

def _fake_mlflow(tmp_path):
    """A stand-in `mlflow` printing its argv and the URI it finds in its environment."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "mlflow").write_text('#!/bin/sh\nprintf "argv %s\\n" "$@"\necho "env $MLFLOW_BACKEND_STORE_URI"\n')
    (fake / "mlflow").chmod(0o755)
    (fake / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (fake / "python").chmod(0o755)
    return fake


def _run_script(tmp_path, *args: str, **env: str) -> subprocess.CompletedProcess:
    fake = _fake_mlflow(tmp_path)
    full = script_env(MLFLOW_AUTH="off", **env)
    full["PATH"] = f"{fake}:{full['PATH']}"
    return subprocess.run([str(SCRIPT), *args], cwd=tmp_path, env=full, capture_output=True, text=True, timeout=60)


def test_server_script_prints_no_password_in_any_form_and_keeps_it_out_of_argv(tmp_path):
    backend = f"postgresql+psycopg2://mlflow@db:5432/mlflow?sslmode=require&password={PW}"
    proc = _run_script(tmp_path, MLFLOW_BACKEND_STORE_URI=backend)
    assert proc.returncode == 0, proc.stderr
    assert PW not in proc.stderr and "postgresql+psycopg2://***@db:5432/mlflow?sslmode=***&password=***" in proc.stderr
    argv = [line for line in proc.stdout.splitlines() if line.startswith("argv ")]
    assert argv and not any(PW in line for line in argv)
    assert f"env {backend}" in proc.stdout.splitlines()  # it reaches mlflow, through the environment


@pytest.mark.parametrize("args", [
    ["--host", "0.0.0.0"], ["-h", "0.0.0.0"], ["--workers", "2", "--host=0.0.0.0"],
    ["--uvicorn-opts", "--timeout-keep-alive 5"], ["--gunicorn-opts=-b 0.0.0.0:80"], ["--waitress-opts", ""],
    ["--app-name", "basic-auth"], ["--allowed-hosts", "*"], ["--disable-security-middleware"], ["--dev"],
    ["--backend-store-uri", "sqlite:///x.db"], ["--port", "80"],
], ids=lambda a: " ".join(a))
def test_server_script_refuses_extra_arguments_that_could_undo_its_rules(tmp_path, args):
    proc = _run_script(tmp_path, *args, MLFLOW_BACKEND_STORE_URI="sqlite:///x.db")
    assert proc.returncode == 2, proc.stdout
    name = next(a for a in args if a.startswith("-") and a not in ("--workers",)).split("=")[0]
    assert proc.stderr.splitlines() == [
        f"error: argument {name} is not allowed after the script: it could undo the bind address, TLS or "
        "authentication it sets; use MLFLOW_HOST, MLFLOW_PORT, MLFLOW_TLS_CERTFILE, MLFLOW_SERVER_ALLOWED_HOSTS "
        "(allowed arguments: --workers, -w, --static-prefix, --expose-prometheus, --cors-allowed-origins, "
        "--secrets-cache-ttl, --secrets-cache-max-size)"]
    assert proc.stdout == ""  # mlflow never started


def test_server_script_passes_safe_extra_arguments_after_its_own(tmp_path):
    proc = _run_script(tmp_path, "--workers", "3", "--static-prefix=/mlflow",
                       MLFLOW_BACKEND_STORE_URI="sqlite:///x.db", MLFLOW_SERVER_ALLOWED_HOSTS="mlflow.example.org")
    assert proc.returncode == 0, proc.stderr
    argv = [line.removeprefix("argv ") for line in proc.stdout.splitlines() if line.startswith("argv ")]
    assert argv[-3:] == ["--workers", "3", "--static-prefix=/mlflow"]
    assert argv[argv.index("--allowed-hosts") + 1] == "127.0.0.1:5000,localhost:5000,[::1]:5000,mlflow.example.org"


@pytest.mark.parametrize("var", ["MLFLOW_SERVER_DISABLE_SECURITY_MIDDLEWARE", "MLFLOW_UVICORN_OPTS"])
def test_server_script_refuses_environment_that_mlflow_would_read_to_undo_its_rules(tmp_path, var):
    proc = _run_script(tmp_path, MLFLOW_BACKEND_STORE_URI="sqlite:///x.db", **{var: "true"})
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        f"error: {var} is set: it would replace the server's TLS or security settings; unset it"]


def test_server_script_refuses_a_wildcard_that_accepts_any_host(tmp_path):
    proc = _run_script(tmp_path, MLFLOW_BACKEND_STORE_URI="sqlite:///x.db", MLFLOW_SERVER_ALLOWED_HOSTS="a.org,*")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [
        "error: MLFLOW_SERVER_ALLOWED_HOSTS: '*' accepts any host name and undoes the DNS rebinding check; "
        "name the hosts clients use"]
