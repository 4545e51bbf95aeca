"""Read and set the edit list (`moov/trak/edts/elst`) of an MP4 file libavformat has just written.

An exactly cut stream copy holds whole groups of pictures; its edit list says which span of them is shown.
libavformat's MP4 muxer writes the start of that span itself (the shot's first frame is at timestamp 0 and
the pre-roll packets before it have negative timestamps), but it always shows the track to its last frame,
so the post-roll frames a shot's last frames needed would be shown too. `set_presentation` rewrites the
video track's edit (its start kept, its duration the shot's length), and adds an edit list to a track the
muxer wrote without one. The boxes are ISO/IEC 14496-12 §4.2 (box header), §8.2.2 (`mvhd`), §8.3.2
(`tkhd`), §8.4.2 (`mdhd`), §8.4.3 (`hdlr`) and §8.6.6 (`elst`).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

CONTAINERS = {b"moov", b"trak", b"edts", b"mdia"}  # the boxes on the way to elst, mdhd and hdlr


class MP4EditError(ValueError):
    """The file is not an MP4 this module can edit (no video track, a moov before its media data)."""


@dataclass
class Box:
    kind: bytes
    start: int  # offset of the box header in the file
    size: int  # the whole box, header included
    header: int  # 8, or 16 with a 64-bit size
    children: list[Box]

    @property
    def body(self) -> int:
        return self.start + self.header

    def child(self, kind: bytes) -> Box | None:
        return next((box for box in self.children if box.kind == kind), None)


@dataclass(frozen=True)
class Edit:
    """One edit: `duration` in the movie's time scale, `media_time` in the track's (-1: an empty edit)."""

    duration: int
    media_time: int


@dataclass(frozen=True)
class VideoTrack:
    movie_timescale: int
    track_timescale: int
    edits: tuple[Edit, ...]


def parse_boxes(data: bytes | bytearray, start: int = 0, end: int | None = None) -> list[Box]:
    """The boxes between `start` and `end`, descending into the containers on the way to `elst`."""
    end = len(data) if end is None else end
    boxes, position = [], start
    while position + 8 <= end:
        size, kind = struct.unpack_from(">I4s", data, position)
        header = 8
        if size == 1:
            (size,) = struct.unpack_from(">Q", data, position + 8)
            header = 16
        elif size == 0:
            size = end - position
        if size < header or position + size > end:
            raise MP4EditError(f"MP4 box {kind!r} at byte {position} runs past its parent")
        box = Box(kind, position, size, header, [])
        if kind in CONTAINERS:
            box.children = parse_boxes(data, position + header, position + size)
        boxes.append(box)
        position += size
    return boxes


def _full_box_version(data: bytes | bytearray, box: Box) -> int:
    return data[box.body]


def _timescale(data: bytes | bytearray, box: Box) -> int:
    """The time scale of an `mvhd` or `mdhd` box (both put it after version, flags and two times)."""
    offset = box.body + 4 + (16 if _full_box_version(data, box) == 1 else 8)
    return struct.unpack_from(">I", data, offset)[0]


def _read_edits(data: bytes | bytearray, elst: Box) -> list[Edit]:
    version = _full_box_version(data, elst)
    (count,) = struct.unpack_from(">I", data, elst.body + 4)
    entry, edits = ">Qq" if version == 1 else ">Ii", []
    for index in range(count):
        offset = elst.body + 8 + index * (struct.calcsize(entry) + 4)
        duration, media_time = struct.unpack_from(entry, data, offset)
        edits.append(Edit(duration, media_time))
    return edits


def _video_trak(data: bytes | bytearray, moov: Box) -> Box:
    for trak in moov.children:
        mdia = trak.child(b"mdia") if trak.kind == b"trak" else None
        hdlr = mdia.child(b"hdlr") if mdia else None
        if hdlr is not None and data[hdlr.body + 8 : hdlr.body + 12] == b"vide":
            return trak
    raise MP4EditError("the MP4 has no video track")


def _moov(data: bytes | bytearray) -> Box:
    moov = next((box for box in parse_boxes(data) if box.kind == b"moov"), None)
    if moov is None:
        raise MP4EditError("not an MP4 file: no moov box")
    return moov


def read_video_track(path: Path) -> VideoTrack:
    """The time scales and edit list of the file's (first) video track; no edits when it has no edit list."""
    data = Path(path).read_bytes()
    moov = _moov(data)
    trak = _video_trak(data, moov)
    edts = trak.child(b"edts")
    elst = edts.child(b"elst") if edts else None
    return VideoTrack(_timescale(data, moov.child(b"mvhd")), _timescale(data, trak.child(b"mdia").child(b"mdhd")),
                      tuple(_read_edits(data, elst)) if elst else ())


def _elst_box(edits: list[Edit]) -> bytes:
    wide = any(edit.duration > 0xFFFFFFFF or not -(2**31) <= edit.media_time < 2**31 for edit in edits)
    entry = ">Qq" if wide else ">Ii"
    body = b"".join(struct.pack(entry, edit.duration, edit.media_time) + struct.pack(">hh", 1, 0) for edit in edits)
    payload = struct.pack(">B3xI", 1 if wide else 0, len(edits)) + body
    return struct.pack(">I4s", 8 + len(payload), b"elst") + payload


def _set_duration(data: bytearray, box: Box, offset_v0: int, offset_v1: int, duration: int) -> None:
    """Write `duration` into an mvhd/tkhd box (32-bit field in version 0, 64-bit in version 1)."""
    if _full_box_version(data, box) == 1:
        struct.pack_into(">Q", data, box.body + offset_v1, duration)
    else:
        struct.pack_into(">I", data, box.body + offset_v0, min(duration, 0xFFFFFFFF))


def set_presentation(path: Path, duration: Fraction) -> Edit:
    """Show the video track of `path` for `duration` seconds from where its edit list starts (time 0 when it
    has none), and make the movie and track headers say that long. The track's one shown edit keeps the
    muxer's `media_time` (an empty edit before it stays). Returns the edit written (`duration` rounded down to
    the movie's time scale, so the shot's last frame starts before it ends and the frame after the shot does not)."""
    data = bytearray(Path(path).read_bytes())
    moov = _moov(data)
    if any(box.kind == b"mdat" and box.start > moov.start for box in parse_boxes(data)):
        raise MP4EditError("moov before the media data: growing it would move every sample")  # not libav's default
    trak = _video_trak(data, moov)
    movie_timescale = _timescale(data, moov.child(b"mvhd"))
    edts = trak.child(b"edts")
    elst = edts.child(b"elst") if edts else None
    edits = _read_edits(data, elst) if elst else [Edit(0, 0)]
    shown = [index for index, edit in enumerate(edits) if edit.media_time != -1]
    if len(shown) != 1:
        raise MP4EditError(f"expected one shown edit in the video track, found {len(shown)}")
    edit = Edit(int(duration * movie_timescale), edits[shown[0]].media_time)  # rounded down
    edits[shown[0]] = edit  # an empty edit before it (a delayed start) stays
    new = _elst_box(edits)
    if elst is not None:  # replace the elst (the muxer's may hold an empty edit before it)
        at, removed, grown = elst.start, elst.size, [moov, trak, edts]
    else:  # a new edts right after tkhd
        new = struct.pack(">I4s", 8 + len(new), b"edts") + new
        at, removed, grown = trak.child(b"tkhd").start + trak.child(b"tkhd").size, 0, [moov, trak]
    change = len(new) - removed
    for box in grown:  # sizes first, while the offsets parsed above are still right
        if box.header == 16:
            struct.pack_into(">Q", data, box.start + 8, box.size + change)
        else:
            struct.pack_into(">I", data, box.start, box.size + change)
    data[at : at + removed] = new
    moov = _moov(data)
    total = sum(entry.duration for entry in edits)
    _set_duration(data, moov.child(b"mvhd"), 16, 24, total)
    _set_duration(data, _video_trak(data, moov).child(b"tkhd"), 20, 28, total)
    Path(path).write_bytes(bytes(data))
    return edit
