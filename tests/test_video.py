"""Video decoding (sampling by time, VFR, rotation, short clips, broken files) and pixel transforms."""
import os

import numpy as np
import pytest
from PIL import Image

from data_pipelines import video
from data_pipelines.media import write_image, write_mp4
from media_fixtures import damaged_files


def numbered_frames(num, h=32, w=48):
    """Frame k is flat grey level 8*k, so the decoded level tells which source frame it was."""
    frames = np.zeros((num, h, w, 3), np.uint8)
    for k in range(num):
        frames[k] = 8 * k
    return frames


def frame_ids(frames):
    return np.round(frames[:, :, :, 0].mean(axis=(1, 2)) / 8).astype(int)


@pytest.mark.parametrize("vlen,n", [(30, 8), (8, 8), (100, 8), (17, 5), (9, 4)])
def test_uniform_indices_match_reference(vlen, n):
    reference = np.arange(0, vlen, vlen / n).astype(int)  # video_llama load_video, sampling="uniform"
    np.testing.assert_array_equal(video.sample_indices(vlen, n, "uniform"), reference)


def test_headtail_indices_like_reference():
    rng = np.random.default_rng(0)
    draws = [video.sample_indices(40, 8, "headtail", rng) for _ in range(200)]
    for idx in draws:
        head, tail = idx[:4], idx[4:]
        assert np.all(head < 20) and np.all(tail >= 20) and np.all(tail < 40)
        assert len(set(head)) == 4 and len(set(tail)) == 4 and np.all(np.diff(idx) > 0)
    # Random, not fixed: many distinct draws, every frame reachable.
    assert len({tuple(d) for d in draws}) > 150
    assert set(np.concatenate(draws)) == set(range(40))
    again = np.random.default_rng(0)
    np.testing.assert_array_equal(video.sample_indices(40, 8, "headtail", again), draws[0])


def test_uniform_pool_subsampling_is_source_uniform():
    # The writer stores a uniform pool of 16; uniform 8 of it = uniform 8 of the source.
    for vlen in (16, 31, 64, 301):
        pool = video.sample_indices(vlen, 16, "uniform")
        np.testing.assert_array_equal(pool[video.sample_indices(16, 8, "uniform")],
                                      video.sample_indices(vlen, 8, "uniform"))


def test_decode_constant_rate_picks_reference_frames(tmp_path):
    path = write_mp4(str(tmp_path / "c.mp4"), numbered_frames(30), fps=10)
    decoded = video.decode_video(path, 8)
    expected = np.arange(0, 30, 30 / 8).astype(int)
    np.testing.assert_array_equal(decoded.indices, expected)
    np.testing.assert_array_equal(frame_ids(decoded.frames), expected)
    np.testing.assert_allclose(decoded.times, expected / 10, atol=1e-6)
    assert decoded.num_source_frames == 30 and decoded.duration_s == pytest.approx(3.0)
    assert decoded.frames.shape == (8, 32, 48, 3) and not decoded.has_audio

    decoded = video.decode_video(path, 8, "headtail", np.random.default_rng(1))
    np.testing.assert_array_equal(frame_ids(decoded.frames), decoded.indices)
    assert np.all(decoded.indices[:4] < 15) and np.all(decoded.indices[4:] >= 15)


def test_decode_variable_frame_rate_samples_by_time(tmp_path):
    times = np.array([0.0, 0.1, 0.2, 0.3, 1.0, 2.0, 2.1, 2.2, 2.3, 3.9])
    path = write_mp4(str(tmp_path / "vfr.mp4"), numbered_frames(10), fps=10, timestamps=times)
    decoded = video.decode_video(path, 8)
    # duration = 3.9 + median gap 0.1 = 4.0; targets 0, .5, 1, ..., 3.5 -> frame on screen then.
    expected = np.array([0, 3, 4, 4, 5, 8, 8, 8])
    assert decoded.duration_s == pytest.approx(4.0)
    np.testing.assert_array_equal(decoded.indices, expected)
    np.testing.assert_array_equal(frame_ids(decoded.frames), expected)
    np.testing.assert_allclose(decoded.times, times[expected], atol=1e-3)
    # Index-based sampling (the reference) would have taken frames 0,1,2,3,5,6,7,8: bunched in time.
    assert not np.array_equal(expected, video.sample_indices(10, 8))


@pytest.mark.parametrize("rotation,shape,corner", [
    (0, (32, 64), (0, 0)), (90, (64, 32), (1, 0)), (180, (32, 64), (1, 1)), (270, (64, 32), (0, 1)),
    (-90, (64, 32), (0, 1))])
def test_decode_applies_display_rotation(tmp_path, rotation, shape, corner):
    frames = np.zeros((2, 32, 64, 3), np.uint8)
    frames[:, :6, :6] = 255  # marker in the stored top-left corner
    path = write_mp4(str(tmp_path / "r.mp4"), frames, fps=10, rotation=rotation)
    decoded = video.decode_video(path, 2)
    assert decoded.frames.shape[1:3] == shape
    assert decoded.rotation == rotation % 360
    ys, xs = np.nonzero(decoded.frames[0, :, :, 0] > 128)
    # Counter-clockwise display turn: 90 puts the top-left marker bottom-left, and so on.
    assert (ys.mean() > shape[0] / 2, xs.mean() > shape[1] / 2) == tuple(bool(c) for c in corner)


def test_decode_short_video_repeats_frames(tmp_path):
    path = write_mp4(str(tmp_path / "short.mp4"), numbered_frames(3), fps=10)
    decoded = video.decode_video(path, 8)
    np.testing.assert_array_equal(frame_ids(decoded.frames), [0, 0, 0, 1, 1, 1, 2, 2])
    one = video.decode_video(write_mp4(str(tmp_path / "one.mp4"), numbered_frames(1), fps=10), 8)
    assert one.frames.shape[0] == 8 and np.all(frame_ids(one.frames) == 0)
    headtail = video.decode_video(path, 8, "headtail", np.random.default_rng(0))
    assert headtail.frames.shape[0] == 8


def test_decode_short_side_resize(tmp_path):
    path = write_mp4(str(tmp_path / "c.mp4"), numbered_frames(4, 32, 48), fps=10)
    assert video.decode_video(path, 2, short_side=64).frames.shape == (2, 64, 96, 3)


def test_broken_files_raise_video_decode_error(tmp_path):
    missing = str(tmp_path / "missing.mp4")
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(np.random.default_rng(0).bytes(4096))
    cases = {missing: "missing", str(empty): "empty", str(junk): "undecodable"}
    for path, category in cases.items():
        with pytest.raises(video.VideoDecodeError) as err:
            video.decode_video(path)
        assert path in str(err.value) and err.value.category == category
        assert isinstance(err.value, ValueError)


def test_audio_only_file_has_no_video_stream(tmp_path):
    import av

    path = str(tmp_path / "audio.m4a")
    with av.open(path, "w", format="mp4") as c:
        s = c.add_stream("aac", rate=16000)
        s.layout = "mono"
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="flt", layout="mono")
        frame.sample_rate, frame.pts = 16000, 0
        for p in s.encode(frame):
            c.mux(p)
        for p in s.encode():
            c.mux(p)
    with pytest.raises(video.VideoDecodeError, match="no video stream"):
        video.decode_video(path)


def test_load_image_and_errors(tmp_path):
    image = np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)
    png = write_image(str(tmp_path / "a.png"), image)
    np.testing.assert_array_equal(video.load_image(png), image)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg at all")
    for path, category in ((str(bad), "undecodable"), (str(tmp_path / "none.jpg"), "missing")):
        with pytest.raises(video.ImageDecodeError) as err:
            video.load_image(path)
        assert path in str(err.value) and err.value.category == category


def test_normalize_is_clip_mean_std():
    px = np.array([[0, 128, 255]], np.uint8).reshape(1, 1, 1, 3)
    expected = (np.array([0, 128, 255]) / 255.0 - video.CLIP_MEAN) / video.CLIP_STD
    np.testing.assert_allclose(video.normalize(px)[0, 0, 0], expected, atol=1e-6)


def test_normalize_table_equals_arithmetic_for_every_level():
    levels = np.random.default_rng(0).permutation(np.arange(256 * 3) % 256).astype(np.uint8)
    clip = levels.reshape(2, 4, 32, 3)
    table = video.normalize(clip)
    assert table.dtype == np.float32 and table.shape == clip.shape
    np.testing.assert_array_equal(table, video.normalize(clip.astype(np.float32)))


def test_eval_transform_is_pil_bicubic_squash():
    frames = np.random.default_rng(0).integers(0, 255, (2, 60, 100, 3), dtype=np.uint8)
    out = video.eval_transform(frames)
    assert out.shape == (2, 224, 224, 3) and out.dtype == np.float32
    ref = np.asarray(Image.fromarray(frames[1]).resize((224, 224), Image.BICUBIC))
    np.testing.assert_allclose(out[1], video.normalize(ref[None])[0], atol=1e-6)


def test_random_resized_crop_params_ranges():
    rng = np.random.default_rng(0)
    for h, w in ((224, 224), (256, 455), (300, 120)):
        for _ in range(300):
            top, left, ch, cw = video.random_resized_crop_params(h, w, rng)
            assert 0 <= top and top + ch <= h and 0 <= left and left + cw <= w
            if (ch, cw) != (h, w) and not (ch == h or cw == w):
                area = ch * cw / (h * w)
                assert 0.5 - 0.02 <= area <= 1.0 + 1e-9
                assert 3 / 4 - 0.05 <= cw / ch <= 4 / 3 + 0.05


def test_train_transform_one_crop_per_clip_and_full_crop_equals_eval():
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 255, (1, 64, 96, 3), dtype=np.uint8)
    clip = np.concatenate([frame, frame])
    out = video.train_transform(clip, np.random.default_rng(3))
    np.testing.assert_array_equal(out[0], out[1])  # same crop for every frame of a clip
    assert out.shape == (2, 224, 224, 3)
    full = video.train_transform(clip, rng, scale=(1.0, 1.0), ratio=(1.0, 1.0), squash=True)
    np.testing.assert_allclose(full, video.eval_transform(clip), atol=1e-5)
    # Images crop the unsquashed frame: a full-area crop of a 64x64 image is the whole image.
    square = rng.integers(0, 255, (1, 64, 64, 3), dtype=np.uint8)
    img = video.train_transform(square, rng, scale=(1.0, 1.0), ratio=(1.0, 1.0), squash=False)
    np.testing.assert_allclose(img, video.eval_transform(square), atol=1e-5)


def test_train_transform_crop_is_a_zoom(tmp_path):
    # Left half black, right half white: crops must still show one edge, scaled up, not resampled noise.
    frame = np.zeros((1, 128, 128, 3), np.uint8)
    frame[:, :, 64:] = 255
    rng = np.random.default_rng(0)
    outs = np.stack([video.train_transform(frame, rng, size=64)[0] for _ in range(20)])
    first_col, last_col = outs[:, :, 0].mean(axis=(1, 2)), outs[:, :, -1].mean(axis=(1, 2))
    assert np.all(last_col >= first_col)
    assert not np.allclose(outs[0], outs[1])  # different random crops


def test_load_video_and_image_clip(tmp_path):
    path = write_mp4(str(tmp_path / "c.mp4"), numbered_frames(20), fps=10)
    assert video.load_video(path).shape == (8, 224, 224, 3)
    np.testing.assert_array_equal(video.load_video(path, 4, size=32),
                                  video.normalize(video.decode_video(path, 4, size=(32, 32)).frames))
    assert video.load_video(path, 4, train=True, rng=np.random.default_rng(0)).shape == (4, 224, 224, 3)
    img = write_image(str(tmp_path / "a.jpg"), np.full((40, 50, 3), 99, np.uint8))
    assert video.load_image_clip(img, train=True, rng=np.random.default_rng(0)).shape == (1, 224, 224, 3)
    with pytest.raises(ValueError, match="rng"):
        video.load_video(path, train=True)
    assert os.path.exists(path)


# ----------------------------------------------------------------------------- decord parity

def _write_codec(path, codec, w, h, n=8, fps=12, sar=None, pix_fmt="yuv420p"):
    """A clip of moving gradients plus a noise patch (edges and flat areas, so the scaler's filter
    and chroma handling both show), written by PyAV with any codec / size / pixel aspect."""
    import fractions

    import av

    rng = np.random.default_rng(w * h)
    y, x = np.mgrid[0:h, 0:w]
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = w, h, pix_fmt
        if sar:
            s.codec_context.sample_aspect_ratio = fractions.Fraction(*sar)
        for t in range(n):
            f = np.stack([(x * 255 // w + 9 * t) % 256, (y * 255 // h) % 256,
                          ((x // 3 + y // 5 + t) % 32) * 8], -1).astype(np.uint8)
            f[h // 3: h // 2, w // 4: w // 2] = rng.integers(0, 255, (h // 2 - h // 3, w // 2 - w // 4, 3))
            frame = av.VideoFrame.from_ndarray(f, "rgb24")
            frame.pts = t
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return str(path)


DECORD_CASES = [  # codec, width, height, pixel aspect, pix_fmt
    ("libx264", 176, 144, None, "yuv420p"),
    ("libx264", 334, 198, None, "yuv420p"),
    ("libx264", 333, 199, None, "yuv444p"),  # odd sizes: 4:2:0 h264 needs even ones
    ("libx264", 320, 240, (4, 3), "yuv420p"),  # anamorphic: displayed 427x240
    ("libx264", 1280, 720, None, "yuv420p"),
    ("mpeg4", 176, 144, None, "yuv420p"),
    ("mpeg4", 333, 199, None, "yuv420p"),
    ("mpeg4", 352, 288, (12, 11), "yuv420p"),
]


@pytest.mark.parametrize("codec,w,h,sar,pix_fmt", DECORD_CASES)
def test_scaled_decode_matches_decord(tmp_path, codec, w, h, sar, pix_fmt):
    """The original reads videos with decord VideoReader(height=224, width=224): FFmpeg scales at
    decode time. decode_video(size=(224, 224)) must give the same uint8 frames (<= 1 level)."""
    decord = pytest.importorskip("decord")
    import av

    if codec not in av.codecs_available:
        pytest.skip(f"{codec} encoder not in this PyAV build")
    path = _write_codec(tmp_path / f"{codec}_{w}x{h}.mp4", codec, w, h, n=6 if w > 640 else 10,
                        sar=sar, pix_fmt=pix_fmt)
    ours = video.decode_video(path, 4, size=(224, 224))
    reader = decord.VideoReader(path, height=224, width=224)
    assert ours.num_source_frames == len(reader)
    ref = reader.get_batch(list(ours.indices)).asnumpy()
    assert ours.frames.shape == ref.shape == (4, 224, 224, 3) and ours.frames.dtype == np.uint8
    err = np.abs(ours.frames.astype(int) - ref)
    assert err.max() <= 1, f"max {err.max()} mean {err.mean():.3f} levels vs decord"
    # A PIL bicubic resize of the full-size frames (our old path) is measurably different.
    native = video.decode_video(path, 4)
    pil = video._resize(native.frames, (224, 224))
    assert np.abs(pil.astype(int) - ref).max() > 4


@pytest.mark.parametrize("rotation", [90, 180, 270])
def test_scaled_decode_rotation_and_errors(tmp_path, rotation):
    frames = np.zeros((2, 32, 48, 3), np.uint8)
    frames[:, :8, :8] = 255  # a marker in the stored top-left corner
    path = write_mp4(str(tmp_path / "r.mp4"), frames, fps=10, rotation=rotation)
    native = video.decode_video(path, 1)
    # scaling to the display size itself is the identity: the rotation must match the native path's
    same = video.decode_video(path, 1, size=native.frames.shape[1:3])
    assert same.rotation == native.rotation == rotation
    np.testing.assert_array_equal(same.frames, native.frames)
    assert video.decode_video(path, 2, size=(20, 30)).frames.shape == (2, 20, 30, 3)
    decord = pytest.importorskip("decord")  # the original's reader turns the frames the same way
    ref = decord.VideoReader(path, height=40, width=36).get_batch([0]).asnumpy()
    assert np.abs(video.decode_video(path, 1, size=(40, 36)).frames.astype(int) - ref).max() <= 1
    with pytest.raises(ValueError, match="size or short_side"):
        video.decode_video(path, 2, size=(20, 30), short_side=16)


# ----------------------------------------------------------------------------- damaged files

def test_damaged_files_are_errors_that_say_what_was_expected(tmp_path):
    files = damaged_files(tmp_path)
    good = video.decode_video(files["good"], 8, size=(32, 32))
    assert good.num_source_frames == 132 and abs(good.duration_s - 5.28) < 0.05
    with pytest.raises(video.VideoDecodeError,
                       match=r"cut\.mp4.*truncated: decoded \d\.\d s of 5\.3 s, \d+ of 132 frames") as e:
        video.decode_video(files["cut"], 8)
    assert e.value.category == "truncated"
    with pytest.raises(video.VideoDecodeError,
                       match=r"corrupt\.mp4.*decode error mid-stream after \d\.\d s of 5\.3 s") as e:
        video.decode_video(files["corrupt"], 8, size=(32, 32))
    assert e.value.category == "corrupt"
    with pytest.raises(video.VideoDecodeError, match=r"empty\.mp4.*empty file \(0 bytes\)") as e:
        video.decode_video(files["empty"], 8)
    assert e.value.category == "empty"


@pytest.mark.parametrize("bframes", [0, 3])
def test_seeking_to_keyframes_gives_the_sequentially_decoded_frames(tmp_path, bframes):
    """decode_video seeks to the keyframe before each target when that skips frames; the frames
    must be exactly those of decoding everything in order (and decord's)."""
    import av

    path = str(tmp_path / f"gop_b{bframes}.mp4")
    w, h, n = 96, 64, 60
    with av.open(path, "w") as c:
        s = c.add_stream("libx264" if "libx264" in av.codecs_available else "h264", rate=12)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        s.options = {"g": "7", "bf": str(bframes), "preset": "veryfast"}
        for t in range(n):
            img = np.zeros((h, w, 3), np.uint8)
            img[:, :, 0] = 4 * t
            img[(t * 3) % h:(t * 3) % h + 10, (t * 5) % w:(t * 5) % w + 10] = 255
            frame = av.VideoFrame.from_ndarray(img, "rgb24")
            frame.pts = t
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    with video._open(path) as c:  # with B-frames, x264 makes non-reference pictures the decoder skips
        stream = c.streams.video[0]
        length = video._h264_length_size(stream)
        skippable = sum(video._h264_non_reference(bytes(p), length) for p in c.demux(stream) if p.size)
    assert length == 4 and (skippable >= n // 6 if bframes else skippable == 0)
    for size in (None, (40, 50)):
        for num in (3, 8, 17):
            with video._open(path) as c:
                stream = c.streams.video[0]
                pts, keyframes = video._packet_pts(path, c, stream)
            assert len(keyframes) >= n // 7
            targets = np.asarray(pts)[video.sample_by_time(pts, video._duration(pts, stream), num)]
            with video._open(path) as c:  # the plain way: decode every frame, keep the targets
                stream = c.streams.video[0]
                convert = video._NativeSize(stream) if size is None else video._ScaledInFFmpeg(stream, size)
                every = {f.pts: convert(f, 0) for f in c.decode(stream)}
            plain = np.stack([every[t] for t in targets])
            runs = []
            for kf in (keyframes, []):
                with video._open(path) as c:
                    stream = c.streams.video[0]
                    convert = video._NativeSize(stream) if size is None else video._ScaledInFFmpeg(stream, size)
                    runs.append(np.stack(video._decode_targets(path, c, stream, targets, kf, convert)[0]))
            np.testing.assert_array_equal(runs[0], plain)
            np.testing.assert_array_equal(runs[1], plain)
            decoded = video.decode_video(path, num, size=size)
            np.testing.assert_array_equal(decoded.frames, runs[0])
            levels = np.median(decoded.frames[..., 0].reshape(num, -1), axis=1)  # the marker is small
            assert np.abs(levels / 4 - decoded.indices).max() < 0.9  # neighbours are 4 levels apart
