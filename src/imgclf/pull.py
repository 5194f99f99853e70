"""`make pull` / `python -m imgclf.pull`: `dvc pull --run-cache`, and when it fails, one line
saying which outputs are missing and what to run.

DVC's own messages name the missing paths but not the way out: with no remote configured it
even prints "Everything is up to date." before failing. This wrapper runs the real `dvc pull`
(its output passes through unchanged), then, only on failure, works out from the git-tracked
`dvc.lock` and the workspace which outputs did not arrive, which stages produce them, and
whether a remote is configured at all. For an S3 remote it also tells apart the three ways the
storage itself can fail, which DVC reports as a stack of ERROR lines or not at all: refused
credentials, an endpoint that does not answer, and a bucket that does not exist (DVC then
reports every object as "missing", as if nobody had pushed).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from imgclf import cli, dvcfiles
from imgclf.errors import PipelineError
from imgclf.redact import masked

SHOWN = 4  # missing paths named in the message; the rest are counted

# botocore's words, as DVC 3.67 (dvc-s3 3.3) passes them on after "failed to connect to s3 (...) - "
# or, when the run cache is pulled first, "unexpected error - ".
S3_REFUSED = ("(403)", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied")
S3_UNREACHABLE = ("Could not connect to the endpoint URL", "Connect timeout on endpoint URL",
                  "Read timeout on endpoint URL")


class PullError(PipelineError):
    """`dvc pull` did not bring every output of dvc.lock into the workspace."""


def repo_root(start: Path) -> Path:
    """The nearest directory at or above `start` holding a `.dvc` folder."""
    for path in (start, *start.parents):
        if (path / ".dvc").is_dir():
            return path
    raise PullError(f"{start} is not inside a DVC project (no .dvc folder here or above): run this in your clone")


def locked_outputs(root: Path) -> dict[str, str]:
    """{output path: the stage that produces it} for every output recorded in dvc.lock."""
    try:
        return {path: out.stage for path, out in dvcfiles.locked_outputs(root).items()}
    except dvcfiles.LockError as exc:
        if not (root / "dvc.lock").exists():
            raise PullError(f"{exc}: nothing has been run and committed yet, so there is nothing to "
                            "pull; run `dvc repro`") from None
        raise PullError(str(exc)) from None


def _dvc(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["dvc", *args], cwd=root, capture_output=True, text=True, check=False)


def default_remote(root: Path) -> str | None:
    """The default remote's name (from .dvc/config or config.local), or None."""
    proc = _dvc(root, "remote", "default")
    name = proc.stdout.strip()
    return name if proc.returncode == 0 and name else None


def remote_settings(root: Path, remote: str) -> dict:
    """The remote's settings as DVC resolves them (.dvc/config merged with config.local)."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return dict(repo.config["remote"].get(remote, {}))


def s3_bucket_missing(root: Path, remote: str, bucket: str) -> bool:
    """Whether `bucket` does not exist, asked with the remote's own endpoint and credentials
    (one request). Any other answer (refused, unreachable) is not this diagnosis."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        s3 = repo.cloud.get_remote(remote).fs.fs  # s3fs, set up exactly as for the pull
        try:
            s3.ls(bucket)
        except FileNotFoundError:
            return True
        except OSError:  # how s3fs reports a refusal or a network error; DVC's output said which
            return False
    return False


def _s3_problem(root: Path, remote: str, missing: list[str], dvc_errors: list[str]) -> str | None:
    """The one-line explanation when an S3 remote's storage itself failed, or None."""
    settings = remote_settings(root, remote)
    url = settings.get("url", "")
    if not url.startswith("s3://"):
        return None
    endpoint = settings.get("endpointurl") or "AWS S3"
    where = f"remote {remote!r} ({masked(url)} at {masked(endpoint)})"
    lost = f"{len(missing)} outputs are missing ({_listing(missing)})"
    cause = next((e for e in dvc_errors if any(words in e for words in S3_REFUSED + S3_UNREACHABLE)), "")
    said = cause.split(" - ", 1)[-1]
    if any(word in cause for word in S3_REFUSED):
        return (f"dvc pull: {where} refused this workspace's credentials ({said}), so {lost}: set the keys the "
                f"team gave you with `dvc remote modify --local {remote} access_key_id <id>` and "
                f"`dvc remote modify --local {remote} secret_access_key <key>` (or `profile <name>`, or the AWS_* "
                "environment variables; see docs/team.md), then `make pull`")
    if any(words in cause for words in S3_UNREACHABLE):
        return (f"dvc pull: {where} does not answer ({said}), so {lost}: check that the address is right "
                f"(`dvc remote modify {remote} endpointurl <url>`), that the server is up and that your network "
                "or VPN reaches it, then `make pull`")
    bucket = url.removeprefix("s3://").split("/", 1)[0]
    if missing and s3_bucket_missing(root, remote, bucket):
        return (f"dvc pull: {where}: bucket {bucket!r} does not exist there, so {lost}: correct the bucket "
                f"(`dvc remote modify {remote} url s3://<bucket>/<prefix>`, in .dvc/config, committed) or, if "
                f"you are setting the remote up, create {bucket!r} and `dvc push --run-cache` into it; "
                "then `make pull`")
    return None


def _listing(paths: list[str]) -> str:
    shown = ", ".join(paths[:SHOWN])
    return shown + (f" and {len(paths) - SHOWN} more" if len(paths) > SHOWN else "")


def diagnose(root: Path, remote: str | None, dvc_errors: list[str]) -> str:
    """The one-line explanation of a failed pull; `dvc_errors` are DVC's ERROR lines, in order."""
    dvc_error = dvc_errors[-1] if dvc_errors else ""
    produced_by = locked_outputs(root)
    missing = sorted(p for p in produced_by if not (root / p).exists())
    stages = sorted({produced_by[p] for p in missing})
    if remote is None:
        return (f"dvc pull: no DVC remote is configured, so {len(missing)} outputs are missing "
                f"({_listing(missing)}): `git pull` the commit that adds the team's remote, or add it with "
                "`dvc remote add -d team <url>` (credentials with `dvc remote modify --local`; see docs/team.md), "
                "then `make pull`; or rebuild everything here with `dvc repro`")
    storage = _s3_problem(root, remote, missing, dvc_errors)
    if storage:
        return storage
    if not missing:
        # Everything is in the workspace; DVC failed on something else (the run cache, a lock).
        return f"dvc pull failed, though every output of dvc.lock is present: {dvc_error or 'see the DVC output above'}"
    # DVC's "Checkout failed for following targets:" only repeats the paths; anything else
    # (a refused login, an unreachable host) is the actual cause and is kept.
    said = f"; DVC said: {dvc_error}" if dvc_error and "Checkout failed" not in dvc_error else ""
    return (f"dvc pull: remote {remote!r} did not deliver {_listing(missing)} (stage{'s' if len(stages) > 1 else ''} "
            f"{', '.join(stages)}{said}): ask whoever committed dvc.lock "
            "(`git log -1 -- dvc.lock`) to run `dvc push --run-cache`, then `make pull` again; "
            f"or rebuild it here with `dvc repro {' '.join(stages)}`")


def _errors(output: str) -> list[str]:
    return [line.removeprefix("ERROR: ").strip() for line in output.splitlines() if line.startswith("ERROR:")]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="dvc pull --run-cache, with a one-line diagnosis when it fails",
        epilog="Extra arguments go to `dvc pull` (for example -r <remote> or a target).",
    )
    parser.add_argument("-r", "--remote", help="the remote to pull from (default: the default remote)")
    args, extra = parser.parse_known_args(argv)
    root = repo_root(Path.cwd())
    remote_args = ["-r", args.remote] if args.remote else []
    proc = subprocess.run(["dvc", "pull", "--run-cache", *remote_args, *extra], cwd=root, capture_output=True,
                          text=True, check=False)
    # DVC's own report first, as if it had been run directly.
    sys.stdout.write(proc.stdout)
    sys.stderr.write(proc.stderr)
    if proc.returncode == 0:
        return
    raise PullError(diagnose(root, args.remote or default_remote(root), _errors(proc.stdout + proc.stderr)))


if __name__ == "__main__":
    cli.run(main)
