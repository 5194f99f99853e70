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
