import os
import random
import signal
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from imgclf.cli import NO_TELEMETRY  # noqa: E402

# Tests never phone home (whatever the developer's environment says) and never write to the
# developer's own MLflow store.
os.environ.update(NO_TELEMETRY)

# A shell without job control starts background commands (`make test &`, nohup) with SIGINT
# ignored, and every child inherits that: Python then never raises KeyboardInterrupt, and the
# Ctrl-C tests would test the runner, not the stages. Give the stages a terminal's Ctrl-C.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


# Longest files first, so none starts last while the other worker idles (`make test`: --dist
# loadfile, --no-loadscope-reorder); test_real_data.py (one test) last, as a worker takes the
# next file along to finish a file's last test. Speed only: any order passes (--shuffle-files).
LONGEST_FIRST = (
    "test_team.py", "test_tracking_server.py", "test_image_folder_workflow.py", "test_registry.py",
    "test_pipeline.py", "test_mlflow_ui.py", "test_champion_pipeline.py", "test_lineage.py", "test_s3.py",
    "test_interrupt.py", "test_distributed.py", "test_champion.py", "test_memory.py", "test_more_datasets.py",
    "test_names.py", "test_real_data.py",
)


def pytest_addoption(parser):
    parser.addoption(
        "--shuffle-files", metavar="SEED", type=int, default=None,
        help="run the test files in an order shuffled with this seed instead of longest first "
             "(each file's tests keep their order): checks that no file depends on another's state")


def pytest_report_header(config):
    seed = config.getoption("--shuffle-files")
    return None if seed is None else f"test files shuffled with seed {seed}"


def pytest_collection_modifyitems(config, items):
    by_file: dict[Path, list] = {}
    for item in items:
        by_file.setdefault(item.path, []).append(item)
    seed = config.getoption("--shuffle-files")
    if seed is not None:
        files = sorted(by_file)  # a seed gives the same order whatever the collection order
        random.Random(seed).shuffle(files)
    else:
        here = Path(__file__).parent
        missing = [name for name in LONGEST_FIRST if not (here / name).is_file()]
        if missing:  # a renamed file would silently go last
            raise pytest.UsageError(f"tests/conftest.py names no such test file: {', '.join(missing)}")
        rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
        files = sorted(by_file, key=lambda path: rank.get(path.name, len(rank)))  # stable: the others in name order
    items[:] = [item for path in files for item in by_file[path]]


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
