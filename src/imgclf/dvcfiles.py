"""What the project reads back from DVC: the outputs dvc.lock records, and which stages a
`dvc repro` / `dvc exp run` says it ran or restored."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import yaml


class LockError(Exception):
    """dvc.lock is missing or unreadable (the message says which)."""


@dataclass(frozen=True)
class LockedOutput:
    stage: str
    md5: str


def locked_outputs(root: Path) -> dict[str, LockedOutput]:
    """{output path: its stage and hash} for every output recorded in `root`/dvc.lock."""
    lock = root / "dvc.lock"
    try:
        stages = (yaml.safe_load(lock.read_text(encoding="utf-8")) or {}).get("stages", {})
    except FileNotFoundError:
        raise LockError(f"{lock} is missing") from None
    except (OSError, AttributeError, yaml.YAMLError) as exc:
        raise LockError(f"{lock}: unreadable ({' '.join(str(exc).split())})") from None
    return {out["path"]: LockedOutput(stage, str(out.get("md5", "unknown")))
            for stage, entry in stages.items() for out in (entry or {}).get("outs", [])}


def stages_in(output: str) -> dict[str, list[str]]:
    """Which stages DVC ran, and which it restored from its run cache instead of running."""
    return {"ran": sorted(set(re.findall(r"Running stage '([^']+)'", output))),
            "restored_from_run_cache": sorted(set(re.findall(r"Stage '([^']+)' is cached - skipping run", output)))}
