"""The on-disk contract of the project: what curation writes and training and evaluation read.

A leaf package (it imports nothing from the rest of the project): table schemas and their column lists,
shard sample keys and video/image suffixes, the paths of a curation run, the seekable shard index,
atomic writes, the training-time caption mix, and where a training stage and the whole DAG write.
"""

from dataformat.atomic import (
    atomic_write,
    atomic_write_json,
    fsync_directory,
    parquet_dataset,
    read_parquet_rows,
    remove_stale_temporaries,
    write_parquet_atomic,
)
from dataformat.captions import CAPTION_MIX, check_caption_mix, pick_caption, training_caption
from dataformat.layout import (
    LOCK_NAME,
    SOURCE_ID_LENGTH,
    TRAINING_METADATA_FILE,
    RunLayout,
    clip_file_name,
    clip_id,
    native_source,
    portable_source,
    source_id,
    source_label,
    video_frames_path,
)
from dataformat.pipeline import PipelineLayout
from dataformat.schema import (
    ANNOTATED_COLUMNS,
    ANNOTATION_COLUMNS,
    ANNOTATION_SCHEMA,
    CAMERA_FIELDS,
    CAPTION_SOURCES,
    CAPTIONS_TYPE,
    CLIP_PART_SCHEMA,
    DUPLICATE_GROUPS_SCHEMA,
    MANIFEST_COLUMNS,
    MANIFEST_SCHEMA,
    ORBIT_MANIFEST_SCHEMA,
    ORBIT_PART_SCHEMA,
    SCORE_COLUMNS,
    SOURCE_COLUMNS,
    SOURCES_SCHEMA,
    Column,
    row_type_error,
    select_columns,
)
from dataformat.shard_keys import (
    IMAGE_EXTENSIONS,
    IMAGE_SUFFIXES,
    VIDEO_EXTENSIONS,
    VIDEO_SUFFIXES,
    SampleKey,
    sample_key,
)
from dataformat.shards import (
    DataError,
    IndexedSample,
    Member,
    ShardScan,
    find_shards,
    index_shards,
    read_shard_samples,
    sample_json,
    scan_shard,
    write_shards,
)
from dataformat.training import RAY_RUN_NAME, CheckpointLayout, StageLayout, ray_snapshot, stage_name

__all__ = [
    "ANNOTATED_COLUMNS", "ANNOTATION_COLUMNS", "ANNOTATION_SCHEMA", "CAPTIONS_TYPE", "CAPTION_MIX", "CAPTION_SOURCES",
    "CLIP_PART_SCHEMA", "DUPLICATE_GROUPS_SCHEMA", "IMAGE_EXTENSIONS", "IMAGE_SUFFIXES", "MANIFEST_COLUMNS",
    "MANIFEST_SCHEMA", "SCORE_COLUMNS",
    "SOURCES_SCHEMA", "SOURCE_COLUMNS", "SOURCE_ID_LENGTH", "TRAINING_METADATA_FILE",
    "VIDEO_EXTENSIONS", "VIDEO_SUFFIXES", "LOCK_NAME", "RAY_RUN_NAME", "CheckpointLayout", "PipelineLayout",
    "StageLayout", "ray_snapshot", "stage_name",
    "Column", "DataError", "IndexedSample", "clip_file_name",
    "Member", "RunLayout", "SampleKey", "atomic_write", "atomic_write_json", "check_caption_mix", "find_shards",
    "fsync_directory", "index_shards", "parquet_dataset", "pick_caption", "read_parquet_rows", "read_shard_samples",
    "remove_stale_temporaries", "sample_json", "sample_key", "select_columns", "source_id", "training_caption",
    "write_parquet_atomic", "write_shards", "native_source", "portable_source", "source_label", "clip_id",
    "video_frames_path", "CAMERA_FIELDS", "ORBIT_MANIFEST_SCHEMA", "ORBIT_PART_SCHEMA", "row_type_error", "scan_shard",
    "ShardScan",
]
