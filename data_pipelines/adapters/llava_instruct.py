"""LLaVA-Instruct-150K (stage 2 image instructions): `llava_instruct_150k.json` + COCO images.

Entries `{"id", "image": "000000033471.jpg", "conversations": [{"from": "human"|"gpt", "value"}]}`.
Video-LLaMA opens `{vis_root}/COCO_train2014_{image}`; COCO 2017 folders use the bare name. Both are
tried, bare name first. `<image>` becomes `<ImageHere>` where the source put it.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional

from data_pipelines import records
from data_pipelines.adapters.common import expect_list, item, keyed_entries, load_json

NAME = "llava_instruct150k"
ANNOTATION = "llava_instruct_150k.json"
COCO2014_PREFIX = "COCO_train2014_"


def image_path(image_dir: str, image: str) -> str:
    bare = os.path.join(image_dir, image)
    prefixed = os.path.join(image_dir, COCO2014_PREFIX + image)
    return prefixed if not os.path.exists(bare) and os.path.exists(prefixed) else bare


def conversation_error(turns) -> str:
    if not isinstance(turns, list) or not turns:
        return "no 'conversations' list"
    for i, t in enumerate(turns):
        if not isinstance(t, dict) or t.get("from") not in ("human", "gpt") or not isinstance(t.get("value"), str):
            return f"conversations[{i}] is not {{'from': 'human'|'gpt', 'value': str}}"
        if t["from"] != ("human", "gpt")[i % 2]:
            return f"conversations[{i}] is from {t['from']!r}; turns must alternate human, gpt"
    values = [records.normalize_placeholders(t["value"]) for t in turns]
    counts = [v.count(records.IMAGE_PLACEHOLDER) for v in values]
    if counts[0] != 1 or sum(counts) != 1:
        return f"expected one <image> placeholder, in the first turn; found per turn {counts}"
    return ""


def items_from_json(json_path: str, image_dir: str) -> List[Dict]:
    entries = expect_list(load_json(json_path, "LLaVA instruct json"), json_path, "LLaVA instruct json")
    out = []
    for uid, entry in keyed_entries(entries, NAME, "id"):
        turns = entry.get("conversations")
        error = conversation_error(turns) or ("" if entry.get("image") else "no 'image' field")
        out.append(item(id=uid, media="image", path=image_path(image_dir, str(entry.get("image", ""))),
                        kind="conversation", conversations=[] if error else turns, error=error))
    return out


def splits(source_dir: str, image_dir: Optional[str] = None) -> Dict[str, List[Dict]]:
    """`source_dir/llava_instruct_150k.json`, images in `image_dir` (default source_dir/train2014)."""
    return {"train": items_from_json(os.path.join(source_dir, ANNOTATION),
                                     image_dir or os.path.join(source_dir, "train2014"))}
