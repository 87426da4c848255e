"""WebVid-2M (stage 1 video captions): `results_2M_train.csv` / `results_2M_val.csv` + videos.

CSV columns `videoid,contentUrl,duration,page_dir,name`; video file `{video_dir}/{page_dir}/{videoid}.mp4`
(the layout of the WebVid download script, read the same way by Video-LLaMA's WebvidDataset).
The caption is `name.strip()`; BLIP-style caption cleaning is left to the loader (text side).
"""
from __future__ import annotations

import csv
import os
from typing import Dict, List, Optional

from data_pipelines.adapters.common import item

NAME = "webvid2m"
COLUMNS = ("videoid", "contentUrl", "duration", "page_dir", "name")
SPLIT_FILES = {"train": "results_2M_train.csv", "validation": "results_2M_val.csv"}


def items_from_csv(csv_path: str, video_dir: str) -> List[Dict]:
    if not os.path.exists(csv_path):
        raise FileNotFoundError(f"WebVid csv: {csv_path!r} does not exist")
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in ("videoid", "page_dir", "name") if c not in (reader.fieldnames or ())]
        if missing:
            raise ValueError(f"WebVid csv {csv_path!r}: missing columns {missing}; header is {reader.fieldnames}, "
                             f"expected {','.join(COLUMNS)}")
        out = []
        for line, row in enumerate(reader, start=2):
            vid, page, name = (row.get(k) or "" for k in ("videoid", "page_dir", "name"))
            error = "" if vid and page and name.strip() else f"{csv_path}:{line}: empty videoid/page_dir/name"
            out.append(item(id=f"{NAME}/{vid or 'line' + str(line)}", media="video",
                            path=os.path.join(video_dir, page, f"{vid}.mp4"), kind="caption",
                            caption=name.strip(), error=error,
                            meta={"duration": row.get("duration") or "", "page_dir": page}))
    return out


def splits(source_dir: str, video_dir: Optional[str] = None) -> Dict[str, List[Dict]]:
    """Every split whose csv is in `source_dir`; videos under `video_dir` (default source_dir/videos)."""
    video_dir = video_dir or os.path.join(source_dir, "videos")
    found = {s: os.path.join(source_dir, f) for s, f in SPLIT_FILES.items()
             if os.path.exists(os.path.join(source_dir, f))}
    if not found:
        raise FileNotFoundError(f"WebVid: none of {list(SPLIT_FILES.values())} in {source_dir!r}")
    return {s: items_from_csv(p, video_dir) for s, p in found.items()}
