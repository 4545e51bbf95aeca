"""Incremental builds for a chain of long steps (curate -> train stages -> FVD -> generate): redo only what changed.

Each step has a fingerprint of everything it depends on (settings, the upstream step's outputs). The ledger
keeps one JSON record per step under `ROOT/.pipeline/STEP.json` (its format, reads and writes are
`dataformat.PipelineLayout`'s): the fingerprint it ran with and, once it finished, its result. A step whose
fingerprint matches a finished record is reused; an interrupted step ("started" record) or one whose inputs
changed runs again. The steps' own resume logic (curation by source, training from checkpoints) works
underneath; the ledger only decides whether to call them and how.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dataformat import PipelineLayout


def fingerprint(*parts: Any) -> str:
    """A short hash of JSON-able parts (anything else by its str)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_fingerprint(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.is_file() else None


def listing_fingerprint(directory: str | Path) -> str:
    """Names and sizes of the files under a local folder (cheap: no content is read)."""
    root = Path(directory)
    if not root.is_dir():
        return fingerprint(str(directory))
    return fingerprint(sorted((str(p.relative_to(root)), p.stat().st_size) for p in root.rglob("*") if p.is_file()))


class Ledger:
    """One JSON record per step under ROOT/.pipeline (`PipelineLayout.ledger`): the fingerprint of its inputs
    and, once done, its result."""

    def __init__(self, root: str | Path) -> None:
        self.layout = PipelineLayout(root)

    def read(self, step: str) -> dict[str, Any] | None:
        return self.layout.read_step(step)

    def write(self, step: str, record: dict[str, Any]) -> None:
        self.layout.write_step(step, record)

    def finished(self, step: str, inputs: str) -> dict[str, Any] | None:
        """The step's record when it finished with exactly these inputs."""
        record = self.read(step)
        if record and record.get("state") == "finished" and record.get("inputs") == inputs:
            return record
        return None

    def changed(self, step: str, inputs: str) -> bool:
        """True when the step ran before with other inputs (so its own resume state is stale)."""
        record = self.read(step)
        return bool(record) and record.get("inputs") != inputs

    def run(self, step: str, inputs: str, run: Callable[[], Any], *,
            reusable: Callable[[Any], bool] = lambda result: True,
            before: Callable[[dict[str, Any] | None], None] | None = None, **extra: Any) -> tuple[Any, bool]:
        """`(result, reused)`: the recorded result when `step` finished with these inputs and
        `reusable(result)` (its outputs still exist...), else `run()`'s, recorded. `before(previous record)` runs
        first when the step runs (e.g. to drop outputs keyed by something the fingerprint changed)."""
        previous = self.finished(step, inputs)
        if previous is not None and reusable(previous.get("result")):
            return previous["result"], True
        if before is not None:
            before(self.read(step))
        self.write(step, {"state": "started", "inputs": inputs, **extra})
        result = run()
        self.write(step, {"state": "finished", "inputs": inputs, **extra, "result": result})
        return result, False
