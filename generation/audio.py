"""Audio for walks: decode with PyAV, an onset/energy envelope per video frame in numpy, mux into the MP4.

stable-diffusion-videos times its walks with librosa's onset strength; librosa is not a dependency here,
so the envelope is computed directly: onset strength = half-wave-rectified spectral flux of the
log-magnitude STFT (what librosa.onset.onset_strength computes, on linear instead of mel bins), or RMS
energy. Either is averaged over each video frame's time span and min-max scaled to [0, 1]; generation.walk turns it
into interpolation speed (`speeds = floor + envelope`, normalised per segment).
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np

ENVELOPES = ("onset", "rms")


def _check_audio_file(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"audio file not found: {path}")
    return path


def load_audio(path: str | Path, sample_rate: int = 22050, layout: str = "mono") -> np.ndarray:
    """Decode any audio (or the audio stream of a video) to float32 (channels, samples) at `sample_rate`."""
    path = _check_audio_file(path)
    try:
        container = av.open(str(path))
    except av.error.FFmpegError as error:
        raise ValueError(f"cannot decode audio from {path}: {error}") from error
    with container:
        if not container.streams.audio:
            raise ValueError(f"{path} has no audio stream")
        resampler = av.AudioResampler(format="fltp", layout=layout, rate=sample_rate)
        chunks = []
        for frame in container.decode(audio=0):
            chunks.extend(resampled.to_ndarray() for resampled in resampler.resample(frame))
        chunks.extend(resampled.to_ndarray() for resampled in resampler.resample(None))
    if not chunks:
        raise ValueError(f"{path} has an empty audio stream")
    return np.concatenate(chunks, axis=1).astype(np.float32)


def onset_strength(samples: np.ndarray, n_fft: int = 2048, hop: int = 512) -> np.ndarray:
    """Spectral flux per hop: mean over frequency of the positive change in log magnitude (dB, 80 dB range).

    Onsets (drum hits, note attacks) raise many bins at once; sustained loud sounds do not, which is why
    it reacts to rhythm rather than loudness."""
    padded = np.pad(samples, n_fft // 2, mode="reflect" if len(samples) > n_fft // 2 else "constant")
    count = 1 + (len(padded) - n_fft) // hop
    frames = np.lib.stride_tricks.sliding_window_view(padded, n_fft)[::hop][:count]
    magnitude = np.abs(np.fft.rfft(frames * np.hanning(n_fft), axis=1))
    decibels = 20 * np.log10(np.maximum(magnitude, 1e-10))
    decibels = np.maximum(decibels, decibels.max() - 80.0)
    flux = np.maximum(np.diff(decibels, axis=0, prepend=decibels[:1]), 0).mean(axis=1)
    return flux


def rms_energy(samples: np.ndarray, hop: int = 512) -> np.ndarray:
    """Root-mean-square amplitude per hop."""
    count = max(1, len(samples) // hop)
    trimmed = np.pad(samples, (0, max(0, count * hop - len(samples))))[: count * hop]
    return np.sqrt((trimmed.reshape(count, hop) ** 2).mean(axis=1))


def audio_envelope(
    path: str | Path, fps: float, num_frames: int, offset: float = 0.0, kind: str = "onset",
    sample_rate: int = 22050, hop: int = 512,
) -> np.ndarray:
    """One value in [0, 1] per video frame: the envelope averaged over [offset + k/fps, offset + (k+1)/fps)."""
    if kind not in ENVELOPES:
        raise ValueError(f"audio envelope must be one of {ENVELOPES}, got {kind!r}")
    if not fps > 0:
        raise ValueError(f"fps must be positive, got {fps}")
    if offset < 0:
        raise ValueError(f"audio offset must be >= 0 seconds, got {offset}")
    samples = load_audio(path, sample_rate)[0]
    duration = len(samples) / sample_rate
    needed = offset + num_frames / fps
    if needed > duration + 1e-6:
        raise ValueError(f"audio {path} lasts {duration:.2f} s but the walk needs {needed:.2f} s "
                         f"({num_frames} frames at {fps} fps from offset {offset} s); shorten the walk or the offset")
    values = onset_strength(samples, hop=hop) if kind == "onset" else rms_energy(samples, hop=hop)
    hop_times = np.arange(len(values)) * hop / sample_rate
    edges = offset + np.arange(num_frames + 1) / fps
    bins = np.clip(np.searchsorted(hop_times, edges), 0, len(values))
    envelope = np.array([values[a:b].mean() if b > a else values[min(a, len(values) - 1)]
                         for a, b in zip(bins[:-1], bins[1:], strict=True)])
    low, high = envelope.min(), envelope.max()  # min-max: quiet passages go to 0, the strongest frame to 1
    return (envelope - low) / (high - low) if high > low else np.zeros_like(envelope)


def envelope_speeds(envelope: np.ndarray, floor: float = 0.1) -> np.ndarray:
    """Interpolation speed per frame: `floor` keeps the walk moving in silence, the envelope adds to it."""
    if floor < 0:
        raise ValueError(f"speed floor must be >= 0, got {floor}")
    return floor + np.asarray(envelope, dtype=np.float64)


def mux_audio(video_path: str | Path, audio_path: str | Path, out_path: str | Path, offset: float = 0.0,
              sample_rate: int = 44100) -> Path:
    """Copy the video stream of `video_path` (no re-encode) and add `audio_path` from `offset` seconds,
    cut to the video's length, as AAC stereo. `out_path` may not be `video_path`."""
    video_path, out_path = Path(video_path), Path(out_path)
    if video_path.resolve() == out_path.resolve():
        raise ValueError("mux_audio writes a new file; out_path must differ from video_path")
    samples = load_audio(audio_path, sample_rate, layout="stereo")
    with av.open(str(video_path)) as source:
        video = source.streams.video[0]
        duration = float(video.frames / video.average_rate) if video.frames else float(source.duration / av.time_base)
        start = round(offset * sample_rate)
        audio = samples[:, start : start + round(duration * sample_rate)]
        if audio.shape[1] == 0:
            raise ValueError(f"audio offset {offset} s is past the end of {audio_path}")
        with av.open(str(out_path), mode="w") as out:
            video_out = out.add_stream_from_template(video)
            audio_out = out.add_stream("aac", rate=sample_rate, layout="stereo")
            audio_out.time_base = Fraction(1, sample_rate)
            for packet in source.demux(video):
                if packet.dts is None:
                    continue
                packet.stream = video_out
                out.mux(packet)
            frame_size = audio_out.codec_context.frame_size or 1024
            for first in range(0, audio.shape[1], frame_size):
                chunk = np.ascontiguousarray(audio[:, first : first + frame_size])
                frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout="stereo")
                frame.sample_rate, frame.pts, frame.time_base = sample_rate, first, Fraction(1, sample_rate)
                out.mux(audio_out.encode(frame))
            out.mux(audio_out.encode(None))
    return out_path
