import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

# Tests never phone home and never write to the developer's own MLflow store.
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ["DO_NOT_TRACK"] = "true"


@pytest.fixture
def tiny_fashion(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    from fixtures import make_fashion_like

    directory = tmp_path / "mirror"
    return directory, make_fashion_like(directory)
