"""Damaged media the tests write themselves (imported by test modules; tests/ is on sys.path)."""
import numpy as np

from data_pipelines.media import write_mp4


def damaged_files(tmp_path, seconds=5.3, fps=25):
    """A front-indexed (faststart) clip with sound, the same cut to 30 % of its bytes, one with
    garbage over 3 KB in the middle of its media data, and a 0-byte file."""
    rng = np.random.default_rng(0)
    n = int(seconds * fps)
    frames = np.repeat(rng.integers(0, 255, (1, 48, 64, 3), dtype=np.uint8), n, axis=0)
    frames[:, :, :8] = (np.arange(n) * 255 // n)[:, None, None, None]  # a changing strip
    sound = (0.3 * np.sin(np.arange(int(5 * 16000)) * 2 * np.pi * 300 / 16000)).astype(np.float32)
    good = write_mp4(str(tmp_path / "good.mp4"), frames, fps, sound, faststart=True)
    data = open(good, "rb").read()
    assert data.find(b"moov") < data.find(b"mdat")  # front-indexed
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: int(len(data) * 0.3)])
    corrupt = bytearray(data)
    mid = len(data) // 2
    corrupt[mid: mid + 3000] = np.random.default_rng(1).bytes(3000)
    (tmp_path / "corrupt.mp4").write_bytes(bytes(corrupt))
    (tmp_path / "empty.mp4").write_bytes(b"")
    return {"good": good, "cut": str(cut), "corrupt": str(tmp_path / "corrupt.mp4"),
            "empty": str(tmp_path / "empty.mp4")}
