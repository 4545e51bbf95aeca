"""Where every file of a curation run lives (docs/curation.md, "Output formats"); nothing else spells these paths.

  .lvd-lock                            the process writing the run (pid, host, start time; `infra.output_lock`)
  config.json                          the resolved settings of the last run
  sources.parquet/part-<id>.parquet    one row per input file; its presence marks the source done
  work/clip_rows/part-<id>.parquet     that source's clip rows (written before the source row)
  work/clips/<id>/<clip>.mp4           clip files (`<clip>` = `clip_id(<id>, n)`)
  work/frames/<id>/<clip>.jpg          the clip's first/middle/last frames stacked in one JPEG
  work/frames/<id>/<clip>.video.jpg    the video captioner's frames of the clip (only while it is active)
  work/annotations/part-<id>.parquet   learned-scorer columns of that source's clips
  work/downloads/                      local copies of remote sources while they are processed
  work/renders/<id>/                   an orbit run's (`lvd orbits`) Blender views of an asset while it renders
  manifest.parquet, shards/*.tar, summary.json   written once every source is done
  hq/shards/hq-*.tar, hq/summary.json  the stage III high-quality subset
  report.md, report/*.png              the LVD-F report and its figures

`<id>` is `source_id(relative path of the source)`.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

SOURCE_ID_LENGTH = 64
LOCK_NAME = ".lvd-lock"
# In a train-stage's exported pipeline folder: how its weights were trained (export, EMA, how far they moved, the
# motion-bucket mapping, noise, frames), for whoever generates with or finetunes it next. diffusers ignores it.
TRAINING_METADATA_FILE = "lvd_training.json"


def source_id(relative_path: str) -> str:
    """The stable id of a source in its per-source file names: the full SHA-256 of its path relative to the
    input, as the file system spells it (names that are not UTF-8 have ids too). Ids of 48 bits let two names
    share one id (a pair is found in minutes), and then one source silently replaced the other."""
    return hashlib.sha256(os.fsencode(relative_path)).hexdigest()


def source_label(relative_path: str) -> str:
    """How a source is named in the tables: its relative path, with bytes that are not UTF-8 (file names may be
    any bytes) written as \\xNN escapes, since Parquet and JSON hold UTF-8 text only."""
    try:
        relative_path.encode("utf-8")
        return relative_path
    except UnicodeEncodeError:
        return os.fsencode(relative_path).decode("utf-8", "backslashreplace")


_BYTES_PREFIX = "/bytes:"  # relative paths never start with '/'


def portable_source(relative_path: str) -> str:
    """A relative path as UTF-8 text that JSON (Prefect parameters) carries and `native_source` undoes."""
    try:
        relative_path.encode("utf-8")
        return relative_path
    except UnicodeEncodeError:
        return _BYTES_PREFIX + os.fsencode(relative_path).hex()


def native_source(portable: str) -> str:
    """The relative path (as the file system spells it) from `portable_source`'s text."""
    if portable.startswith(_BYTES_PREFIX):
        return os.fsdecode(bytes.fromhex(portable.removeprefix(_BYTES_PREFIX)))
    return portable


def clip_id(sid: str, index: int) -> str:
    """The id of a source's `index`-th clip (also its file stem)."""
    return f"{sid}-{index:04d}"


def clip_file_name(clip: str) -> str:
    """The file of clip `clip` (a `clip_id`) in its source's clip directory: an MP4 named after the clip."""
    return f"{clip}.mp4"


def video_frames_path(frames_path: str | Path) -> Path:
    """The video captioner's frames of a clip, next to its first/middle/last strip (`frames_path`)."""
    return Path(frames_path).with_suffix(".video.jpg")


def _part(sid: str) -> str:
    return f"part-{sid}.parquet"


@dataclass(frozen=True)
class RunLayout:
    """The paths of one curation run under `out`."""

    out: Path

    def __init__(self, out: str | Path) -> None:
        object.__setattr__(self, "out", Path(out))

    @property
    def lock(self) -> Path:
        return self.out / LOCK_NAME

    @property
    def config(self) -> Path:
        return self.out / "config.json"

    @property
    def sources(self) -> Path:
        return self.out / "sources.parquet"

    def source_part(self, relative_path: str) -> Path:
        return self.sources / _part(source_id(relative_path))

    def is_committed(self, relative_path: str) -> bool:
        """Whether the source's row is in place (one file check: resuming a run of millions of sources
        streams its listing through this instead of loading every committed id)."""
        return os.path.exists(os.path.join(self.sources, _part(source_id(relative_path))))

    def committed_source_ids(self) -> set[str]:
        """Ids of the committed sources (their source row is in place)."""
        return {part.stem.removeprefix("part-") for part in self.sources.glob("part-*.parquet")}

    @property
    def work(self) -> Path:
        return self.out / "work"

    @property
    def clip_rows(self) -> Path:
        return self.work / "clip_rows"

    def clip_rows_part(self, sid: str) -> Path:
        return self.clip_rows / _part(sid)

    @property
    def clips(self) -> Path:
        return self.work / "clips"

    @property
    def frames(self) -> Path:
        return self.work / "frames"

    def clip_file(self, sid: str, clip: str) -> Path:
        return self.clips / sid / clip_file_name(clip)

    def clip_frames(self, sid: str, clip: str) -> Path:
        """A clip's first/middle/last frames; `video_frames_path` of it holds the video captioner's frames."""
        return self.frames / sid / f"{clip}.jpg"

    @property
    def annotations(self) -> Path:
        return self.work / "annotations"

    def annotations_part(self, sid: str) -> Path:
        return self.annotations / _part(sid)

    def renders(self, sid: str) -> Path:
        """Scratch folder of one asset's orbit views while Blender renders them (removed once encoded)."""
        return self.work / "renders" / sid

    @property
    def dedup(self) -> Path:
        """Near-duplicate removal (docs/dedup.md): groups.parquet, state.json and the scratch vector file."""
        return self.work / "dedup"

    @property
    def duplicate_groups(self) -> Path:
        return self.dedup / "groups.parquet"

    @property
    def dedup_state(self) -> Path:
        """What the groups were computed from (settings, method, clips): a rerun with the same recomputes nothing."""
        return self.dedup / "state.json"

    @property
    def dedup_vectors(self) -> Path:
        """Scratch: every clip's signature, one row each, read through a memory map (deleted when done)."""
        return self.dedup / "vectors.bin"

    @property
    def downloads(self) -> Path:
        return self.work / "downloads"

    @property
    def manifest(self) -> Path:
        return self.out / "manifest.parquet"

    @property
    def shards(self) -> Path:
        return self.out / "shards"

    @property
    def summary(self) -> Path:
        return self.out / "summary.json"

    @property
    def hq(self) -> Path:
        """The stage III subset: a directory training reads like a run (it has shards/)."""
        return self.out / "hq"

    @property
    def hq_shards(self) -> Path:
        return self.hq / "shards"

    @property
    def hq_summary(self) -> Path:
        return self.hq / "summary.json"

    @property
    def report(self) -> Path:
        return self.out / "report.md"

    @property
    def report_figures(self) -> Path:
        return self.out / "report"


# Inside a training stage's exported pipeline folder (stageN/pipeline/): a LoRA finetune's adapter alone, in
# peft's format (adapter_config.json, adapter_model.safetensors); diffusers' pipeline loader ignores it.
LORA_ADAPTER_DIR = "unet_lora"
