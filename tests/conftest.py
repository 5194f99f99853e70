import os
import signal
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from imgclf.cli import NO_TELEMETRY  # noqa: E402
from shared import https_team_server, queued_runs, served_project, served_run, tiny_pipeline  # noqa: E402, F401

# Tests never phone home (whatever the developer's environment says) and never write to the
# developer's own MLflow store.
os.environ.update(NO_TELEMETRY)

# A shell without job control starts background commands (`make test &`, nohup) with SIGINT
# ignored, and every child inherits that: Python then never raises KeyboardInterrupt, and the
# Ctrl-C tests would test the runner, not the stages. Give the stages a terminal's Ctrl-C.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


# `make test` hands whole files to the xdist workers (--dist loadfile) in collection order
# (pyproject.toml: --no-loadscope-reorder, or xdist starts the files with the fewest tests,
# the long end-to-end ones here, last). So the longest files go first, and no long file
# starts near the end while the other worker runs out of work. Longest first as measured with
# `pytest --durations=0` (2026-12-03, Zen 3: 50-320 s each; a pair below counts as one),
# except test_real_data.py: a worker runs a test only once it holds the next one (for
# teardown), so a file of one test always takes the next file along, and the one-test file
# goes last to take a short one (simulated from those durations: 725 s of pytest against
# 750 s with it in its place). The other files follow in name order.
LONGEST_FIRST = (
    "test_team.py", "test_pipeline.py", "test_tracking_server.py", "test_mlflow_ui.py",
    "test_image_folder_workflow.py", "test_registry.py", "test_s3.py", "test_interrupt.py", "test_distributed.py",
    "test_more_datasets.py", "test_real_data.py",
)
# Files that share a session fixture (tests/shared.py) go to the same worker, so what they
# share is built once: a pipeline run from scratch, or a team server with its runs. Session
# fixtures are per worker; on two workers each would build its own, which is correct, only
# slower. Each pair's files keep LONGEST_FIRST's order, which the shared fixtures rely on
# (test_mlflow_ui.py reads the queued runs test_tracking_server.py's last test makes).
SAME_WORKER = (
    ("test_team.py", "test_pipeline.py"),  # tiny_pipeline
    ("test_tracking_server.py", "test_mlflow_ui.py"),  # https_team_server, served_run, queued_runs
)
_PARTNER = {name: "+".join(pair) for pair in SAME_WORKER for name in pair}


def pytest_collection_modifyitems(items):
    here = Path(__file__).parent
    missing = [name for name in {*LONGEST_FIRST, *_PARTNER} if not (here / name).is_file()]
    if missing:  # a renamed file would silently go last, or to its own worker
        raise pytest.UsageError(f"tests/conftest.py names no such test file: {', '.join(sorted(missing))}")
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    reversed_pairs = [pair for pair in SAME_WORKER if rank.get(pair[0], len(rank)) > rank.get(pair[1], len(rank))]
    if reversed_pairs:
        raise pytest.UsageError(f"tests/conftest.py: LONGEST_FIRST must list each SAME_WORKER pair in its order: {reversed_pairs}")
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its order


# tryfirst: ahead of xdist's own implementation, which would answer first otherwise. optionalhook:
# `pytest -p no:xdist` has no such hook.
@pytest.hookimpl(tryfirst=True, optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class PairedFiles(LoadFileScheduling):
        """--dist loadfile, with each SAME_WORKER pair one unit of work."""

        def _split_scope(self, nodeid: str) -> str:
            path = super()._split_scope(nodeid)
            return _PARTNER.get(Path(path).name, path)

    return PairedFiles(config, log)


@pytest.fixture
def tiny_fashion(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    from fixtures import make_fashion_like

    directory = tmp_path / "mirror"
    return directory, make_fashion_like(directory)


@pytest.fixture(scope="module")
def postgres(request):
    """A throwaway PostgreSQL cluster on loopback for one test module (tests/pgserver.py)."""
    from pgserver import start_postgres

    pg = start_postgres()
    request.addfinalizer(pg.stop)
    return pg
