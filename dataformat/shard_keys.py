"""What a WebDataset shard sample holds, and which file name suffixes count as video or image."""

from __future__ import annotations


class SampleKey:
    """Member extensions of one shard sample: `KEY.mp4` the clip, `KEY.json` its manifest row, `KEY.txt` the
    caption (only when it has one)."""

    VIDEO = "mp4"
    META = "json"
    TEXT = "txt"


# Video files the project reads: raw sources for curation, clips in shards, generated/real sets for FVD.
VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".mov", ".avi", ".m4v", ".mpg", ".mpeg", ".ts", ".gif")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
# The same as shard member extensions (no dot).
VIDEO_EXTENSIONS = tuple(suffix[1:] for suffix in VIDEO_SUFFIXES)
IMAGE_EXTENSIONS = tuple(suffix[1:] for suffix in IMAGE_SUFFIXES)


def sample_key(clip_id: str) -> str:
    """A clip's sample key in a shard: WebDataset splits keys at the first '.', so dots become '_'."""
    return clip_id.replace(".", "_")
