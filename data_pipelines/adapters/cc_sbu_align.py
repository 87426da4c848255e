"""MiniGPT-4 `cc_sbu_align` (3.5K curated image descriptions): `filter_cap.json` + `image/`.

`filter_cap.json`: `{"annotations": [{"image_id": str, "caption": str}]}`; image file
`image/{image_id}.jpg` (as Video-LLaMA's CCSBUAlignDataset reads it).
"""
from __future__ import annotations

import os
from typing import Dict, List

from data_pipelines.adapters.common import expect_list, item, keyed_entries, load_json

NAME = "cc_sbu_align"
ANNOTATION = "filter_cap.json"


def items_from_dir(source_dir: str) -> List[Dict]:
    path = os.path.join(source_dir, ANNOTATION)
    data = load_json(path, "cc_sbu_align filter_cap.json")
    if not isinstance(data, dict) or "annotations" not in data:
        raise ValueError(f"cc_sbu_align: {path!r} must be {{'annotations': [...]}}, got keys "
                         f"{list(data)[:5] if isinstance(data, dict) else type(data).__name__}")
    entries = expect_list(data["annotations"], path, "cc_sbu_align annotations")
    out = []
    for uid, entry in keyed_entries(entries, NAME, "image_id"):
        image_id, caption = str(entry.get("image_id", "")), str(entry.get("caption", "")).strip()
        error = "" if image_id and caption else "entry needs non-empty 'image_id' and 'caption'"
        out.append(item(id=uid, media="image", path=os.path.join(source_dir, "image", f"{image_id}.jpg"),
                        kind="caption", caption=caption, error=error))
    return out


def splits(source_dir: str) -> Dict[str, List[Dict]]:
    return {"train": items_from_dir(source_dir)}
