"""README "Train on your own videos": its walk-through block, run as written on generated clips.

The commands live only in README.md (between the own-videos-walkthrough markers); this test
extracts that block and runs it with bash in a directory holding a generated `my_videos/`.
"""
import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_pipelines.media import write_image, write_mp4

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCK = re.compile(r"<!-- own-videos-walkthrough:begin -->\s*```bash\n(.*?)```\s*<!-- own-videos-walkthrough:end -->",
                   re.S)
CLIPS = {"beach.mp4": ("waves roll onto a sandy beach", 300), "trips/hike.mp4": ("two people walk up a hill", 500),
         "city.mp4": ("cars drive through a city at night", 700), "dog.mp4": ("a dog runs after a ball", 900),
         "kitchen.mp4": ("someone chops vegetables in a kitchen", 1100), "rain.mp4": ("rain falls on a window", 0)}


def walkthrough() -> str:
    found = BLOCK.findall(README.read_text(encoding="utf-8"))
    assert len(found) == 1, "README.md must hold one own-videos-walkthrough bash block"
    return found[0]


def make_my_videos(root: Path) -> None:
    """A few short clips (one silent), an image, captions.csv and LLaVA + VideoChat instructions."""
    rng = np.random.default_rng(0)
    d = root / "my_videos"
    for k, (name, (_, hz)) in enumerate(CLIPS.items()):
        frames = np.repeat(rng.integers(0, 255, (1, 32, 48, 3), dtype=np.uint8), 8, axis=0)
        frames[:, :, : 4 + 4 * k] = (np.arange(8) * 30)[:, None, None, None]
        tone = (0.3 * np.sin(2 * np.pi * hz * np.arange(32000) / 16000)).astype(np.float32) if hz else None
        write_mp4(str(d / name), frames, 4, tone, 16000)
    write_image(str(d / "cat.jpg"), rng.integers(0, 255, (32, 48, 3), dtype=np.uint8))
    with open(d / "captions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "caption"])
        w.writerows([(name, caption) for name, (caption, _) in CLIPS.items()] + [("cat.jpg", "a cat on a sofa")])
    conversations = [{"video": name, "conversations": [{"from": "human", "value": "<video>\nWhat happens here?"},
                                                       {"from": "gpt", "value": caption.capitalize() + "."}]}
                     for name, (caption, _) in CLIPS.items()]
    conversations.append({"video": "beach.mp4", "QA": [{"q": "Is it sunny?", "a": "Yes."}]})
    conversations.append({"image": "cat.jpg", "conversations": [{"from": "human", "value": "<image> Which animal?"},
                                                                {"from": "gpt", "value": "A cat."}]})
    (d / "instructions.json").write_text(json.dumps(conversations, indent=1))


def test_walkthrough_block_is_in_the_readme():
    script = walkthrough()
    for command in ("vllama-prepare-data folder", "vllama-train", "vllama-chat"):
        assert command in script


def test_readme_walkthrough_runs_as_written(tmp_path):
    """Folder -> shards -> stage 1 -> stage 2 -> vllama-chat, exactly the README's commands."""
    make_my_videos(tmp_path)
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
               XLA_FLAGS="", JAX_PLATFORMS="cpu")
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", walkthrough()], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    for name, n in (("my_captions", 7), ("my_instructions", 8)):
        report = json.loads((tmp_path / f"my_run/data/{name}/1.0.0/{name}-train.report.json").read_text())
        assert (report["num_written"], report["num_skipped"]) == (n, 0), report
    assert "my_captions/train: wrote 7 of 7 items" in out
    for stage in ("stage1", "stage2"):
        assert any((tmp_path / "my_run" / stage / "checkpoints").iterdir()), f"{stage} saved no checkpoint"
    answers = [line for line in proc.stdout.splitlines() if line.startswith("Assistant:")]
    assert len(answers) == 1 and "error:" not in proc.stdout, proc.stdout[-3000:]
