"""What every entry point shares: logging set-up, no telemetry, and the one-line error contract.

`python -m imgclf.cli COMMAND [ARGS...]` runs another program (the Makefile's `mlflow ui`) with
the same environment.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable

from imgclf.diskspace import disk_error
from imgclf.errors import PipelineError
from imgclf.redact import safe_line

# No usage data leaves the machine. MLflow reads these when it is first imported, so they are
# set before any work (DVC's own switch is `core.analytics false` in .dvc/config).
NO_TELEMETRY = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}


def switch_off_telemetry() -> None:
    """Set NO_TELEMETRY in this process's environment (and its children's), unless already set."""
    for key, value in NO_TELEMETRY.items():
        os.environ.setdefault(key, value)


def run(main: Callable[[], None]) -> None:
    """Run a stage; a PipelineError becomes one line on stderr and exit status 2.

    IMGCLF_DEBUG=1 shows the full traceback instead.
    """
    switch_off_telemetry()
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_SafeRecords())
    logging.basicConfig(
        level=os.environ.get("IMGCLF_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        handlers=[handler],
    )
    # Third-party chatter (alembic migrations, mlflow notices) is not our stage's log.
    for noisy in ("alembic", "mlflow", "urllib3", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        main()
    except PipelineError as exc:
        if os.environ.get("IMGCLF_DEBUG"):
            raise
        _say(f"error: {exc}")
        sys.exit(2)
    except OSError as exc:
        # A full or read-only disk is the user's to fix: one line. Any other OSError is a bug.
        message = disk_error(exc)
        if message is None or os.environ.get("IMGCLF_DEBUG"):
            raise
        _say(f"error: {message}")
        sys.exit(2)
    except KeyboardInterrupt:
        _say("error: interrupted; outputs of this stage were left as they were")
        sys.exit(130)


class _SafeRecords(logging.Filter):
    """Every log line masked and on one line: a message that forgot to mask a URL or quote a
    file name still shows no password and no raw newline or terminal escape sequence."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = safe_line(record.getMessage()), None
        return True


def _say(line: str) -> None:
    # One write, newline included: print() writes text and newline separately, and under
    # torchrun two processes' lines on the shared stderr could then interleave.
    sys.stderr.write(safe_line(line) + "\n")
    sys.stderr.flush()


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python -m imgclf.cli COMMAND [ARGS...]")
    switch_off_telemetry()
    os.execvp(sys.argv[1], sys.argv[1:])
