"""The tables of a curation run: one pyarrow schema per file, and every column list derived from it.

`sources.parquet` has one row per input file (and the Ray node that processed it: null in a run without Ray),
`manifest.parquet` one row per clip (the same row is each shard sample's `KEY.json`), `work/annotations/` the
learned scorers' columns per clip. Readers spell column names through `Column`, which is checked against the
schemas when this module is imported, so a renamed column fails loudly instead of reading as null.
"""

from __future__ import annotations

import pyarrow as pa

# The `captions` struct: one caption per captioner of the paper; the trainer draws one of them per sample.
CAPTION_SOURCES = ("coca", "video", "llm_summary")
CAPTIONS_TYPE = pa.struct([(name, pa.string()) for name in CAPTION_SOURCES])

SOURCES_SCHEMA = pa.schema(
    [
        ("source", pa.string()), ("status", pa.string()), ("error", pa.string()), ("num_frames", pa.int64()),
        ("fps", pa.float64()), ("width", pa.int64()), ("height", pa.int64()), ("duration_s", pa.float64()),
        ("cuts", pa.list_(pa.int64())), ("node_id", pa.string()),
    ]
)
MANIFEST_SCHEMA = pa.schema(
    [
        ("clip_id", pa.string()), ("source", pa.string()), ("start_frame", pa.int64()), ("end_frame", pa.int64()),
        ("start_s", pa.float64()), ("end_s", pa.float64()), ("fps", pa.float64()), ("width", pa.int64()),
        ("height", pa.int64()), ("motion_score", pa.float64()), ("text_area", pa.float64()),
        ("aesthetic_score", pa.float64()), ("clip_score", pa.float64()), ("caption", pa.string()),
        ("keep", pa.bool_()), ("drop_reasons", pa.list_(pa.string())), ("shard", pa.string()), ("key", pa.string()),
        ("clip_method", pa.string()), ("captions", CAPTIONS_TYPE), ("scorer_errors", pa.list_(pa.string())),
        ("raft_motion", pa.float64()), ("hq", pa.bool_()),
        # exact-copy clips: frames decoded but not shown before/after the shot (an edit list hides them)
        ("pre_roll_frames", pa.int64()), ("post_roll_frames", pa.int64()),
        ("pre_roll_bytes", pa.int64()), ("post_roll_bytes", pa.int64()),
        # near-duplicate removal (docs/dedup.md): the clip id of the clip kept in this clip's group, null otherwise
        ("duplicate_of", pa.string()),
    ]
)
# Per-source staging rows (work/clip_rows/): the manifest row plus where the clip file and its frames live.
CLIP_PART_SCHEMA = MANIFEST_SCHEMA.append(pa.field("clip_path", pa.string())).append(
    pa.field("frames_path", pa.string())
).append(pa.field("frame_hash", pa.binary()))  # curation/phash.py: pHash of first/middle/last frame and their crops
# Scored columns that the learned scorers add to a clip, as merged into the manifest by `finalize`.
ANNOTATED_COLUMNS = ("text_area", "aesthetic_score", "clip_score", "caption", "captions", "scorer_errors")
# work/annotations/ rows: the clip id, the scored columns, and which scorers produced them (for resuming).
ANNOTATION_SCHEMA = pa.schema(
    [pa.field("clip_id", pa.string())]
    + [MANIFEST_SCHEMA.field(name) for name in ANNOTATED_COLUMNS]
    + [pa.field("annotated_by", pa.list_(pa.string()))]
    # the clip's mean CLIP image embedding (L2-normalised, float16 bytes) for near-duplicate removal; null without CLIP
    + [pa.field("clip_embedding", pa.binary())]
)
# work/dedup/groups.parquet: one row per clip in a group of near-duplicates (singletons have none); `group` is the
# smallest clip id of the group.
DUPLICATE_GROUPS_SCHEMA = pa.schema([("clip_id", pa.string()), ("group", pa.string())])

# Orbit renders of 3D assets (`lvd orbits`): the manifest row plus the orbit's cameras (docs/multiview.md). The
# source is the asset's path; each clip is one orbit, frame i the view at azimuth `azimuths_deg[i]`.
CAMERA_FIELDS = (
    pa.field("elevation_deg", pa.float64()), pa.field("azimuths_deg", pa.list_(pa.float64())),
    pa.field("camera_radius", pa.float64()), pa.field("fov_deg", pa.float64()),
)
ORBIT_MANIFEST_SCHEMA = pa.schema(list(MANIFEST_SCHEMA) + list(CAMERA_FIELDS))
ORBIT_PART_SCHEMA = ORBIT_MANIFEST_SCHEMA.append(pa.field("clip_path", pa.string())).append(
    pa.field("frames_path", pa.string())
)

SOURCE_COLUMNS = tuple(SOURCES_SCHEMA.names)
MANIFEST_COLUMNS = tuple(MANIFEST_SCHEMA.names)
ANNOTATION_COLUMNS = tuple(ANNOTATION_SCHEMA.names)


class Column:
    """Names of the columns code reads by name (manifest, source and annotation tables)."""

    CLIP_ID = "clip_id"
    NODE_ID = "node_id"
    SOURCE = "source"
    STATUS = "status"
    ERROR = "error"
    START_FRAME = "start_frame"
    END_FRAME = "end_frame"
    FPS = "fps"
    WIDTH = "width"
    HEIGHT = "height"
    MOTION_SCORE = "motion_score"
    TEXT_AREA = "text_area"
    AESTHETIC_SCORE = "aesthetic_score"
    CLIP_SCORE = "clip_score"
    RAFT_MOTION = "raft_motion"
    CAPTION = "caption"
    CAPTIONS = "captions"
    KEEP = "keep"
    DROP_REASONS = "drop_reasons"
    SHARD = "shard"
    KEY = "key"
    CLIP_METHOD = "clip_method"
    PRE_ROLL_FRAMES = "pre_roll_frames"
    POST_ROLL_FRAMES = "post_roll_frames"
    PRE_ROLL_BYTES = "pre_roll_bytes"
    POST_ROLL_BYTES = "post_roll_bytes"
    SCORER_ERRORS = "scorer_errors"
    HQ = "hq"
    CLIP_PATH = "clip_path"
    FRAMES_PATH = "frames_path"
    ANNOTATED_BY = "annotated_by"
    DUPLICATE_OF = "duplicate_of"
    FRAME_HASH = "frame_hash"
    CLIP_EMBEDDING = "clip_embedding"
    GROUP = "group"
    ELEVATION = "elevation_deg"
    AZIMUTHS = "azimuths_deg"
    CAMERA_RADIUS = "camera_radius"
    FOV = "fov_deg"


# Score columns a report plots (all float64 in the manifest).
SCORE_COLUMNS = (Column.MOTION_SCORE, Column.TEXT_AREA, Column.AESTHETIC_SCORE, Column.CLIP_SCORE, Column.RAFT_MOTION)

_KNOWN = (set(SOURCE_COLUMNS) | set(CLIP_PART_SCHEMA.names) | set(ANNOTATION_COLUMNS)
          | set(DUPLICATE_GROUPS_SCHEMA.names) | set(ORBIT_PART_SCHEMA.names))
_UNKNOWN = sorted(value for name, value in vars(Column).items() if name.isupper() and value not in _KNOWN)
if _UNKNOWN:  # pragma: no cover - a typo here must stop every import, not read as a null column later
    raise ImportError(f"dataformat.Column names columns no schema has: {_UNKNOWN}")


def select_columns(row: dict, schema: pa.Schema) -> dict:
    """The row restricted to the schema's columns (missing ones null), in schema order."""
    return {name: row.get(name) for name in schema.names}


def _fits(value: object, data_type: pa.DataType) -> bool:
    """Whether a JSON value can be read as a column of `data_type` (null always can)."""
    if value is None:
        return True
    if pa.types.is_boolean(data_type):
        return isinstance(value, bool)
    if pa.types.is_integer(data_type):
        return isinstance(value, int) and not isinstance(value, bool)
    if pa.types.is_floating(data_type):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if pa.types.is_string(data_type):
        return isinstance(value, str)
    if pa.types.is_list(data_type):
        return isinstance(value, list) and all(_fits(item, data_type.value_type) for item in value)
    if pa.types.is_struct(data_type):
        return isinstance(value, dict) and all(
            _fits(value.get(field.name), field.type) for field in data_type)
    return True  # binary columns never reach a KEY.json


def row_type_error(row: object, schema: pa.Schema = ORBIT_MANIFEST_SCHEMA) -> str | None:
    """Why a `KEY.json` row does not fit `schema` (first wrong field, one line), or None when it does. Fields the
    schema does not name are left alone (image samples carry their own); a present field must have its column's
    type, so a trainer never reads `"fps": "fast"` as a number."""
    if not isinstance(row, dict):
        return f"KEY.json is a {type(row).__name__}, not an object"
    for field in schema:
        if field.name in row and not _fits(row[field.name], field.type):
            return f"KEY.json field {field.name!r} is {row[field.name]!r}, expected {field.type}"
    return None
