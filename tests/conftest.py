import os
import signal
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

# Tests never phone home and never write to the developer's own MLflow store.
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ["DO_NOT_TRACK"] = "true"

# A shell without job control starts background commands (`make test &`, nohup) with SIGINT
# ignored, and every child inherits that: Python then never raises KeyboardInterrupt, and the
# Ctrl-C tests would test the runner, not the stages. Give the stages a terminal's Ctrl-C.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


# `make test` hands whole files to the xdist workers (--dist loadfile) in collection order
# (pyproject.toml: --no-loadscope-reorder, or xdist starts the files with the fewest tests,
# the long end-to-end ones here, last). So the longest files go first, and no long file
# starts near the end while the other worker runs out of work. Longest first as measured with
# `pytest --durations=0` (2026-12-02, AVX2 kernels: 34-161 s each); the other files follow in name order.
LONGEST_FIRST = (
    "test_team.py", "test_tracking_server.py", "test_pipeline.py", "test_registry.py",
    "test_image_folder_workflow.py", "test_s3.py", "test_mlflow_ui.py", "test_interrupt.py",
    "test_real_data.py", "test_distributed.py", "test_more_datasets.py",
)


def pytest_collection_modifyitems(items):
    missing = [name for name in LONGEST_FIRST if not (Path(__file__).parent / name).is_file()]
    if missing:  # a renamed file would silently go last
        raise pytest.UsageError(f"tests/conftest.py LONGEST_FIRST names no such file: {', '.join(missing)}")
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its order


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
