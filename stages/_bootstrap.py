"""Make `import imgclf` resolve to this checkout's src/, not to an installed copy.

`dvc exp run --temp/--queue` runs stages in a temporary copy of the repository; an editable
install would still point at the workspace's src/ and silently run the wrong code.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
