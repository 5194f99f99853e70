#!/usr/bin/env bash
# The team's MLflow tracking server in one command: runs and the model registry in
# PostgreSQL, artifacts stored by the server itself (clients upload and download through it,
# so they need no access to the storage).
#
#   MLFLOW_BACKEND_STORE_URI      required, e.g. postgresql://mlflow:secret@db-host:5432/mlflow
#   MLFLOW_ARTIFACTS_DESTINATION  where the server keeps artifacts (default ./mlartifacts-server;
#                                 any URI mlflow supports, e.g. s3://bucket/prefix)
#   MLFLOW_HOST, MLFLOW_PORT      what to bind (default 127.0.0.1 and 5000)
#
# Extra arguments go to `mlflow server` unchanged (e.g. --workers 2, --allowed-hosts ...).
# Pipelines log to it with MLFLOW_TRACKING_URI=http://<host>:<port>; see docs/mlflow.md.
set -euo pipefail

die() {
    echo "error: $*" >&2
    exit 2
}

backend="${MLFLOW_BACKEND_STORE_URI:-}"
[[ -n "$backend" ]] || die "MLFLOW_BACKEND_STORE_URI is not set; set it to the team database, e.g. postgresql://user:password@host:5432/mlflow"

artifacts="${MLFLOW_ARTIFACTS_DESTINATION:-./mlartifacts-server}"
host="${MLFLOW_HOST:-127.0.0.1}"
port="${MLFLOW_PORT:-5000}"
[[ "$port" =~ ^[0-9]+$ ]] && ((port >= 1 && port <= 65535)) || die "MLFLOW_PORT: got '$port': must be a port number (1-65535)"

mlflow_bin="$(command -v mlflow || true)"
[[ -n "$mlflow_bin" ]] || die "mlflow is not on PATH; run 'make venv' and 'source .venv/bin/activate' first"

# SQLAlchemy 2.1 reads a bare postgresql:// as "use psycopg (version 3)"; this project pins
# psycopg2-binary, so name that driver explicitly when psycopg 3 is not installed. A missing
# driver would otherwise surface later as a traceback; say it in one line now.
python_bin="$(dirname -- "$mlflow_bin")/python"
[[ -x "$python_bin" ]] || python_bin=python3
has_module() { "$python_bin" -c "import $1" 2>/dev/null; }
case "$backend" in
    postgresql://*)
        if ! has_module psycopg; then
            has_module psycopg2 || die "no PostgreSQL driver for $python_bin; install it with: $python_bin -m pip install psycopg2-binary"
            backend="postgresql+psycopg2://${backend#postgresql://}"
        fi
        ;;
    postgresql+psycopg2://*)
        has_module psycopg2 || die "the psycopg2 driver is missing; install it with: $python_bin -m pip install psycopg2-binary"
        ;;
esac

# A plain path (no scheme) is a local directory: make it absolute so the startup line says
# exactly where artifacts go, whatever directory the server was started from.
if [[ "$artifacts" != *://* ]]; then
    mkdir -p -- "$artifacts"
    artifacts="$(cd -- "$artifacts" && pwd)"
fi

# Never print the database password.
shown="$(sed -E 's#(://[^:/@]+):[^@]*@#\1:***@#' <<<"$backend")"
echo "mlflow server: backend $shown, artifacts $artifacts, listening on http://$host:$port" >&2

export MLFLOW_DISABLE_TELEMETRY="${MLFLOW_DISABLE_TELEMETRY:-true}"
# MLflow's job runner (GenAI evaluation and trace jobs, 8 extra processes) does nothing for
# this project; set MLFLOW_SERVER_ENABLE_JOB_EXECUTION=true to have it anyway.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"
# exec: the server gets this process's signals, so Ctrl-C or a supervisor's stop reach it.
exec "$mlflow_bin" server \
    --backend-store-uri "$backend" \
    --serve-artifacts \
    --artifacts-destination "$artifacts" \
    --host "$host" \
    --port "$port" \
    "$@"
