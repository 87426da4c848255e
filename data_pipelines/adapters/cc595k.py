"""LLaVA CC3M pretrain 595K (stage 1 image captions): `chat.json` + images dir.

`chat.json`: list of `{"id", "image", "conversations": [{"from": "human", "value": "<image>\\n..."},
{"from": "gpt", "value": caption}]}`; image file `{image_dir}/{image}`. Video-LLaMA trains on it as
caption data (through its cc_sbu_align reader), so the record is a caption example holding the
gpt answer; the human instruction is kept in meta["instruction"].
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional

from data_pipelines.adapters.common import entry_ids, expect_list, item, load_json

NAME = "cc595k"
ANNOTATION = "chat.json"


def _caption(entry) -> tuple:
    turns = entry.get("conversations") if isinstance(entry, dict) else None
    if not isinstance(turns, list):
        return "", "", "no 'conversations' list"
    human = [t.get("value", "") for t in turns if isinstance(t, dict) and t.get("from") == "human"]
    gpt = [t.get("value", "") for t in turns if isinstance(t, dict) and t.get("from") == "gpt"]
    if len(gpt) != 1 or not str(gpt[0]).strip():
        return "", "", f"expected exactly one non-empty gpt turn, got {len(gpt)}"
    return str(gpt[0]).strip(), str(human[0]) if human else "", ""


def items_from_json(json_path: str, image_dir: str) -> List[Dict]:
    entries = expect_list(load_json(json_path, "CC595k chat.json"), json_path, "CC595k chat.json")
    ids = entry_ids(entries, NAME, "id")
    out = []
    for uid, entry in zip(ids, entries):
        caption, instruction, error = _caption(entry)
        image = entry.get("image", "") if isinstance(entry, dict) else ""
        if not image and not error:
            error = "no 'image' field"
        out.append(item(id=uid, media="image", path=os.path.join(image_dir, image), kind="caption",
                        caption=caption, error=error, meta={"instruction": instruction}))
    return out


def splits(source_dir: str, image_dir: Optional[str] = None) -> Dict[str, List[Dict]]:
    """`source_dir/chat.json`, images in `image_dir` (default source_dir/images)."""
    return {"train": items_from_json(os.path.join(source_dir, ANNOTATION),
                                     image_dir or os.path.join(source_dir, "images"))}
