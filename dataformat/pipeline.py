"""Where the whole DAG (`lvd pipeline`, flow `lvd-pipeline`) writes: the run, stage and evaluation layouts
composed under one output root.

    OUT/curate/              a curation run (`RunLayout`): shards/, manifest.parquet, hq/, summary.json, ...
    OUT/train/stageN/        training stage N (`StageLayout`)
    OUT/fvd-real-clips/      the curated clips as MP4 files, the smoke-test FVD reference (no `fvd_real_dir`)
    OUT/evaluate/            the FVD run (`EvaluationLayout`): results.json, sample_grid.jpg, videos/, shards/
    OUT/generate/            NNN.mp4, NNN.gif
    OUT/pipeline.md          the run's summary (also the `lvd-pipeline-summary` artifact)
    OUT/pipeline.json        the same as data (rewritten when the DAG finishes)
    OUT/.pipeline/STEP.json  what each step last ran with (the incremental-build ledger, flows/ledger.py):
                             {"state": "started" | "finished", "inputs": fingerprint, "result": ..., ...}
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from dataformat.atomic import atomic_write_json
from dataformat.evaluation import EvaluationLayout
from dataformat.layout import RunLayout
from dataformat.training import StageLayout


class PipelineLayout:
    """Every path of a whole-DAG run under `root`."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()

    @property
    def curate(self) -> RunLayout:
        return RunLayout(self.root / "curate")

    @property
    def train(self) -> Path:
        """The training output root: stage N writes `train/stageN/`."""
        return self.root / "train"

    def stage(self, stage: int, conditioning: str = "text") -> StageLayout:
        return StageLayout.of(self.train, stage, conditioning)

    @property
    def fvd_real(self) -> Path:
        return self.root / "fvd-real-clips"

    @property
    def evaluate(self) -> EvaluationLayout:
        return EvaluationLayout(self.root / "evaluate")

    @property
    def generate(self) -> Path:
        return self.root / "generate"

    @property
    def summary(self) -> Path:
        return self.root / "pipeline.md"

    @property
    def record(self) -> Path:
        return self.root / "pipeline.json"

    @property
    def ledger(self) -> Path:
        return self.root / ".pipeline"

    def step_record(self, step: str) -> Path:
        return self.ledger / f"{step}.json"

    # --- what the DAG writes itself ---------------------------------------------------------------

    def prepare(self) -> None:
        """Make the output root and drop the previous run's record: `pipeline.json` is rewritten when the DAG
        finishes, so a reader never takes a stale record for this run's."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.record.unlink(missing_ok=True)

    def read_step(self, step: str) -> dict[str, Any] | None:
        """The ledger's record of `step`, or None when there is none (or it cannot be read)."""
        try:
            return json.loads(self.step_record(step).read_text())
        except (OSError, ValueError):
            return None

    def write_step(self, step: str, record: dict[str, Any]) -> None:
        """Atomically: a reader sees the old record or the new one, never a torn file."""
        atomic_write_json(self.step_record(step), record)

    def drop_fvd_videos(self) -> None:
        """Delete the FVD run's generated videos and feature shards: evaluate-fvd keys its shards by checkpoint
        *path*, so a checkpoint retrained at the same path must not reuse them."""
        for stale in (self.evaluate.shards, self.evaluate.videos):
            shutil.rmtree(stale, ignore_errors=True)
