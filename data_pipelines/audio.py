"""Audio front end of Video-LLaMA's audio branch: decode, resample, clip, Kaldi fbank.

Reproduces ImageBind's `load_and_transform_audio_data` (which Video-LLaMA calls) in numpy:

  waveform (any rate, any channels) --decode--> float32 [C, S], resampled to 16 kHz
  --ConstantClipsPerVideoSampler(clip_duration=2, clips_per_video=M)--> M clips of 2 s
  --waveform2melspec--> Kaldi fbank [128, T], right-padded / cropped to 204 frames
  --normalize (x + 4.268) / 9.138--> float32 [M, 1, 128, 204]

Deliberate choices and known differences from the PyTorch original:
- Resampling is a numpy port of `torchaudio.functional.resample` (sinc interpolation, Hann
  window, lowpass_filter_width=6, rolloff=0.99), the function ImageBind calls, so that the
  features the frozen tower sees match the ones it was trained/evaluated with. Agreement with
  torchaudio is float32 rounding only. On a 440 Hz tone resampled to 16 kHz, soxr (librosa's
  default) differs from it by ~1.2e-4 of full scale away from the ends (the Hann-windowed
  sinc's passband ripple; soxr is closer to the ideal sine) and up to ~1e-2 in the first and
  last ~25 ms, where torchaudio zero-pads.
- Channels (`channels=`, default "imagebind"): ImageBind loads every channel, resamples each,
  and per clip runs `waveform -= waveform.mean()` on a *view* of the whole [C, S] waveform (the
  mean over every channel and sample of the clip, subtracted in place from all channels, so later
  overlapping clips see the shifted samples), then Kaldi fbank reads channel 0. "imagebind"
  reproduces exactly that; it only needs channel 0 and the channel average (the subtracted mean
  is the clip mean of the average), so only those two are resampled: equal to resampling every
  channel up to float32 rounding (resampling is linear). Explicit alternatives, recorded in the
  shard metadata when used: "mix" (average the channels first, then the mono path) and an int k
  (channel k alone; on a multichannel file this is *not* the original, whose mean covers all
  channels). On mono input all three are the same.
- A clip shorter than one 25 ms window makes torchaudio assert; here it yields zero frames,
  i.e. all padding.
- With 128 bins at 16 kHz and a 512-point FFT the 4th mel filter contains no FFT bin, so that
  row is always log(eps) (Kaldi itself refuses this setting; torchaudio, and so ImageBind,
  accept it). Reproduced as is.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
from fractions import Fraction

import numpy as np

# ImageBind's (AudioSet) normalisation statistics of the log-mel features.
FBANK_MEAN = -4.268
FBANK_STD = 9.138
# numeric_limits<float>::epsilon(): Kaldi/torchaudio floor power before the log with it.
FLOAT_EPS = float(np.finfo(np.float32).eps)

SAMPLE_RATE = 16000
NUM_MEL_BINS = 128
TARGET_FRAMES = 204
FRAME_LENGTH_MS = 25.0
FRAME_SHIFT_MS = 10.0
PREEMPHASIS = 0.97
LOW_FREQ = 20.0
# How a multichannel track becomes the one waveform the fbank reads (see the module docstring).
IMAGEBIND_CHANNELS = "imagebind"
MIX_CHANNELS = "mix"
DEFAULT_CHANNELS = IMAGEBIND_CHANNELS


class AudioDecodeError(ValueError):
    """An audio/video file could not be read or decoded. `category` groups it in shard reports."""

    def __init__(self, path, reason: str, category: str = "undecodable"):
        self.path = str(path)
        self.reason = reason
        self.category = category  # "missing" | "undecodable" | "truncated" | "corrupt"
        super().__init__(f"cannot decode audio from {self.path!r}: {reason}")


# Decoded audio shorter than the container declares by more than this fraction is a cut file
# (AAC priming / padding and rounding cost a few tens of ms on intact files).
TRUNCATION_TOLERANCE = 0.1


def _declared_seconds(container, stream) -> float:
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration and len(container.streams) == 1:
        return container.duration / 1e6
    return 0.0


@dataclasses.dataclass(frozen=True)
class AudioClips:
    """Normalised fbank clips of one file.

    fbank: float32 [M, 1, 128, 204]; zeros when the file has no audio (present=False).
    duration_s: length of the decoded audio in seconds (0.0 when absent).
    """
    fbank: np.ndarray
    present: bool
    duration_s: float


def check_channels(channels) -> str | int:
    """A channel choice: "imagebind" (default), "mix", or a channel index (int or digit string)."""
    if isinstance(channels, str) and channels.isdigit():
        channels = int(channels)
    if channels in (IMAGEBIND_CHANNELS, MIX_CHANNELS) or (
            isinstance(channels, int) and not isinstance(channels, bool) and channels >= 0):
        return channels
    raise ValueError(f"audio channels: expected {IMAGEBIND_CHANNELS!r} (the original's), "
                     f"{MIX_CHANNELS!r} or a channel index >= 0, got {channels!r}")


# ----------------------------------------------------------------------------- decoding

def _frame_to_float(frame) -> np.ndarray:
    """One decoded PyAV audio frame as float32 [channels, samples] in [-1, 1]."""
    arr = frame.to_ndarray()
    channels = len(frame.layout.channels)
    if not frame.format.is_planar:
        arr = arr.reshape(-1, channels).T
    if arr.dtype == np.int16:
        return arr.astype(np.float32) / 32768.0
    if arr.dtype == np.int32:
        return (arr.astype(np.float64) / 2147483648.0).astype(np.float32)
    if arr.dtype == np.uint8:
        return (arr.astype(np.float32) - 128.0) / 128.0
    if arr.dtype in (np.float32, np.float64):
        return arr.astype(np.float32, copy=False)
    raise TypeError(f"unsupported PyAV sample dtype {arr.dtype} (format {frame.format.name})")


def _decode_all_channels(path: str) -> tuple[np.ndarray, int] | None:
    """Every sample of the first audio stream as float32 [C, S] and its rate; None if none."""
    import av  # noqa: PLC0415  (PyAV is heavy; only decoding needs it)

    try:
        container = av.open(path)
    except (av.error.FFmpegError, OSError, TypeError, ValueError) as e:
        raise AudioDecodeError(path, f"expected a readable audio or video container ({e})") from e
    with container:
        if not container.streams.audio:
            return None
        stream = container.streams.audio[0]
        declared = _declared_seconds(container, stream)
        chunks, rate, decoded = [], None, 0
        try:
            for frame in container.decode(stream):
                if rate is not None and frame.sample_rate != rate:
                    raise AudioDecodeError(
                        path, f"sample rate changes mid-stream ({rate} -> {frame.sample_rate} Hz)")
                rate = frame.sample_rate
                chunks.append(_frame_to_float(frame))
                decoded += frame.samples
        except AudioDecodeError:
            raise
        except (av.error.FFmpegError, OSError, TypeError, ValueError) as e:
            if not chunks:
                raise AudioDecodeError(path, f"expected a readable audio or video container ({e})") from e
            of = f" of {declared:.1f} s" if declared else ""
            raise AudioDecodeError(path, f"decode error mid-stream after {decoded / rate:.1f} s{of} "
                                         f"({type(e).__name__}: {e})", "corrupt") from e
    if chunks and declared and decoded / rate < (1 - TRUNCATION_TOLERANCE) * declared:
        raise AudioDecodeError(path, f"truncated: decoded {decoded / rate:.1f} s of {declared:.1f} s "
                                     f"of audio (the container declares the full length)", "truncated")
    if not chunks:
        return np.zeros((1, 0), np.float32), int(stream.rate or SAMPLE_RATE)
    return np.concatenate(chunks, axis=1), int(rate)


def decode_audio(path, sample_rate: int = SAMPLE_RATE,
                 channel: int | None = None) -> tuple[np.ndarray, int]:
    """Decodes the first audio track of a video or audio file to float32 mono at `sample_rate`.

    channel=None averages the channels; channel=k takes channel k. A listening / inspection helper:
    what the towers are fed comes from `load_audio_clips` (default: ImageBind's multichannel
    handling, which no single mono waveform reproduces).
    A file without an audio track gives an empty waveform. Raises AudioDecodeError when the
    file is missing or undecodable.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise AudioDecodeError(path, "file does not exist (expected an audio or video file)", "missing")
    decoded = _decode_all_channels(path)
    if decoded is None:
        return np.zeros((0,), np.float32), sample_rate
    samples, rate = decoded
    if channel is None:
        mono = samples.mean(axis=0, dtype=np.float32)
    elif 0 <= channel < samples.shape[0]:
        mono = samples[channel]
    else:
        raise AudioDecodeError(path, f"channel {channel} requested, the track has "
                                     f"{samples.shape[0]} channel(s)")
    return resample(mono, rate, sample_rate), sample_rate


# ----------------------------------------------------------------------------- resampling

@functools.lru_cache(maxsize=16)
def _sinc_resample_kernel(orig: int, new: int, lowpass_filter_width: int = 6,
                          rolloff: float = 0.99) -> tuple[np.ndarray, int]:
    """torchaudio's `_get_sinc_resample_kernel` (sinc_interp_hann) in float32: [new, 2w+orig]."""
    base = min(orig, new) * rolloff
    width = math.ceil(lowpass_filter_width * orig / base)
    idx = np.arange(-width, width + orig, dtype=np.float32)[None, :] / np.float32(orig)
    t = np.arange(0, -new, -1, dtype=np.float32)[:, None] / np.float32(new) + idx
    t = np.clip(t * np.float32(base), -lowpass_filter_width, lowpass_filter_width)
    window = np.cos(t * np.float32(math.pi / lowpass_filter_width / 2)) ** 2
    t = t * np.float32(math.pi)
    with np.errstate(invalid="ignore", divide="ignore"):
        kernel = np.where(t == 0, np.float32(1.0), np.sin(t) / t)
    kernel = (kernel * (window * np.float32(base / orig))).astype(np.float32)
    kernel.setflags(write=False)
    return kernel, width


def resample(waveform: np.ndarray, orig_freq: int, new_freq: int) -> np.ndarray:
    """`torchaudio.functional.resample(waveform, orig_freq, new_freq)` (defaults) for 1-D float32.

    A polyphase FIR: block b of `orig` input samples yields `new` outputs, output j of a block
    is the dot product of kernel row j with the (padded) input window starting at b*orig.
    """
    waveform = np.asarray(waveform, np.float32)
    if waveform.ndim != 1:
        raise ValueError(f"resample expects a 1-D waveform, got shape {waveform.shape}")
    if orig_freq <= 0 or new_freq <= 0:
        raise ValueError(f"sample rates must be positive, got {orig_freq} -> {new_freq}")
    if orig_freq == new_freq or waveform.size == 0:
        return waveform
    g = math.gcd(int(orig_freq), int(new_freq))
    orig, new = int(orig_freq) // g, int(new_freq) // g
    kernel, width = _sinc_resample_kernel(orig, new)
    padded = np.pad(waveform, (width, width + orig))
    windows = np.lib.stride_tricks.sliding_window_view(padded, kernel.shape[1])[::orig]
    out = (windows @ kernel.T).reshape(-1)
    return np.ascontiguousarray(out[: math.ceil(new * waveform.size / orig)])


# ----------------------------------------------------------------------------- Kaldi fbank

def _mel(freq):
    return 1127.0 * np.log(1.0 + freq / 700.0)


@functools.lru_cache(maxsize=8)
def mel_banks(num_bins: int, padded_window: int, sample_rate: float,
              low_freq: float = LOW_FREQ, high_freq: float = 0.0) -> np.ndarray:
    """Kaldi/HTK triangular mel filters over the rfft bins: float32 [padded_window//2 + 1, num_bins].

    Same construction as torchaudio's `get_mel_banks` (vtln_warp=1), in float32 as it is there;
    the Nyquist bin gets zero weight.
    """
    nyquist = 0.5 * sample_rate
    high_freq = high_freq + nyquist if high_freq <= 0.0 else high_freq
    if not (0.0 <= low_freq < nyquist and 0.0 < high_freq <= nyquist and low_freq < high_freq):
        raise ValueError(f"bad mel range low={low_freq} high={high_freq} for nyquist {nyquist}")
    mel_low, mel_high = _mel(low_freq), _mel(high_freq)
    delta = (mel_high - mel_low) / (num_bins + 1)
    b = np.arange(num_bins, dtype=np.float32)[:, None]
    left = np.float32(mel_low) + b * np.float32(delta)
    center = np.float32(mel_low) + (b + 1.0) * np.float32(delta)
    right = np.float32(mel_low) + (b + 2.0) * np.float32(delta)
    bin_width = np.float32(sample_rate / padded_window)
    mel = _mel(bin_width * np.arange(padded_window // 2, dtype=np.float32))[None, :].astype(np.float32)
    up = (mel - left) / (center - left)
    down = (right - mel) / (right - center)
    banks = np.maximum(0.0, np.minimum(up, down)).astype(np.float32)
    banks = np.concatenate([banks, np.zeros((num_bins, 1), np.float32)], axis=1)
    out = np.ascontiguousarray(banks.T)
    out.setflags(write=False)
    return out


def kaldi_fbank(waveforms: np.ndarray, sample_rate: float = SAMPLE_RATE,
                num_mel_bins: int = NUM_MEL_BINS, frame_length_ms: float = FRAME_LENGTH_MS,
                frame_shift_ms: float = FRAME_SHIFT_MS) -> np.ndarray:
    """Log mel filterbank of equal-length waveforms [B, S] -> float32 [B, T, num_mel_bins].

    The settings ImageBind passes to `torchaudio.compliance.kaldi.fbank`: hanning window,
    dither 0, per-frame DC removal, pre-emphasis 0.97, FFT rounded up to a power of two,
    power spectrum, mel range 20 Hz..Nyquist, log floored at float32 epsilon, snip_edges
    (T = 1 + (S - window) // shift; 0 when S < window), no energy column.
    """
    waveforms = np.asarray(waveforms, np.float32)
    if waveforms.ndim != 2:
        raise ValueError(f"kaldi_fbank expects waveforms [batch, samples], got {waveforms.shape}")
    window = int(sample_rate * frame_length_ms * 0.001)
    shift = int(sample_rate * frame_shift_ms * 0.001)
    n_fft = 1 << (window - 1).bit_length()
    batch, length = waveforms.shape
    if length < window:
        return np.zeros((batch, 0, num_mel_bins), np.float32)
    frames = np.lib.stride_tricks.sliding_window_view(waveforms, window, axis=1)[:, ::shift]
    frames = frames - frames.mean(axis=-1, keepdims=True, dtype=np.float32)
    previous = np.concatenate([frames[..., :1], frames[..., :-1]], axis=-1)
    frames = frames - np.float32(PREEMPHASIS) * previous
    frames = frames * np.hanning(window).astype(np.float32)
    power = (np.abs(np.fft.rfft(frames, n=n_fft, axis=-1)) ** 2).astype(np.float32)
    # one 2-D GEMM: numpy's stacked 3-D @ 2-D matmul is ~10x slower here
    mel = power.reshape(-1, power.shape[-1]) @ mel_banks(num_mel_bins, n_fft, float(sample_rate))
    mel = mel.reshape(batch, -1, num_mel_bins)
    return np.log(np.maximum(mel, np.float32(FLOAT_EPS))).astype(np.float32)


def fit_frames(fbank: np.ndarray, target_frames: int = TARGET_FRAMES) -> np.ndarray:
    """[..., T, mel] -> [..., mel, target_frames]: transpose, zero-pad at the end or keep the first frames."""
    fbank = np.swapaxes(fbank, -1, -2)
    missing = target_frames - fbank.shape[-1]
    if missing > 0:
        pad = [(0, 0)] * (fbank.ndim - 1) + [(0, missing)]
        return np.pad(fbank, pad)
    return fbank[..., :target_frames]


def waveform2melspec(waveform: np.ndarray, sample_rate: int = SAMPLE_RATE,
                     num_mel_bins: int = NUM_MEL_BINS,
                     target_length: int = TARGET_FRAMES) -> np.ndarray:
    """ImageBind's `waveform2melspec` for one mono clip [S]: un-normalised float32 [1, mel, target]."""
    waveform = np.asarray(waveform, np.float32)
    if waveform.ndim != 1:
        raise ValueError(f"waveform2melspec expects a mono waveform [samples], got {waveform.shape}")
    if waveform.size:
        waveform = waveform - waveform.mean(dtype=np.float32)
    fbank = kaldi_fbank(waveform[None], sample_rate, num_mel_bins)[0]
    return fit_frames(fbank, target_length)[None]


def normalize_fbank(fbank: np.ndarray) -> np.ndarray:
    return ((fbank - np.float32(FBANK_MEAN)) / np.float32(FBANK_STD)).astype(np.float32)


# ----------------------------------------------------------------------------- clip sampling

def clip_timepoints(duration_s, num_clips: int, clip_seconds=2.0) -> list[tuple[Fraction, Fraction]]:
    """pytorchvideo `ConstantClipsPerVideoSampler` read to its end, as ImageBind does.

    Starts are i * max(duration - clip, 0) / num_clips for i < num_clips (so the last clip does
    *not* reach the end), ends are start + clip. A source shorter than a clip gives num_clips
    copies of [0, clip]. Exact fractions, as pytorchvideo computes them.
    """
    if num_clips < 1:
        raise ValueError(f"num_clips must be >= 1, got {num_clips}")
    clip = Fraction(clip_seconds)
    # float duration - Fraction is float arithmetic (rounded) in pytorchvideo too; keep it so
    max_start = Fraction(max(duration_s - clip, 0))
    step = max_start / num_clips
    return [(step * i, step * i + clip) for i in range(num_clips)]


def clip_sample_ranges(num_samples: int, num_clips: int, clip_seconds=2.0,
                       sample_rate: int = SAMPLE_RATE) -> list[tuple[int, int]]:
    """Sample index ranges [a, b) of the clips: int(t * sr) truncation as ImageBind slices."""
    duration = num_samples / sample_rate
    ranges = []
    for start, end in clip_timepoints(duration, num_clips, clip_seconds):
        a, b = int(start * sample_rate), int(end * sample_rate)
        ranges.append((min(a, num_samples), min(b, num_samples)))
    return ranges


def _clip_inputs(first: np.ndarray, average: np.ndarray,
                 ranges: list[tuple[int, int]]) -> list[np.ndarray]:
    """The channel-0 clips the fbank sees in ImageBind's loop, including its in-place mean removal.

    The original subtracts each clip's mean over all channels from a view of the shared [C, S]
    waveform: the same scalar comes off every channel, so tracking channel 0 (`first`) and the
    channel average (`average`, whose clip mean is that all-channel mean) is enough. A later
    clip overlapping an earlier one starts from the already-shifted samples.
    """
    work = np.array(first, np.float32, copy=True)
    mean_work = work if average is first else np.array(average, np.float32, copy=True)
    clips = []
    for a, b in ranges:
        if b > a:
            m = mean_work[a:b].mean(dtype=np.float32)
            work[a:b] -= m
            if mean_work is not work:
                mean_work[a:b] -= m
        clips.append(work[a:b].copy())
    return clips


def _melspecs(clips: list[np.ndarray], sample_rate: int, num_mel_bins: int,
              num_frames: int) -> np.ndarray:
    """Kaldi fbank of the (already mean-removed) clips, one FFT call when they have equal length."""
    if len({c.size for c in clips}) == 1 and clips[0].size:
        batch = np.stack(clips)
        return fit_frames(kaldi_fbank(batch, sample_rate, num_mel_bins), num_frames)[:, None]
    return np.stack([fit_frames(kaldi_fbank(c[None], sample_rate, num_mel_bins)[0], num_frames)[None]
                     for c in clips])


def _fbank_inputs(waveform: np.ndarray, channels) -> tuple[np.ndarray, np.ndarray]:
    """[C, S] -> (the waveform the fbank reads, the waveform whose clip means are subtracted)."""
    if channels == IMAGEBIND_CHANNELS:
        first = waveform[0]
        average = first if waveform.shape[0] == 1 else waveform.mean(axis=0, dtype=np.float32)
        return first, average
    if channels == MIX_CHANNELS:
        mixed = waveform[0] if waveform.shape[0] == 1 else waveform.mean(axis=0, dtype=np.float32)
        return mixed, mixed
    if channels >= waveform.shape[0]:
        raise ValueError(f"audio channel {channels} requested, the track has {waveform.shape[0]} channel(s)")
    return waveform[channels], waveform[channels]


def waveform_to_clips(waveform: np.ndarray, sr: int, num_clips: int = 8,
                      clip_seconds: float = 2.0, sample_rate: int = SAMPLE_RATE,
                      num_frames: int = TARGET_FRAMES, num_mel_bins: int = NUM_MEL_BINS,
                      channels=DEFAULT_CHANNELS) -> np.ndarray:
    """Waveform [S] or [C, S] at `sr` -> normalised fbank clips float32 [num_clips, 1, mel, num_frames].

    `channels` says how a multichannel waveform is read: "imagebind" (the original), "mix" or an
    index (module docstring).
    """
    channels = check_channels(channels)
    waveform = np.asarray(waveform, np.float32)
    if waveform.ndim == 1:
        waveform = waveform[None]
    if waveform.ndim != 2:
        raise ValueError(f"waveform_to_clips expects a waveform [samples] or [channels, samples], "
                         f"got shape {waveform.shape}")
    if waveform.size == 0:
        raise ValueError("waveform_to_clips got an empty waveform; an absent track is "
                         "AudioClips(present=False), see load_audio_clips")
    if not np.all(np.isfinite(waveform)):
        raise ValueError("waveform_to_clips got NaN or inf samples")
    first, average = _fbank_inputs(waveform, channels)
    first_16k = resample(first, sr, sample_rate)
    average_16k = first_16k if average is first else resample(average, sr, sample_rate)
    ranges = clip_sample_ranges(first_16k.size, num_clips, clip_seconds, sample_rate)
    clips = _clip_inputs(first_16k, average_16k, ranges)
    return normalize_fbank(_melspecs(clips, sample_rate, num_mel_bins, num_frames))


def load_audio_clips(path, num_clips: int = 8, clip_seconds: float = 2.0,
                     sample_rate: int = SAMPLE_RATE, num_frames: int = TARGET_FRAMES,
                     num_mel_bins: int = NUM_MEL_BINS, channels=DEFAULT_CHANNELS) -> AudioClips:
    """Decodes `path` and returns its M normalised fbank clips (ImageBind's audio input).

    `channels`: "imagebind" (default: exactly the original's multichannel handling), "mix", or a
    channel index. No audio track (or an empty one) -> AudioClips(zeros, present=False,
    duration_s=0.0). Missing or undecodable file, or a channel the track lacks -> AudioDecodeError.
    """
    channels = check_channels(channels)
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise AudioDecodeError(path, "file does not exist (expected an audio or video file)", "missing")
    decoded = _decode_all_channels(path)
    if decoded is None or decoded[0].shape[1] == 0:
        return AudioClips(np.zeros((num_clips, 1, num_mel_bins, num_frames), np.float32),
                          present=False, duration_s=0.0)
    samples, rate = decoded
    if not np.all(np.isfinite(samples)):
        raise AudioDecodeError(path, "decoded samples contain NaN or inf")
    if isinstance(channels, int) and channels >= samples.shape[0]:
        raise AudioDecodeError(path, f"channel {channels} requested, the track has "
                                     f"{samples.shape[0]} channel(s)")
    fbank = waveform_to_clips(samples, rate, num_clips, clip_seconds, sample_rate, num_frames,
                              num_mel_bins, channels)
    return AudioClips(fbank, present=True, duration_s=samples.shape[1] / rate)
