"""Media front end: 8 frames + 8 audio clips of a 720p h264 clip, ours vs the original's readers.

    ours        data_pipelines.video.decode_video(size=(224, 224)) + normalize (what vllama-chat
                feeds the video tower) and data_pipelines.audio.load_audio_clips (8 clips)
    decord      decord.VideoReader(path, height=224, width=224).get_batch(the reference's uniform
                indices) + the same normalisation in numpy: Video-LLaMA's load_video
    original    ImageBind's load_and_transform_audio_data restated in torch: all channels
    audio       decoded (PyAV standing in for torchaudio.load, which needs a torchaudio wheel for
                this torch), torchaudio's sinc resampling as conv1d, pytorchvideo's clip sampler,
                kaldi.fbank's steps as torch ops (torchaudio.compliance.kaldi is plain torch ops)

The clips (written once, in a temp dir): 1280x720 h264 at 25 fps with a keyframe every 2 s, as
web video has, moving gradients plus noise, and a 48 kHz stereo AAC track; --seconds long; one
with x264's default B-frame pattern (3 B-frames, pyramid: two of each three are non-reference
pictures, which our reader does not decode unless asked for) and one without B-frames.
Every reader runs once to warm up, then the readers run in turns --reps times; medians are
reported and ratios are between medians of this one run. The outputs are compared too (frames
to decord: max abs levels; audio to the torch restatement: max abs of the normalised fbank).

    python benchmarks/media_decode.py --json media.json
"""
from __future__ import annotations

import argparse
import fractions
import os
import statistics
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_clip(path: str, seconds: float, fps: int = 25, width: int = 1280, height: int = 720,
               bframes: bool = True) -> str:
    import av

    rng = np.random.default_rng(0)
    n = int(seconds * fps)
    y, x = np.mgrid[0:height, 0:width]
    with av.open(path, "w") as c:
        v = c.add_stream("libx264" if "libx264" in av.codecs_available else "h264", rate=fps)
        v.width, v.height, v.pix_fmt = width, height, "yuv420p"
        v.options = {"preset": "veryfast", "crf": "23", "g": str(2 * fps)}
        # x264's default 3 B-frames (pyramid), always used (b-adapt=0): on this synthetic motion its
        # adaptive choice would drop them, unlike on camera footage; or none at all.
        v.options["x264-params"] = "b-adapt=0:bframes=3" if bframes else "bframes=0"
        a = c.add_stream("aac", rate=48000, layout="stereo")
        noise = rng.integers(0, 40, (height, width, 1), dtype=np.uint8)
        for t in range(n):
            img = np.stack([(x + 4 * t) % 256, (y + 2 * t) % 256, (x // 4 + y // 4 + t) % 256], -1).astype(np.uint8)
            img = img + np.roll(noise, 7 * t, axis=1)
            frame = av.VideoFrame.from_ndarray(img, "rgb24")
            frame.pts = t
            for p in v.encode(frame):
                c.mux(p)
        for p in v.encode():
            c.mux(p)
        total = int(seconds * 48000)
        tt = np.arange(total) / 48000
        sound = np.stack([0.3 * np.sin(2 * np.pi * 440 * tt), 0.2 * np.sin(2 * np.pi * 660 * tt) + 0.05]).astype(np.float32)
        size = a.codec_context.frame_size or 1024
        for start in range(0, total, size):
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(sound[:, start:start + size]), "fltp", "stereo")
            frame.sample_rate, frame.pts, frame.time_base = 48000, start, fractions.Fraction(1, 48000)
            for p in a.encode(frame):
                c.mux(p)
        for p in a.encode():
            c.mux(p)
    return path


# ------------------------------------------------------------------------------------ readers

def ours_frames(path):
    from data_pipelines import video

    return video.normalize(video.decode_video(path, 8, "uniform", size=(224, 224)).frames)


def ours_audio(path):
    from data_pipelines.audio import load_audio_clips

    return load_audio_clips(path, num_clips=8).fbank


def decord_frames(path):
    import decord

    from data_pipelines import video

    vr = decord.VideoReader(path, height=224, width=224)
    vlen = len(vr)
    indices = np.arange(0, vlen, vlen / 8).astype(int)  # Video-LLaMA's load_video, uniform
    frames = vr.get_batch(list(indices)).asnumpy()
    return ((frames.astype(np.float32) / 255.0) - video.CLIP_MEAN) / video.CLIP_STD



def _torch_kaldi_fbank(wav, banks):
    """torchaudio.compliance.kaldi.fbank with ImageBind's arguments, as its torch ops: channel 0,
    snip_edges frames, DC removal, pre-emphasis 0.97, hanning, 512-point power spectrum, mel, log."""
    import torch

    x = wav[0]
    frames = x.as_strided(((x.numel() - 400) // 160 + 1, 400), (160, 1))
    frames = frames - frames.mean(dim=1, keepdim=True)
    prev = torch.nn.functional.pad(frames.unsqueeze(0), (1, 0), mode="replicate").squeeze(0)
    frames = frames - 0.97 * prev[:, :-1]
    frames = frames * torch.hann_window(400, periodic=False)
    frames = torch.nn.functional.pad(frames, (0, 112))
    power = torch.fft.rfft(frames).abs().pow(2.0)
    mel = torch.mm(power, banks)
    return torch.max(mel, torch.tensor(torch.finfo(torch.float).eps)).log()


def original_audio(path):
    """ImageBind's load_and_transform_audio_data(clips_per_video=8) restated in torch."""
    import av
    import torch

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from audio_reference import torchaudio_resample

    from data_pipelines.audio import clip_timepoints, mel_banks

    with av.open(path) as c:
        rate = c.streams.audio[0].rate
        wav = torch.from_numpy(np.concatenate([f.to_ndarray() for f in c.decode(audio=0)], axis=1))
    if rate != 16000:
        wav = torchaudio_resample(wav, rate, 16000)
    banks = torch.from_numpy(np.array(mel_banks(128, 512, 16000.0)))
    clips = []
    for start, end in clip_timepoints(wav.size(1) / 16000, 8, 2):
        clip = wav[:, int(start * 16000): int(end * 16000)]
        clip -= clip.mean()
        fb = _torch_kaldi_fbank(clip, banks).transpose(0, 1)
        p = 204 - fb.size(1)
        fb = torch.nn.functional.pad(fb, (0, p)) if p > 0 else fb[:, :204]
        clips.append(((fb - (-4.268)) / 9.138)[None])
    return torch.stack(clips).numpy()


READERS = {"ours_frames": ours_frames, "decord_frames": decord_frames,
           "ours_audio": ours_audio, "original_audio": original_audio}


def main(argv=None) -> int:
    from benchmarks.common import uptime, write_json
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (0: torch's default; on a loaded 2-core box its pool spin-waits)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    uptime_before = uptime()
    levels = lambda x: x * np.array([0.26862954, 0.26130258, 0.27577711]) * 255  # noqa: E731
    result = {"reps": args.reps, "clips": {}, "uptime_before": uptime_before, "cpus": os.cpu_count()}
    for name, bframes in (("h264 with B-frames", True), ("h264 without B-frames", False)):
        with tempfile.TemporaryDirectory() as tmp:
            path = write_clip(os.path.join(tmp, "clip720p.mp4"), args.seconds, bframes=bframes)
            outputs = {k: fn(path) for k, fn in READERS.items()}  # warm-up, and outputs to compare
            times = {k: [] for k in READERS}
            for _ in range(args.reps):
                for k, fn in READERS.items():
                    start = time.perf_counter()
                    fn(path)
                    times[k].append(time.perf_counter() - start)
            size = os.path.getsize(path)
        med = {k: statistics.median(v) for k, v in times.items()}
        r = result["clips"][name] = {
            "clip": f"1280x720 {name} {args.seconds:g} s 25 fps (keyframe every 2 s) + 48 kHz stereo AAC, "
                    f"{size / 1e6:.1f} MB",
            "median_s": med, "all_s": times,
            "frames_ratio_decord_over_ours": med["decord_frames"] / med["ours_frames"],
            "audio_ratio_original_over_ours": med["original_audio"] / med["ours_audio"],
            "total_ratio": (med["decord_frames"] + med["original_audio"]) / (med["ours_frames"] + med["ours_audio"]),
            "frames_max_abs_levels_vs_decord": float(np.abs(levels(outputs["ours_frames"] - outputs["decord_frames"])).max()),
            "audio_max_abs_vs_original": float(np.abs(outputs["ours_audio"] - outputs["original_audio"]).max()),
        }
        print(f"== {r['clip']}")
        for k in READERS:
            print(f"{k:16s} median {med[k] * 1e3:7.1f} ms  (runs: {', '.join(f'{t * 1e3:.0f}' for t in times[k])})")
        print(f"frames: decord / ours = {r['frames_ratio_decord_over_ours']:.2f}x "
              f"(max |diff| {r['frames_max_abs_levels_vs_decord']:.2f} levels)")
        print(f"audio: original / ours = {r['audio_ratio_original_over_ours']:.2f}x "
              f"(max |diff| {r['audio_max_abs_vs_original']:.1e})")
        print(f"8 frames + 8 clips: original / ours = {r['total_ratio']:.2f}x")
    result["uptime_after"] = uptime()
    print(f"load before: {uptime_before}\nload after:  {result['uptime_after']}")
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    sys.exit(main())
