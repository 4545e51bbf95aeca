"""Perceptual hash of a clip: the DCT pHash (Zauner 2010, the `imagehash.phash` recipe) of its first, middle and
last frame, for near-duplicate removal when no CLIP embedding is available (docs/dedup.md).

One frame's hash: grey levels, resized to 32 x 32 with area averaging (which removes the detail that
re-encoding, rescaling and small crops change), a 2-D DCT, the 8 x 8 lowest frequencies, and one bit per
coefficient: above their median or not. 64 bits that survive re-encoding and rescaling almost unchanged, and
move by a few bits under a 10 % crop. A clip's hash is its three frames' hashes, 192 bits in 24 bytes, so two
clips agree only if they start, pass through and end alike.

Computed per source on the workers (`curation.dataset._stage`, from the sampled frames already in memory), and
stored in the clip rows (`frame_hash`), so the global dedup step reads 48 bytes per clip and decodes nothing.
"""

from __future__ import annotations

import cv2
import numpy as np

HASH_SIDE = 32  # the frame is reduced to this many pixels per side before the DCT
LOW_FREQUENCIES = 8  # the hash keeps an 8 x 8 block of the DCT: 64 bits per frame
FRAME_BITS = LOW_FREQUENCIES * LOW_FREQUENCIES
CLIP_FRAMES = 3  # first, middle, last
CLIP_HASH_BYTES = CLIP_FRAMES * FRAME_BITS // 8
CROP_FRACTION = 0.9  # the second hash of a clip is of its frames' centre crop of this size (see `clip_signature`)
SIGNATURE_BYTES = 2 * CLIP_HASH_BYTES


def frame_phash(frame: np.ndarray) -> np.ndarray:
    """64 booleans: the pHash of one RGB (or grey) uint8 frame."""
    if frame.ndim == 3:
        frame = cv2.cvtColor(np.ascontiguousarray(frame), cv2.COLOR_RGB2GRAY)
    small = cv2.resize(frame, (HASH_SIDE, HASH_SIDE), interpolation=cv2.INTER_AREA).astype(np.float32)
    low = cv2.dct(small)[:LOW_FREQUENCIES, :LOW_FREQUENCIES]
    return (low > np.median(low)).ravel()


def clip_phash(frames: np.ndarray) -> bytes:
    """The 24-byte hash of a clip's first, middle and last frame ((3, H, W, 3) uint8 RGB)."""
    if frames.ndim != 4 or len(frames) != CLIP_FRAMES:
        raise ValueError(f"a clip hash needs the first, middle and last frame, got frames of shape {frames.shape}")
    return np.packbits(np.concatenate([frame_phash(frame) for frame in frames])).tobytes()


def centre_crop(frames: np.ndarray, fraction: float = CROP_FRACTION) -> np.ndarray:
    """The centre `fraction` of each frame's width and height."""
    height, width = frames.shape[1:3]
    crop_h, crop_w = max(1, round(height * fraction)), max(1, round(width * fraction))
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    return frames[:, top : top + crop_h, left : left + crop_w]


def clip_signature(frames: np.ndarray) -> bytes:
    """48 bytes: the clip's hash, then the hash of its frames' 90 % centre crop.

    A crop is a zoom, which moves a pHash by up to 40 of 192 bits at 90 % (measured on the sample footage,
    docs/dedup.md), as far as two different clips of one continuous shot. Comparing a clip's hash with the other
    clip's crop hash as well brings a 90 % crop copy to a few bits, and 85-95 % crops to about 25, so the
    threshold can stay tight."""
    return clip_phash(frames) + clip_phash(centre_crop(frames))


def hash_bits(hashes: list[bytes]) -> np.ndarray:
    """(N, 192) uint8 bits of N clip hashes."""
    packed = np.frombuffer(b"".join(hashes), dtype=np.uint8).reshape(len(hashes), CLIP_HASH_BYTES)
    return np.unpackbits(packed, axis=1)


def hash_vectors(hashes: list[bytes]) -> np.ndarray:
    """Clip hashes as unit vectors of +-1/sqrt(192): their dot product is 1 - 2 x (differing bits) / 192, so the
    cosine machinery of `curation.dedup` groups hashes by Hamming distance."""
    bits = hash_bits(hashes).astype(np.float32)
    return (2.0 * bits - 1.0) / np.sqrt(bits.shape[1], dtype=np.float32)


def cosine_for_bits(max_differing_bits: int, total_bits: int = CLIP_FRAMES * FRAME_BITS) -> float:
    """The dot product of two `hash_vectors` that differ in `max_differing_bits` bits."""
    return 1.0 - 2.0 * max_differing_bits / total_bits
