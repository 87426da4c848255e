"""Audio front end: Kaldi fbank vs kaldi-native-fbank, ImageBind's clip sampling and padding vs a
literal re-statement of its loop, torchaudio-equivalent resampling, decoding real media files."""
import math
from fractions import Fraction

import av
import kaldi_native_fbank as knf
import numpy as np
import pytest
import torch

from audio_reference import torchaudio_resample
from data_pipelines import audio
from data_pipelines.media import write_mp4

SR = 16000
LOG_EPS = math.log(float(np.finfo(np.float32).eps))


# ----------------------------------------------------------------------------- signals

def _t(seconds, sr=SR):
    return np.arange(int(round(seconds * sr))) / sr


def tone(seconds=2.0, f=440.0, amp=0.5, sr=SR):
    return (amp * np.sin(2 * np.pi * f * _t(seconds, sr))).astype(np.float32)


def noise(seconds=2.0, amp=0.1, seed=0):
    return (amp * np.random.default_rng(seed).standard_normal(int(seconds * SR))).astype(np.float32)


def chirp(seconds=2.0):
    t = _t(seconds)
    swept = np.sin(2 * np.pi * (200 * t + 1500 * t ** 2))
    return (0.3 * swept * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))).astype(np.float32)


def speech_like(seconds=2.0, seed=1):
    """Harmonic glide (f0 110 -> 220 Hz, 12 harmonics under a formant-ish envelope), syllable
    envelope, and a -60 dB noise floor, like a voiced recording."""
    t = _t(seconds)
    f0 = 110 + 55 * t
    phase = 2 * np.pi * np.cumsum(f0) / SR
    formants = lambda f: np.exp(-((f - 500) / 300) ** 2) + 0.6 * np.exp(-((f - 1500) / 400) ** 2)  # noqa: E731
    voiced = sum(formants(k * f0) * np.sin(k * phase) for k in range(1, 13))
    env = 0.5 * (1 - np.cos(2 * np.pi * 4 * t)) + 0.05
    floor = 1e-3 * np.random.default_rng(seed).standard_normal(t.size)
    return (0.2 * voiced * env + floor).astype(np.float32)


SIGNALS = {
    "tone_440": lambda: tone(),
    "white_noise": lambda: noise(),
    "chirp": lambda: chirp(),
    "speech_like": lambda: speech_like(),
    "silence": lambda: np.zeros(2 * SR, np.float32),
    "short_0.7s": lambda: tone(0.7, 1000.0) + noise(0.7, 0.01),
}


# ----------------------------------------------------------------------------- references

def knf_fbank(x: np.ndarray, num_bins: int) -> np.ndarray:
    """kaldi-native-fbank with the options ImageBind passes to torchaudio's kaldi.fbank."""
    opts = knf.FbankOptions()
    fo = opts.frame_opts
    fo.samp_freq, fo.dither, fo.window_type = SR, 0.0, "hanning"
    fo.frame_length_ms, fo.frame_shift_ms, fo.preemph_coeff = 25.0, 10.0, 0.97
    fo.remove_dc_offset, fo.round_to_power_of_two, fo.snip_edges = True, True, True
    opts.mel_opts.num_bins, opts.mel_opts.low_freq, opts.mel_opts.high_freq = num_bins, 20.0, 0.0
    opts.use_energy, opts.htk_compat, opts.use_log_fbank, opts.use_power = False, True, True, True
    fb = knf.OnlineFbank(opts)
    fb.accept_waveform(SR, x.tolist())
    fb.input_finished()
    return np.array([fb.get_frame(i) for i in range(fb.num_frames_ready)], np.float32).reshape(-1, num_bins)


def knf_power_spectrum(x: np.ndarray) -> np.ndarray:
    """Windowed frames from knf (DC removal, pre-emphasis, hanning) -> knf's rfft -> power [T, 257]."""
    ro = knf.RawAudioSamplesOptions()
    fo = ro.frame_opts
    fo.samp_freq, fo.dither, fo.window_type, fo.preemph_coeff = SR, 0.0, "hanning", 0.97
    fo.remove_dc_offset = True
    fo.round_to_power_of_two = False  # this knf build crashes when zero-padding raw frames; pad here
    raw = knf.OnlineRawAudioSamples(ro)
    raw.accept_waveform(SR, x.tolist())
    raw.input_finished()
    rfft = knf.Rfft(512)
    out = []
    for i in range(raw.num_frames_ready):
        packed = np.array(rfft.compute(list(raw.get_frame(i)) + [0.0] * 112), np.float64)
        re = np.concatenate([[packed[0]], packed[2::2], [packed[1]]])
        im = np.concatenate([[0.0], packed[3::2], [0.0]])
        out.append(re ** 2 + im ** 2)
    return np.array(out)


def kaldi_banks_loop(num_bins: int, n_fft=512, sr=SR, low=20.0) -> np.ndarray:
    """Kaldi's MelBanks construction (weights where left < mel < right), but tolerating empty bins
    as torchaudio does (Kaldi/knf refuse 128 bins at 16 kHz / 512 points). [n_fft//2 + 1, bins]."""
    mel = lambda f: 1127.0 * math.log(1.0 + f / 700.0)  # noqa: E731
    lo, hi = mel(low), mel(sr / 2)
    delta = (hi - lo) / (num_bins + 1)
    banks = np.zeros((n_fft // 2 + 1, num_bins))
    for b in range(num_bins):
        left, center, right = lo + b * delta, lo + (b + 1) * delta, lo + (b + 2) * delta
        for i in range(n_fft // 2):
            m = mel(sr / n_fft * i)
            if left < m < right:
                banks[i, b] = (m - left) / (center - left) if m <= center else (right - m) / (right - center)
    return banks


def reference_fbank_128(x: np.ndarray) -> np.ndarray:
    power = knf_power_spectrum(x)
    return np.log(np.maximum(power @ kaldi_banks_loop(128), np.finfo(np.float32).eps)).astype(np.float32)


class ConstantClipsPerVideoSampler:
    """pytorchvideo's sampler, stated literally (stateful, exact Fractions)."""

    def __init__(self, clip_duration, clips_per_video):
        self._clip_duration = Fraction(clip_duration)
        self._clips_per_video = clips_per_video
        self._current_clip_index = 0

    def __call__(self, last_clip_time, video_duration, annotation):
        max_start = Fraction(max(video_duration - self._clip_duration, 0))
        uniform_clip = Fraction(max_start, self._clips_per_video)
        start = uniform_clip * self._current_clip_index
        index = self._current_clip_index
        self._current_clip_index += 1
        is_last = False
        if (self._current_clip_index >= self._clips_per_video
                or uniform_clip * self._current_clip_index > max_start):
            self._current_clip_index = 0
            is_last = True
        return start, start + self._clip_duration, index, 0, is_last


def imagebind_reference(waveform: np.ndarray, num_clips: int, fbank_fn=reference_fbank_128) -> np.ndarray:
    """ImageBind's load_and_transform_audio_data loop on a 16 kHz waveform [S] or [C, S], line by
    line with torch views: `waveform_clip = waveform[:, a:b]`, `waveform -= waveform.mean()` (in
    place, over every channel, leaking into overlapping clips), then kaldi fbank, which reads
    channel 0 (torchaudio's `channel=-1` -> 0); pad/crop to 204 frames; normalize."""
    sampler = ConstantClipsPerVideoSampler(2, num_clips)
    wav = torch.from_numpy(np.array(waveform, np.float32, ndmin=2))
    points, end, last = [], 0.0, False
    while not last:
        start, end, _, _, last = sampler(end, wav.size(1) / SR, annotation=None)
        points.append((start, end))
    clips = []
    for start, end in points:
        clip = wav[:, int(start * SR): int(end * SR)]
        clip -= clip.mean()
        fb = torch.from_numpy(fbank_fn(clip[0].numpy().copy())).transpose(0, 1)
        p = 204 - fb.size(1)
        fb = torch.nn.functional.pad(fb, (0, p)) if p > 0 else fb[:, :204]
        clips.append(((fb - (-4.268)) / 9.138)[None])
    return torch.stack(clips).numpy()


def imagebind_reference_file(path, num_clips: int = 8) -> np.ndarray:
    """`torchaudio.load` (every channel, float) stood in for by PyAV, `torchaudio.functional.resample`
    per channel, then the loop above."""
    with av.open(str(path)) as c:
        chunks = [f.to_ndarray().reshape(len(f.layout.channels), -1) if f.format.is_planar
                  else f.to_ndarray().reshape(-1, len(f.layout.channels)).T
                  for f in c.decode(audio=0)]
        rate = c.streams.audio[0].rate
    wav = np.concatenate(chunks, axis=1)
    # torchaudio.load's normalize=True: integer PCM scaled to [-1, 1), float kept
    wav = wav.astype(np.float32) / 32768.0 if wav.dtype == np.int16 else wav.astype(np.float32)
    if rate != SR:
        wav = torchaudio_resample(torch.from_numpy(wav), rate, SR).numpy()
    return imagebind_reference(wav, num_clips)



# ----------------------------------------------------------------------------- fbank parity

def _check_against(ours, ref, what):
    """<= 1e-3 wherever float32 resolves the value (within 16 nats ~ 69 dB of the frame's peak);
    deeper than that both sides are float32 FFT rounding noise and agree to 1e-2."""
    assert ours.shape == ref.shape, f"{what}: {ours.shape} vs {ref.shape}"
    err = np.abs(ours.astype(np.float64) - ref)
    resolved = ref > ref.max(axis=1, keepdims=True) - 16.0
    assert err[resolved].max(initial=0.0) <= 1e-3, f"{what}: max err {err[resolved].max():.2e}"
    assert err.max(initial=0.0) <= 1e-2, f"{what}: max err {err.max():.2e} in float32 noise floor"
    return float(err[resolved].max(initial=0.0)), float(err.max(initial=0.0))


@pytest.mark.parametrize("name", list(SIGNALS))
def test_fbank_matches_kaldi_native_fbank(name):
    # 126 is the most mel bins Kaldi/knf accept at 16 kHz / 512 points (one of 128 bins is
    # empty); 128 itself is checked below against knf's spectrum.
    x = SIGNALS[name]()
    ours = audio.kaldi_fbank(x[None], num_mel_bins=126)[0]
    ref = knf_fbank(x, 126)
    assert ours.shape == (1 + (x.size - 400) // 160, 126)
    resolved_err, all_err = _check_against(ours, ref, name)
    print(f"{name}: max abs err {resolved_err:.2e} (resolved), {all_err:.2e} (all)")
    if name == "silence":
        np.testing.assert_array_equal(ours, np.float32(LOG_EPS))


@pytest.mark.parametrize("name", ["speech_like", "tone_440", "silence"])
def test_fbank_128_bins_matches_knf_spectrum_and_kaldi_banks(name):
    x = SIGNALS[name]()
    ours = audio.kaldi_fbank(x[None])[0]
    _check_against(ours, reference_fbank_128(x), name)
    # The 4th filter holds no FFT bin: ImageBind's features always carry log(eps) there.
    np.testing.assert_array_equal(ours[:, 3], np.float32(LOG_EPS))


def test_mel_banks_match_knf():
    fo = knf.FrameExtractionOptions()
    fo.samp_freq, fo.window_type = SR, "hanning"
    for bins in (64, 126):
        mo = knf.MelBanksOptions()
        mo.num_bins = bins
        ref = np.array(knf.MelBanks(mo, fo, 1.0).get_matrix()).T
        np.testing.assert_allclose(audio.mel_banks(bins, 512, float(SR)), ref, atol=1e-4)
        np.testing.assert_allclose(kaldi_banks_loop(bins), ref, atol=1e-4)
    banks = audio.mel_banks(128, 512, float(SR))
    assert banks.shape == (257, 128) and np.flatnonzero(banks.max(axis=0) == 0).tolist() == [3]
    np.testing.assert_allclose(banks, kaldi_banks_loop(128), atol=1e-4)


# ----------------------------------------------------------------------------- sampling & clips

@pytest.mark.parametrize("duration", [100.01, 33.3331, 10.0, 7.77, 3.3, 2.0, 1.2, 0.5])
@pytest.mark.parametrize("num_clips", [1, 3, 8])
def test_clip_timepoints_follow_pytorchvideo(duration, num_clips):
    sampler = ConstantClipsPerVideoSampler(2, num_clips)
    expected, end, last = [], 0.0, False
    while not last:
        start, end, _, _, last = sampler(end, duration, None)
        expected.append((start, end))
    assert audio.clip_timepoints(duration, num_clips, 2.0) == expected
    assert len(expected) == num_clips


def test_clip_starts_spread_over_duration_minus_clip():
    points = audio.clip_timepoints(10.0, 8)
    assert [float(s) for s, _ in points] == [i * 8 / 8 for i in range(8)]
    assert all(e - s == 2 for s, e in points)


@pytest.mark.parametrize("case", ["overlapping_dc", "shorter_than_clip", "silent"])
def test_waveform_to_clips_matches_imagebind_loop(case):
    if case == "overlapping_dc":  # 3.3 s, 8 clips 0.1625 s apart, DC offset: the in-place quirk shows
        x = 0.2 + tone(3.3, 660.0, 0.3) + noise(3.3, 0.05)
    elif case == "shorter_than_clip":
        x = speech_like(1.2)
    else:
        x = np.zeros(int(2.5 * SR), np.float32)
    ours = audio.waveform_to_clips(x, SR, num_clips=8)
    ref = imagebind_reference(x, 8)
    assert ours.shape == ref.shape == (8, 1, 128, 204) and ours.dtype == np.float32
    assert np.abs(ours - ref).max() <= 1e-3, f"{case}: {np.abs(ours - ref).max():.2e}"
    if case == "overlapping_dc":
        # Without reproducing the leak the clips after the first differ visibly, so the test can fail.
        plain = audio.normalize_fbank(audio._melspecs(
            [x[a:b] for a, b in audio.clip_sample_ranges(x.size, 8)], SR, 128, 204))
        assert np.abs(plain - ref).max() > 1e-2


def test_silent_and_short_layout():
    silent = audio.waveform_to_clips(np.zeros(3 * SR, np.float32), SR, num_clips=8)
    floor, pad = (LOG_EPS - audio.FBANK_MEAN) / audio.FBANK_STD, -audio.FBANK_MEAN / audio.FBANK_STD
    # a 2 s clip has 1 + (32000 - 400) // 160 = 198 frames; ImageBind zero-pads 6 at the end
    np.testing.assert_allclose(silent[..., :198], floor, atol=1e-6)
    np.testing.assert_allclose(silent[..., 198:], pad, atol=1e-6)
    short = audio.waveform_to_clips(tone(0.5), SR, num_clips=8)
    n = 1 + (8000 - 400) // 160
    np.testing.assert_allclose(short[..., n:], pad, atol=1e-6)
    assert np.all(short[..., :n].max(axis=2) > pad + 0.3)  # the tone, before the padding
    np.testing.assert_array_equal(short, np.broadcast_to(short[:1], short.shape))  # all clips at 0 s
    tiny = audio.waveform_to_clips(tone(0.01), SR, num_clips=2)  # < one 25 ms window: all padding
    np.testing.assert_allclose(tiny, pad, atol=1e-6)


def test_waveform_to_clips_input_errors():
    with pytest.raises(ValueError, match=r"\[channels, samples\].*\(1, 2, 100\)"):
        audio.waveform_to_clips(np.zeros((1, 2, 100), np.float32), SR, 8)
    with pytest.raises(ValueError, match=r"channel 2 requested, the track has 2"):
        audio.waveform_to_clips(np.zeros((2, 100), np.float32), SR, 8, channels=2)
    with pytest.raises(ValueError, match=r"expected 'imagebind'.*got 'left'"):
        audio.waveform_to_clips(np.zeros(100, np.float32), SR, 8, channels="left")
    with pytest.raises(ValueError, match="empty waveform"):
        audio.waveform_to_clips(np.zeros(0, np.float32), SR, 8)
    with pytest.raises(ValueError, match="NaN"):
        audio.waveform_to_clips(np.full(100, np.nan, np.float32), SR, 8)


# ----------------------------------------------------------------------------- resampling

@pytest.mark.parametrize("orig", [44100, 48000, 22050, 8000])
def test_resample_matches_torchaudio_algorithm(orig):
    x = tone(1.5, 440.0, 0.5, sr=orig) + noise(1.5 * orig / SR, 0.05)[: int(1.5 * orig)]
    ours = audio.resample(x, orig, SR)
    assert ours.shape == (math.ceil(SR * x.size / orig),)
    np.testing.assert_allclose(ours, torchaudio_resample(torch.from_numpy(x)[None], orig, SR)[0].numpy(), atol=2e-6)
    clean = audio.resample(tone(1.5, 440.0, 0.5, sr=orig), orig, SR)
    inner = slice(400, -400)  # away from torchaudio's zero-padded ends
    np.testing.assert_allclose(clean[inner], tone(1.5)[: clean.size][inner], atol=5e-4)


# ----------------------------------------------------------------------------- files

def _write_wav(path, samples: np.ndarray, rate: int):
    """int16 [channels, n] -> a PCM wav written by PyAV."""
    layout = {1: "mono", 2: "stereo"}[samples.shape[0]]
    with av.open(str(path), "w") as c:
        s = c.add_stream("pcm_s16le", rate=rate)
        s.layout = layout
        frame = av.AudioFrame.from_ndarray(samples.T.reshape(1, -1).copy(), format="s16", layout=layout)
        frame.sample_rate, frame.pts = rate, 0
        for p in s.encode(frame):
            c.mux(p)
        for p in s.encode(None):
            c.mux(p)


def test_decode_audio_stereo_wav(tmp_path):
    rate = 44100
    left = (tone(1.0, 440.0, 0.5, sr=rate) * 32767).astype(np.int16)
    right = (noise(rate / SR, 0.1)[:rate] * 32767).astype(np.int16)
    path = tmp_path / "stereo.wav"
    _write_wav(path, np.stack([left, right]), rate)
    first, sr = audio.decode_audio(path, channel=0)
    assert sr == SR
    np.testing.assert_array_equal(first, audio.resample(left.astype(np.float32) / 32768, rate, SR))
    mixed, _ = audio.decode_audio(path)
    expected = (left.astype(np.float32) / 32768 + right.astype(np.float32) / 32768) / 2
    np.testing.assert_allclose(mixed, audio.resample(expected, rate, SR), atol=1e-6)
    with pytest.raises(audio.AudioDecodeError, match="channel 2 requested, the track has 2"):
        audio.decode_audio(path, channel=2)


def test_video_with_tone(tmp_path):
    frames = np.zeros((72, 32, 32, 3), np.uint8)
    path = write_mp4(str(tmp_path / "tone.mp4"), frames, fps=24, audio=tone(3.0, 440.0, 0.5), sample_rate=SR)
    clips = audio.load_audio_clips(path, num_clips=8)
    assert clips.present and clips.fbank.shape == (8, 1, 128, 204) and clips.fbank.dtype == np.float32
    assert abs(clips.duration_s - 3.0) < 0.1  # AAC adds encoder priming samples
    mel = lambda f: 1127.0 * np.log(1.0 + f / 700.0)  # noqa: E731
    centers = mel(20.0) + (np.arange(128) + 1) * (mel(8000.0) - mel(20.0)) / 129
    expected_bin = int(np.argmin(np.abs(centers - mel(440.0))))
    dominant = clips.fbank[:, 0, :, :198].mean(axis=-1).argmax(axis=-1)
    assert np.all(np.abs(dominant - expected_bin) <= 1), (dominant, expected_bin)


def test_video_without_audio_track(tmp_path):
    path = write_mp4(str(tmp_path / "mute.mp4"), np.zeros((10, 32, 32, 3), np.uint8), fps=10)
    clips = audio.load_audio_clips(path, num_clips=4)
    assert clips.present is False and clips.duration_s == 0.0
    assert clips.fbank.shape == (4, 1, 128, 204) and not clips.fbank.any()


def test_corrupt_and_missing_files(tmp_path):
    bad = tmp_path / "corrupt.mp4"
    bad.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(audio.AudioDecodeError, match="corrupt.mp4") as info:
        audio.load_audio_clips(bad)
    assert isinstance(info.value, ValueError) and info.value.path == str(bad)
    missing = tmp_path / "nope" / "missing.mp4"
    with pytest.raises(audio.AudioDecodeError, match=r"missing\.mp4.*does not exist"):
        audio.load_audio_clips(missing)


# ----------------------------------------------------------------------------- channels vs ImageBind

LAYOUTS = {1: "mono", 2: "stereo", 6: "5.1"}


def _multichannel_signal(channels: int, seconds: float, rate: int) -> np.ndarray:
    """[C, n] float32: different content and different DC per channel (DC makes the all-channel,
    carried-over mean removal visible), a gap of silence in channel 0."""
    t = np.arange(int(seconds * rate)) / rate
    rng = np.random.default_rng(channels)
    out = []
    for c in range(channels):
        f = 220.0 * (c + 1) + 37.0 * c * c
        x = 0.25 * np.sin(2 * np.pi * f * t) * (1 + 0.5 * np.sin(2 * np.pi * (0.5 + c) * t))
        x += 0.03 * rng.standard_normal(t.size) + 0.08 * (c - channels / 2) / channels
        out.append(x)
    out = np.array(out, np.float32)
    out[0, int(0.4 * rate): int(0.9 * rate)] *= 0.01
    return out


def _write_aac(path, samples: np.ndarray, rate: int):
    """float32 [C, n] -> an AAC track (in an .m4a / .mp4) written by PyAV."""
    layout = LAYOUTS[samples.shape[0]]
    with av.open(str(path), "w") as c:
        s = c.add_stream("aac", rate=rate, layout=layout)
        size = s.codec_context.frame_size or 1024
        for start in range(0, samples.shape[1], size):
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples[:, start:start + size]),
                                               format="fltp", layout=layout)
            frame.sample_rate, frame.pts = rate, start
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode(None):
            c.mux(p)


@pytest.mark.parametrize("case", ["mono_aac_16k", "stereo_wav_44k", "stereo_aac_48k", "surround51_aac_48k"])
def test_file_matches_imagebind_line_by_line(tmp_path, case):
    channels = {"mono": 1, "stereo": 2, "surround51": 6}[case.split("_")[0]]
    rate = int(case.split("_")[-1][:-1]) * 1000
    rate = 44100 if rate == 44000 else rate
    x = _multichannel_signal(channels, 3.3, rate)  # 3.3 s, 8 clips: overlapping clips
    if "wav" in case:
        path = tmp_path / f"{case}.wav"
        _write_wav(path, (x * 32767).astype(np.int16), rate)
    else:
        path = tmp_path / f"{case}.m4a"
        _write_aac(path, x, rate)
    ref = imagebind_reference_file(path)
    ours = audio.load_audio_clips(path, num_clips=8)
    assert ours.present and ours.fbank.shape == ref.shape == (8, 1, 128, 204)
    err = np.abs(ours.fbank - ref).max()
    assert err <= 1e-3, f"{case}: max abs {err:.2e} vs ImageBind's loop"
    print(f"{case}: max abs err {err:.2e}")
    if channels > 1:
        # the alternatives are real choices: they differ from the original on these files
        for other in ("mix", 0):
            alt = audio.load_audio_clips(path, num_clips=8, channels=other).fbank
            assert np.abs(alt - ref).max() > 1e-2, other


def test_channel_choices_on_mono_agree(tmp_path):
    x = _multichannel_signal(1, 2.5, SR)[0]
    ref = audio.waveform_to_clips(x, SR, 4)
    for choice in ("mix", 0, "0"):
        np.testing.assert_array_equal(audio.waveform_to_clips(x, SR, 4, channels=choice), ref)
    stereo = np.stack([x, 0.5 * x[::-1]])
    np.testing.assert_array_equal(audio.waveform_to_clips(stereo, SR, 4, channels=1),
                                  audio.waveform_to_clips(stereo[1], SR, 4))
    np.testing.assert_allclose(audio.waveform_to_clips(stereo, SR, 4, channels="mix"),
                               audio.waveform_to_clips(stereo.mean(0), SR, 4), atol=1e-5)


def test_damaged_files(tmp_path):
    from media_fixtures import damaged_files

    files = damaged_files(tmp_path)
    assert abs(audio.load_audio_clips(files["good"]).duration_s - 5.0) < 0.1
    # the cut's last audio packet is partial: the decoder fails there, 1.x s into 5 s
    with pytest.raises(audio.AudioDecodeError, match=r"cut\.mp4.*(truncated: decoded|decode error mid-stream after) "
                                                 r"\d\.\d s of 5\.0 s") as e:
        audio.load_audio_clips(files["cut"])
    assert e.value.category in ("truncated", "corrupt")
    with pytest.raises(audio.AudioDecodeError, match=r"corrupt\.mp4.*decode error mid-stream after \d\.\d s of 5\.0 s"):
        audio.load_audio_clips(files["corrupt"])
    with pytest.raises(audio.AudioDecodeError, match=r"empty\.mp4"):
        audio.load_audio_clips(files["empty"])

