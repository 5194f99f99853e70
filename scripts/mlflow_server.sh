#!/usr/bin/env bash
# The team's MLflow tracking server in one command: runs, the model registry, and its users and
# permissions in one PostgreSQL database; artifacts stored by the server itself (clients upload
# and download through it, so they need no access to the storage). Every request needs a user
# name and password (MLflow's basic-auth app); docs/mlflow.md has the whole set-up.
#
#   MLFLOW_BACKEND_STORE_URI        required, e.g. postgresql://mlflow:secret@db-host:5432/mlflow
#   MLFLOW_AUTH_ADMIN_PASSWORD      required, at least 12 characters: the admin user's password
#                                   when the server first creates it (MLflow ignores it after)
#   MLFLOW_AUTH_ADMIN_USERNAME      the admin user (default admin)
#   MLFLOW_FLASK_SERVER_SECRET_KEY  required, at least 32 characters: signs the UI's forms (CSRF);
#                                   e.g. python3 -c 'import secrets; print(secrets.token_hex(32))'
#   MLFLOW_AUTH                     off: no authentication at all, refused unless on loopback
#   MLFLOW_TLS_CERTFILE, MLFLOW_TLS_KEYFILE  serve HTTPS with this certificate (PEM) and key;
#                                   required to bind to anything but loopback
#   MLFLOW_ARTIFACTS_DESTINATION    where the server keeps artifacts (default ./mlartifacts-server;
#                                   any URI mlflow supports, e.g. s3://bucket/prefix)
#   MLFLOW_HOST, MLFLOW_PORT        what to bind (default 127.0.0.1 and 5000)
#
#   MLFLOW_SERVER_ALLOWED_HOSTS     more Host header values to accept (comma-separated), e.g. the
#                                   name behind a proxy, added to the bound host and port
#
# Extra arguments go to `mlflow server`, but only those that cannot undo the rules above
# (--workers, --static-prefix, --expose-prometheus, --cors-allowed-origins, --secrets-cache-ttl,
# --secrets-cache-max-size): click takes the last of a repeated option, so a later --host,
# --uvicorn-opts or --app-name would replace the script's bind address, TLS or authentication.
# The database URI reaches mlflow through the environment, never its argv (`ps` shows argv to
# every local user). Pipelines log to it with MLFLOW_TRACKING_URI=https://<host>:<port>; see
# docs/mlflow.md.
set -euo pipefail

die() {
    echo "error: $*" >&2
    exit 2
}

# Extra arguments: an allow-list, not a deny-list (mlflow gains options with every release).
safe_options="--workers -w --static-prefix --expose-prometheus --cors-allowed-origins --secrets-cache-ttl --secrets-cache-max-size"
extra=("$@")
for ((i = 0; i < ${#extra[@]}; i++)); do
    arg="${extra[i]}"
    name="${arg%%=*}"
    if [[ " $safe_options " != *" $name "* ]]; then
        # Quoted and escaped (printf %q): an argument may hold a newline or an escape sequence.
        die "argument $(printf %q "$name") is not allowed after the script: it could undo the bind address, TLS or authentication it sets; use MLFLOW_HOST, MLFLOW_PORT, MLFLOW_TLS_CERTFILE, MLFLOW_SERVER_ALLOWED_HOSTS (allowed arguments: ${safe_options// /, })"
    fi
    [[ "$arg" == *=* ]] || i=$((i + 1))  # the option's value follows it
done
# Environment variables mlflow itself reads that would do the same.
for var in MLFLOW_SERVER_DISABLE_SECURITY_MIDDLEWARE MLFLOW_GUNICORN_OPTS MLFLOW_UVICORN_OPTS MLFLOW_WAITRESS_OPTS MLFLOW_SERVER_X_FRAME_OPTIONS; do
    [[ -z "${!var:-}" ]] || die "$var is set: it would replace the server's TLS or security settings; unset it"
done

backend="${MLFLOW_BACKEND_STORE_URI:-}"
[[ -n "$backend" ]] || die "MLFLOW_BACKEND_STORE_URI is not set; set it to the team database, e.g. postgresql://user:password@host:5432/mlflow"

artifacts="${MLFLOW_ARTIFACTS_DESTINATION:-./mlartifacts-server}"
host="${MLFLOW_HOST:-127.0.0.1}"
port="${MLFLOW_PORT:-5000}"
[[ "$port" =~ ^[0-9]+$ ]] && ((port >= 1 && port <= 65535)) || die "MLFLOW_PORT: got '$port': must be a port number (1-65535)"

auth="${MLFLOW_AUTH:-on}"
[[ "$auth" == on || "$auth" == off ]] || die "MLFLOW_AUTH: got '$auth': must be on (the default) or off"
case "$host" in
    127.* | ::1 | localhost) loopback=true ;;
    *) loopback=false ;;
esac
# Off the loopback interface anyone on the network can connect: without authentication they
# could read and change every run, and without TLS they would read the passwords on the wire.
if [[ "$loopback" == false ]]; then
    [[ "$auth" == on ]] || die "MLFLOW_AUTH=off is only allowed on loopback (MLFLOW_HOST=127.0.0.1), got MLFLOW_HOST=$host"
    [[ -n "${MLFLOW_TLS_CERTFILE:-}" ]] || die "MLFLOW_HOST=$host is not loopback: set MLFLOW_TLS_CERTFILE and MLFLOW_TLS_KEYFILE (basic auth sends passwords with every request), or bind to 127.0.0.1 behind a TLS proxy"
fi

# A stop waits at most 10 s for open requests: a client holding a connection open (a stalled
# upload, an idle pipeline) must not keep a supervisor's restart waiting for ever.
uvicorn_opts="--timeout-graceful-shutdown 10"
if [[ -n "${MLFLOW_TLS_CERTFILE:-}${MLFLOW_TLS_KEYFILE:-}" ]]; then
    for var in MLFLOW_TLS_CERTFILE MLFLOW_TLS_KEYFILE; do
        [[ -r "${!var:-}" ]] || die "$var: got '${!var:-}': must name a readable PEM file (set both MLFLOW_TLS_CERTFILE and MLFLOW_TLS_KEYFILE)"
    done
    # uvicorn, MLflow's default server, terminates TLS itself: no proxy to install or configure.
    uvicorn_opts+=" --ssl-certfile $(printf %q "$MLFLOW_TLS_CERTFILE") --ssl-keyfile $(printf %q "$MLFLOW_TLS_KEYFILE")"
    scheme=https
else
    scheme=http
fi

# "not set" or "too short (N characters)": the length of a secret, never the secret itself.
unfit() { ((${#1} == 0)) && echo "not set" || echo "too short (${#1} characters)"; }
if [[ "$auth" == on ]]; then
    password="${MLFLOW_AUTH_ADMIN_PASSWORD:-}"
    ((${#password} >= 12)) || die "MLFLOW_AUTH_ADMIN_PASSWORD is $(unfit "$password"); set it to the admin's password, at least 12 characters (or MLFLOW_AUTH=off, loopback only)"
    secret="${MLFLOW_FLASK_SERVER_SECRET_KEY:-}"
    ((${#secret} >= 32)) || die "MLFLOW_FLASK_SERVER_SECRET_KEY is $(unfit "$secret"); set it to at least 32 random characters, e.g. \$(python3 -c 'import secrets; print(secrets.token_hex(32))')"
    export MLFLOW_AUTH_ADMIN_USERNAME="${MLFLOW_AUTH_ADMIN_USERNAME:-admin}"
fi

# Browsers send the Host header they were pointed at: accepting only the names this server is
# served under defeats DNS rebinding (a hostile page whose name resolves to this address).
case "$host" in
    0.0.0.0 | :: | "") die "MLFLOW_HOST=$host binds every interface; bind the one address clients use (MLFLOW_SERVER_ALLOWED_HOSTS adds names for it)" ;;
esac
if [[ "$loopback" == true ]]; then
    allowed="127.0.0.1:$port,localhost:$port,[::1]:$port"
else
    allowed="$host:$port"
fi
if [[ -n "${MLFLOW_SERVER_ALLOWED_HOSTS:-}" ]]; then
    names='^[][A-Za-z0-9.:*,-]+$'  # ']' first in a bracket expression is literal
    [[ "$MLFLOW_SERVER_ALLOWED_HOSTS" =~ $names ]] || die "MLFLOW_SERVER_ALLOWED_HOSTS: got '$MLFLOW_SERVER_ALLOWED_HOSTS': must be host names or host:port, comma-separated"
    [[ ",$MLFLOW_SERVER_ALLOWED_HOSTS," != *",*,"* ]] || die "MLFLOW_SERVER_ALLOWED_HOSTS: '*' accepts any host name and undoes the DNS rebinding check; name the hosts clients use"
    allowed+=",$MLFLOW_SERVER_ALLOWED_HOSTS"
fi

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
if [[ "$auth" == on ]]; then
    has_module flask_wtf || die "MLflow's basic-auth app needs Flask-WTF; install it with: $python_bin -m pip install -c requirements.lock 'mlflow[auth]==3.17.2'"
fi

# A plain path (no scheme) is a local directory: make it absolute so the startup line says
# exactly where artifacts go, whatever directory the server was started from.
if [[ "$artifacts" != *://* ]]; then
    mkdir -p -- "$artifacts"
    artifacts="$(cd -- "$artifacts" && pwd)"
fi

export MLFLOW_DISABLE_TELEMETRY="${MLFLOW_DISABLE_TELEMETRY:-true}"
# MLflow's job runner (GenAI evaluation and trace jobs, 8 extra processes) does nothing for
# this project; set MLFLOW_SERVER_ENABLE_JOB_EXECUTION=true to have it anyway.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"

# Never print the database password, in whatever form the URI holds it (user:password@, a
# ?password= parameter): the project's one masking rule, given the URI on stdin, not argv.
here="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)"
shown="$(PYTHONPATH="$here/../src" "$python_bin" -m imgclf.redact <<<"$backend")" || die "cannot mask the backend URI for display (is $here/../src/imgclf there?)"
echo "mlflow server: backend $shown, artifacts $artifacts, authentication $auth, listening on $scheme://$host:$port" >&2

# mlflow reads the URI from this variable (click's envvar): `ps` shows argv to every local user,
# while a process's environment only to its owner and root.
export MLFLOW_BACKEND_STORE_URI="$backend"
server=("$mlflow_bin" server --serve-artifacts --artifacts-destination "$artifacts"
        --host "$host" --port "$port" --allowed-hosts "$allowed" --uvicorn-opts "$uvicorn_opts")
if [[ "$auth" == off ]]; then
    # exec: the server gets this process's signals, so Ctrl-C or a supervisor's stop reach it.
    exec "${server[@]}" "$@"
fi

# The auth app reads its settings from a file. Users and permissions go to the runs' database
# (one database to back up; MLflow keeps its own alembic_version_auth table there), so the file
# holds the database password: private (mode 0600, outside the checkout) and removed on exit.
# Every uvicorn worker reads it when it starts, so it stays for the server's lifetime.
config="$(umask 077 && mktemp "${TMPDIR:-/tmp}/mlflow-auth.XXXXXX")"
trap 'rm -f -- "$config"' EXIT
# Users start with no access: an account made for one project sees nothing of another's runs
# until `make mlflow-user` grants it READ or EDIT on this project's experiment and model.
# Checking a password costs about 0.6 s of CPU (a deliberately slow hash), on every request: a
# pipeline makes hundreds. A worker remembers a good password for 60 s; a password changed or a
# user deleted through another worker (with --workers > 1) is still accepted until then.
# ConfigParser reads % as interpolation: double it (URL-encoded passwords contain it).
cat >"$config" <<EOF
[mlflow]
default_permission = NO_PERMISSIONS
database_uri = ${backend//%/%%}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
grant_default_workspace_access = false
auth_cache_ttl_seconds = 60
EOF
export MLFLOW_AUTH_CONFIG_PATH="$config"
"${server[@]}" --app-name basic-auth "$@" &
child=$!
# Not exec (the trap must remove the file): pass a stop on to the server, then wait for it.
trap 'kill -TERM "$child" 2>/dev/null || true' TERM INT HUP
status=0
wait "$child" || status=$?
if kill -0 "$child" 2>/dev/null; then
    # A signal ended the first wait early: wait for the server to finish stopping.
    status=0
    wait "$child" || status=$?
fi
exit "$status"
