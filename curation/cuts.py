"""Shot-cut detection: a cascade of PySceneDetect detectors at three frame rates, then verification.

Why a cascade (docs/recipe.md §1): a detector at the native rate sees a 15-frame dissolve as 15 small changes
and misses it; the same detector fed every 3rd or 12th frame sees one large change. Low rates also
fire on fast camera motion, so every candidate is verified on small grey thumbnails kept in a ring
buffer (bounded memory, streaming):

* a real cut changes the picture's structure: the luma-normalised correlation between a frame before
  and a frame after the event stays high for photo flashes and exposure jumps, so those are rejected;
* a gradual candidate must look like a dissolve: some window [a, b] around it has a midpoint frame
  close to the average of its ends (camera motion does not), and the cut is placed at that midpoint.

Fades through black come from PySceneDetect's ThresholdDetector (cut at the middle of the dark run).
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import cv2
import numpy as np
from scenedetect import FrameTimecode
from scenedetect.detectors import AdaptiveDetector, ContentDetector, ThresholdDetector

from curation.config import CutConfig

THUMB_SIZE = (32, 18)  # structure correlation and dissolve fits: small enough to ignore motion of a few pixels
SMALL_SIZE = (64, 36)  # the colour histograms of dissolve candidates are taken at this size
HUE_BINS, SATURATION_BINS = 16, 8


@dataclass
class Candidate:
    """A possible cut: `frame` is the first frame of the new shot; `window` the frames that changed."""

    frame: int
    level: str  # 'native' | 'mid' | 'low' | 'fade'
    window: tuple[int, int]


class FrameNumber(int):
    """A frame number that PySceneDetect's content detectors take where they expect a FrameTimecode.

    Their trigger logic (AdaptiveDetector's minimum scene length, the FlashFilter of ContentDetector) only
    subtracts and compares timecodes built from frame numbers, which plain ints do exactly; it reads
    `frame_rate` and, on what it returns, we read `frame_num`. Building FrameTimecodes per frame and per
    comparison cost more than the detectors' arithmetic on 64-px frames.
    """

    frame_rate: Fraction

    @classmethod
    def at(cls, index: int, rate: Fraction) -> FrameNumber:
        number = cls(index)
        number.frame_rate = rate
        return number

    @property
    def frame_num(self) -> int:
        return int(self)


class _SharedHsvScore:
    """ContentDetector's frame score from an HSV frame computed once per frame for every detector.

    PySceneDetect's ContentDetector converts each frame it gets to HSV and then takes per-channel mean
    absolute differences with the frame it saw last; the cascade runs three of them on the same frames (two
    at lower rates), so the conversion is shared: `process_frame` takes the frame's HSV image instead of BGR.
    The differences are computed with OpenCV (exact integer sums, divided as PySceneDetect divides) and
    weighted as ContentDetector weighs them (the same sum, term by term, over the same total weight), so the
    scores are PySceneDetect's to the bit; `process_frame` and the trigger logic (threshold, flash filter,
    AdaptiveDetector's rolling ratio) are PySceneDetect's own. Edge differences are not supported (the
    cascade uses the default weights, which give them no weight).
    """

    _weights: ContentDetector.Components
    stats_manager: object

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        if self._weights.delta_edges != 0.0:
            raise ValueError("shared-HSV content detectors do not support edge differences (delta_edges weight)")
        self._last_hsv: np.ndarray | None = None
        self._total_weight = sum(abs(weight) for weight in self._weights)

    def _calculate_frame_score(self, timecode: FrameNumber, frame_img: np.ndarray) -> float:
        if self.stats_manager is not None:
            raise ValueError("shared-HSV content detectors do not record stats")
        previous, self._last_hsv = self._last_hsv, frame_img
        if previous is None:
            return 0.0
        pixels = float(frame_img.shape[0] * frame_img.shape[1])
        hue, sat, lum, _ = cv2.sumElems(cv2.absdiff(frame_img, previous))
        weights = self._weights
        return (hue / pixels * weights.delta_hue + sat / pixels * weights.delta_sat
                + lum / pixels * weights.delta_lum + 0.0 * weights.delta_edges) / self._total_weight


class SharedHsvContentDetector(_SharedHsvScore, ContentDetector):
    """PySceneDetect's ContentDetector fed HSV frames (see _SharedHsvScore) and FrameNumber timecodes."""


class SharedHsvAdaptiveDetector(_SharedHsvScore, AdaptiveDetector):
    """PySceneDetect's AdaptiveDetector fed HSV frames (see _SharedHsvScore) and FrameNumber timecodes."""


class FrameMean:
    """The mean intensity of the current frame, handed to PySceneDetect's ThresholdDetector as its stats manager.

    ThresholdDetector takes a frame's mean intensity from its stats manager (PySceneDetect's cache of
    per-frame metrics) when that has it, instead of computing `numpy.mean` over the frame; this stand-in
    always has the current frame's, computed from OpenCV's per-channel sums. Those sums of 8-bit pixels are
    exact integers, as numpy's are, and are divided by the same count, so the value is numpy's to the bit.
    """

    def __init__(self) -> None:
        self.value = 0.0

    def update(self, frame_bgr: np.ndarray) -> None:
        blue, green, red, _ = cv2.sumElems(frame_bgr)
        self.value = (blue + green + red) / frame_bgr.size

    def metrics_exist(self, timecode: object, metric_keys: list[str]) -> bool:
        return True

    def get_metrics(self, timecode: object, metric_keys: list[str]) -> list[float]:
        return [self.value]


class ThumbRing:
    """What verification keeps of the last `capacity` frames, in rows (~8 KB a row, plus the frames).

    Per frame: its 64x36 BGR copy and that copy's HSV image, by reference (the analysis frame itself and the
    HSV image the detectors got, when the analysis frame is 64x36 already). Computed on first use, as only
    frames near a candidate need them, a block of frames at a time: the grey 32x18 thumbnail (float32), the
    thumbnail zero-mean and unit-norm (structure correlation) and a hue-saturation histogram (dissolve
    ends). The arrays have twice `capacity` rows, so any run of buffered frames is one contiguous slice (the
    dissolve search takes them as a stack without copying); when the end is reached the live rows move to
    the front.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        rows = 2 * capacity
        pixels = THUMB_SIZE[0] * THUMB_SIZE[1]
        self._small: list[np.ndarray | None] = [None] * rows
        self._hsv: list[np.ndarray | None] = [None] * rows
        self._structure = np.empty((rows, pixels), np.float32)
        self._units = np.empty((rows, pixels), np.float64)
        self._colours = np.empty((rows, HUE_BINS * SATURATION_BINS), np.float64)
        self._structure_ready = np.zeros(rows, bool)
        self._unit_ready = np.zeros(rows, bool)
        self._colour_ready = np.zeros(rows, bool)
        self.first = 0  # frame index of the oldest buffered frame
        self.count = 0
        self._row0 = 0  # its row

    def __len__(self) -> int:
        return self.count

    @property
    def last(self) -> int:
        return self.first + self.count - 1

    def append(self, index: int, analysis_bgr: np.ndarray, analysis_hsv: np.ndarray) -> None:
        """Add frame `index` (frames come in order, one index after the other) and its HSV image; both are
        kept by reference, so neither may change afterwards."""
        if self.count == 0:
            self.first = index
        elif self.count == self.capacity:
            self._small[self._row0] = self._hsv[self._row0] = None
            self.first += 1
            self._row0 += 1
            self.count -= 1
        if self._row0 + self.count == len(self._structure):
            live = slice(self._row0, self._row0 + self.count)
            for array in (self._small, self._hsv, self._structure, self._units, self._colours,
                          self._structure_ready, self._unit_ready, self._colour_ready):
                array[: self.count] = array[live]
            self._small[self.count:] = self._hsv[self.count:] = [None] * (len(self._small) - self.count)
            self._row0 = 0
        row = self._row0 + self.count
        if analysis_bgr.shape[1::-1] == SMALL_SIZE:
            self._small[row], self._hsv[row] = analysis_bgr, analysis_hsv  # what resizing to its own size gives
        else:
            small = self._small[row] = cv2.resize(analysis_bgr, SMALL_SIZE, interpolation=cv2.INTER_AREA)
            self._hsv[row] = cv2.cvtColor(small, cv2.COLOR_BGR2HSV)
        self._structure_ready[row] = self._unit_ready[row] = self._colour_ready[row] = False
        self.count += 1

    def row(self, index: int) -> int | None:
        """The row of frame `index`, or None when it is not buffered."""
        position = index - self.first
        return self._row0 + position if 0 <= position < self.count else None

    def clamped_row(self, index: int) -> int:
        return self._row0 + min(max(index - self.first, 0), self.count - 1)

    def _compute_structure(self, rows: np.ndarray) -> None:
        """The grey 32x18 thumbnails of `rows` not computed yet, in one OpenCV call each for the whole block:
        stacked frames convert and shrink by exact 2x2 averages exactly as they do one by one."""
        todo = rows[~self._structure_ready[rows]]
        if not len(todo):
            return
        smalls = np.stack([self._small[row] for row in todo]).reshape(-1, SMALL_SIZE[0], 3)
        gray = cv2.resize(cv2.cvtColor(smalls, cv2.COLOR_BGR2GRAY), (THUMB_SIZE[0], len(todo) * THUMB_SIZE[1]),
                          interpolation=cv2.INTER_AREA)
        self._structure[todo] = gray.reshape(len(todo), -1)
        self._structure_ready[todo] = True

    def structure(self, first_row: int, last_row: int) -> np.ndarray:
        """Rows `first_row`..`last_row` of the grey 32x18 thumbnails (float32), each computed once."""
        self._compute_structure(np.arange(first_row, last_row + 1))
        return self._structure[first_row: last_row + 1]

    def compute_units(self, rows: np.ndarray) -> None:
        """Make the grey thumbnails of `rows` zero-mean and unit-norm (float64; zeros for a flat frame), once:
        verification correlates each frame with many others."""
        todo = np.unique(rows[~self._unit_ready[rows]])
        if not len(todo):
            return
        self._compute_structure(todo)
        centred = self._structure[todo].astype(np.float64)
        centred -= centred.mean(axis=1, keepdims=True)
        norms = np.sqrt([vector @ vector for vector in centred])  # one BLAS dot each, as for a lone vector
        flat = norms < 1e-3
        self._units[todo] = centred / np.where(flat, 1.0, norms)[:, None]
        self._units[todo[flat]] = 0.0
        self._unit_ready[todo] = True

    def units(self, first_row: int, last_row: int) -> np.ndarray:
        """Rows `first_row`..`last_row` of the normalised thumbnails (see `compute_units`)."""
        self.compute_units(np.arange(first_row, last_row + 1))
        return self._units[first_row: last_row + 1]

    def best_correlation(self, rows: list[int], others: list[int]) -> float:
        """The highest Pearson correlation of a grey thumbnail in `rows` with one in `others`: 1 for the same
        picture under any gain/offset, 0 when either is flat (black, white: structure undefined, treated as
        different)."""
        self.compute_units(np.array(rows + others))
        units = self._units
        return max(float(units[row] @ units[other]) for row in rows for other in others)

    def colours(self, first_row: int, last_row: int) -> np.ndarray:
        """Rows `first_row`..`last_row` of the hue-saturation histograms of the 64x36 copies (L1-normalised,
        float64), each computed once."""
        for row in first_row + np.flatnonzero(~self._colour_ready[first_row: last_row + 1]):
            hist = cv2.calcHist([self._hsv[row]], [0, 1], None, [HUE_BINS, SATURATION_BINS], [0, 180, 0, 256])
            self._colours[row] = cv2.normalize(hist, hist, 1, 0, cv2.NORM_L1).ravel()
            self._colour_ready[row] = True
        return self._colours[first_row: last_row + 1]


class CrossFadeFit:
    """Fits windows of buffered frames as cross-fades: each inner frame as alpha*first + (1-alpha)*last.

    A dissolve is such a blend with alpha falling from 1 to 0; camera or subject motion is not a blend of the
    window's ends for any alpha. Each window gets its alphas and its residual: the mean absolute misfit
    relative to how different its ends are (inf when they are the same picture). A window's fit is computed
    once and kept while its frames are buffered: the mid- and low-rate candidates of one transition search
    overlapping windows. The window arrays (windows x frames x pixels, megabytes) go to scratch memory kept
    between calls: fresh arrays of that size cost more in page faults than the arithmetic.
    """

    def __init__(self) -> None:
        self._offsets = np.empty(0, np.float32)
        self._misfit = np.empty(0, np.float32)
        self._known: dict[tuple[int, int], tuple[np.ndarray, np.float32]] = {}

    @staticmethod
    def _scratch(buffer: np.ndarray, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        size = int(np.prod(shape))
        if buffer.size < size:
            buffer = np.empty(size, np.float32)
        return buffer, buffer[:size].reshape(shape)

    def fit(self, stack: np.ndarray, first_index: int, starts: np.ndarray,
            length: int) -> tuple[np.ndarray, np.ndarray]:
        """Alphas (windows, length - 1) and residuals (windows,) of the windows [start, start + length] of
        `stack` (frames from `first_index` on, pixels)."""
        keys = [(first_index + int(start), length) for start in starts]
        missing = [i for i, key in enumerate(keys) if key not in self._known]
        if missing:
            alphas, residuals = self._compute(stack, starts[missing], length)
            for i, alpha, residual in zip(missing, alphas, residuals, strict=True):
                self._known[keys[i]] = (alpha, residual)
        fits = [self._known[key] for key in keys]
        return np.stack([alpha for alpha, _ in fits]), np.array([residual for _, residual in fits], np.float32)

    def forget_before(self, index: int, keep: int = 4096) -> None:
        """Drop the fits of windows starting before frame `index` (no longer buffered) once there are more
        than `keep`."""
        if len(self._known) > keep:
            self._known = {key: fit for key, fit in self._known.items() if key[0] >= index}

    def _compute(self, stack: np.ndarray, starts: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
        first, last = stack[starts], stack[starts + length]
        difference = first - last
        energy = np.maximum(np.einsum("wp,wp->w", difference, difference), 1e-6)
        scale = np.abs(difference).mean(axis=1)
        self._offsets, offsets = self._scratch(self._offsets, (len(starts), length - 1, stack.shape[1]))
        np.take(stack, starts[:, None] + np.arange(1, length)[None, :], axis=0, out=offsets)
        np.subtract(offsets, last[:, None], out=offsets)
        alphas = np.clip(np.einsum("wfp,wp->wf", offsets, difference) / energy[:, None], 0.0, 1.0)
        self._misfit, misfit = self._scratch(self._misfit, offsets.shape)
        np.multiply(alphas[..., None], difference[:, None], out=misfit)
        np.subtract(offsets, misfit, out=misfit)
        np.abs(misfit, out=misfit)
        errors = misfit.reshape(len(starts), -1).mean(axis=1)
        return alphas, np.where(scale > 1e-3, errors / np.maximum(scale, 1e-3), np.inf)


class CutCascade:
    """Feed analysis frames in order with `push`; `finish` returns the sorted list of cut frames."""

    def __init__(self, config: CutConfig, fps: float) -> None:
        self.config = config
        self.fps = fps
        min_shot = max(1, round(config.min_shot_s * fps))
        self.min_shot_frames = min_shot
        self.mid_step = max(1, round(fps / config.mid_fps))
        self.low_step = max(self.mid_step + 1, round(fps / config.low_fps))
        # The three content detectors share each frame's HSV image; the fade detector takes BGR frames.
        self.native = SharedHsvAdaptiveDetector(
            adaptive_threshold=config.native_adaptive_threshold,
            min_content_val=config.native_min_content,
            window_width=config.native_window,
            min_scene_len=min_shot,
        )
        self.mid = SharedHsvContentDetector(threshold=config.mid_threshold, min_scene_len=1)
        self.low = SharedHsvContentDetector(threshold=config.low_threshold, min_scene_len=1)
        self.fade = ThresholdDetector(threshold=config.fade_threshold, min_scene_len=min_shot, fade_bias=0.0)
        self._frame_mean = FrameMean()
        self.fade.stats_manager = self._frame_mean
        self._rate = FrameTimecode(0, fps=fps)  # the source's rate, converted to a fraction once
        # Scale dissolve lengths (given for 25 fps) to this source's rate.
        self.dissolve_lengths = sorted({max(2, round(n * fps / 25.0)) for n in config.dissolve_lengths})
        reach = 2 * self.low_step + max(self.dissolve_lengths) + 8
        self.lag = reach
        self.thumbs = ThumbRing(3 * reach + 16)
        self._fit = CrossFadeFit()
        self.pending: list[Candidate] = []
        self._next_due: float = np.inf  # the earliest window end of a pending candidate: verified once settled
        self.accepted: list[Candidate] = []
        self.rejected: list[tuple[Candidate, str]] = []
        self.frame_count = 0
        # A frame this many frames old has its cut settled unless a fade's dark run or a chain of merges
        # reaches further back: candidates wait `lag` frames, a located dissolve moves back by up to a low
        # step plus a dissolve, and merging looks `min_shot_frames` around each.
        self.settle_frames = reach + self.low_step + max(self.dissolve_lengths) + min_shot + 2
        self._provisional: tuple[int, set[int]] = (0, set())

    def push(self, index: int, analysis_bgr: np.ndarray) -> None:
        """Add frame `index` (0, 1, 2, ... one after the other); `analysis_bgr` is kept by reference for a few
        seconds of frames and must not change afterwards."""
        hsv = cv2.cvtColor(analysis_bgr, cv2.COLOR_BGR2HSV)
        self.thumbs.append(index, analysis_bgr, hsv)
        number = FrameNumber.at(index, self._rate.frame_rate)
        found: list[Candidate] = []
        for cut in self.native.process_frame(number, hsv):
            found.append(Candidate(cut.frame_num, "native", (cut.frame_num - 1, cut.frame_num)))
        self._frame_mean.update(analysis_bgr)
        for cut in self.fade.process_frame(FrameTimecode(index, fps=self._rate), analysis_bgr):
            half = self.min_shot_frames
            found.append(Candidate(cut.frame_num, "fade", (cut.frame_num - half, cut.frame_num + half)))
        if index % self.mid_step == 0:
            for cut in self.mid.process_frame(number, hsv):
                found.append(Candidate(cut.frame_num, "mid", (cut.frame_num - self.mid_step, cut.frame_num)))
        if index % self.low_step == 0:
            for cut in self.low.process_frame(number, hsv):
                found.append(Candidate(cut.frame_num, "low", (cut.frame_num - self.low_step, cut.frame_num)))
        if found:
            self.pending += found
            self._next_due = min(self._next_due, *(candidate.window[1] for candidate in found))
        self.frame_count = index + 1
        if self._next_due <= index - self.lag:
            self._resolve(ready_before=index - self.lag)

    def is_cut_so_far(self, index: int) -> bool:
        """Whether the candidates verified so far put a cut at `index` (final for frames `settle_frames`
        old but in rare cases; callers that act on it check against `finish`)."""
        if self._provisional[0] != len(self.accepted):
            self._provisional = (len(self.accepted), set(self._merge()))
        return index in self._provisional[1]

    def finish(self) -> list[int]:
        self._resolve(ready_before=self.frame_count + self.lag)
        return self._merge()

    # -- verification -------------------------------------------------------------------------------

    def _resolve(self, ready_before: int) -> None:
        still_pending = []
        for candidate in self.pending:
            if candidate.window[1] > ready_before:
                still_pending.append(candidate)
                continue
            verdict = self._verify(candidate)
            if isinstance(verdict, Candidate):
                self.accepted.append(verdict)
            else:
                self.rejected.append((candidate, verdict))
        self.pending = still_pending
        self._next_due = min((candidate.window[1] for candidate in still_pending), default=np.inf)

    def _verify(self, candidate: Candidate) -> Candidate | str:
        start, end = candidate.window
        if not len(self.thumbs):
            return "outside buffer"
        if candidate.level == "fade":
            return candidate  # a run of black frames separates two shots by construction
        if self._same_shot(start, end):
            return "same shot (flash or exposure change)"
        if candidate.level == "native":
            return candidate
        return self._locate_dissolve(candidate)

    def _same_shot(self, start: int, end: int) -> bool:
        """True when some frame just before `start` and some frame just after `end` share their structure.

        A flash or an exposure jump leaves the picture's layout intact on at least one such pair, while a
        cut (even a jump cut inside one scene) does not. Several pairs make this robust to a flash
        spanning a frame or two more than the window.
        """
        befores = [self.thumbs.clamped_row(start - k) for k in (1, 2, 3)]
        afters = [self.thumbs.clamped_row(end + k) for k in (1, 3, 5)]
        return self.thumbs.best_correlation(befores, afters) >= self.config.same_shot_correlation

    def _locate_dissolve(self, candidate: Candidate) -> Candidate | str:
        """Find the longest window near a low-rate candidate that is a cross-fade between two shots.

        All windows of one length are tested at once (vectorised: ends from different shots, blend fit,
        falling blend weight); among the longest length that has one, the best fit wins and the cut goes
        where its blend weight crosses one half.
        """
        start, end = candidate.window
        config, thumbs = self.config, self.thumbs
        longest = max(self.dissolve_lengths)
        first_index, last_index = max(start - longest, thumbs.first), min(end + longest, thumbs.last)
        if last_index < first_index:
            return "outside buffer"
        self._fit.forget_before(thumbs.first)
        first_row, last_row = thumbs.row(first_index), thumbs.row(last_index)
        stack = thumbs.structure(first_row, last_row)
        units = thumbs.units(first_row, last_row)
        colours = thumbs.colours(first_row, last_row)
        roots, totals = np.sqrt(colours), colours.sum(axis=1)
        for length in sorted(self.dissolve_lengths, reverse=True):
            first, last = max(start - length, first_index), min(end, last_index - length)
            if last < first:
                continue
            a = np.arange(first - first_index, last - first_index + 1)
            b = a + length
            # the window's ends belong to different shots: new colours (Bhattacharyya distance of the hue-saturation
            # histograms, as OpenCV's compareHist computes it) and a different layout
            product = totals[a] * totals[b]
            scale = np.where(np.abs(product) > np.finfo(np.float32).eps, 1.0 / np.sqrt(np.abs(product)), 1.0)
            colour_change = np.sqrt(np.maximum(1.0 - np.einsum("wb,wb->w", roots[a], roots[b]) * scale, 0.0))
            correlation = np.einsum("wp,wp->w", units[a], units[b])
            changed = (colour_change >= config.min_dissolve_colour_change) & (
                correlation < config.same_shot_correlation)
            a = a[changed]
            if not len(a):
                continue
            alphas, residuals = self._fit.fit(stack, first_index, a, length)
            weights = alphas.astype(np.float64)  # compared in double precision
            falling = np.all(weights[:, 1:] <= weights[:, :-1] + 0.1, axis=1)
            fits = (residuals <= config.max_blend_residual) & (weights[:, 0] > 0.6) & (weights[:, -1] < 0.4) & falling
            if not fits.any():
                continue
            pick = np.flatnonzero(fits)[np.argmin(residuals[fits])]  # the first of equally good fits
            window_start = first_index + int(a[pick])
            below = np.flatnonzero(alphas[pick] < 0.5)
            crossing = window_start + 1 + (int(below[0]) if len(below) else alphas.shape[1])
            return Candidate(crossing, candidate.level, (window_start, window_start + length))
        return "no dissolve (camera or subject motion, or no colour change)"

    def _merge(self) -> list[int]:
        """One cut per transition: overlapping candidates merge, preferring hard-cut positions."""
        priority = {"fade": 0, "native": 1, "mid": 2, "low": 3}
        ordered = sorted(self.accepted, key=lambda c: (priority[c.level], c.frame))
        cuts: list[int] = []
        spans: list[tuple[int, int]] = []
        for candidate in ordered:
            low = min(candidate.window[0], candidate.frame) - self.min_shot_frames // 2
            high = max(candidate.window[1], candidate.frame) + self.min_shot_frames // 2
            if any(low <= s_high and s_low <= high for s_low, s_high in spans):
                continue
            if not 0 < candidate.frame < self.frame_count:
                continue
            if any(abs(candidate.frame - cut) < self.min_shot_frames for cut in cuts):
                continue
            cuts.append(candidate.frame)
            spans.append((min(candidate.window[0], candidate.frame), max(candidate.window[1], candidate.frame)))
        return sorted(cuts)
