"""VideoChat-Instruct-11K (stage 2 video instructions): `videochat_instruct_11k.json` + WebVid videos.

Entries `{"video": relative path, "QA": [{"i": instruction, "q": question, "a": answer}]}`; video file
`{video_dir}/{video}`. As Video-LLaMA's Video_Instruct_Dataset: each QA pair becomes a human turn (q)
and a gpt turn (a); "i" is not used (the reference ignores it; it is kept in meta["i"] when set);
the video goes before the first question ("<ImageHere> " + q). The reference also prefixes
"The video contains N frames sampled at ... seconds. " from the sampled frames; the record keeps
`frame_times` so the loader can build that sentence for the frames it picks.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional

from data_pipelines import records
from data_pipelines.adapters.common import expect_list, item, keyed_entries, load_json

NAME = "videochat_instruct11k"
ANNOTATION = "videochat_instruct_11k.json"


def qa_turns(qa) -> tuple:
    """VideoChat "QA" list -> (turns, joined "i" instructions, error); the video goes before the first q."""
    if not isinstance(qa, list) or not qa:
        return [], "", "no 'QA' list"
    turns, instructions = [], []
    for k, pair in enumerate(qa):
        if not isinstance(pair, dict) or not isinstance(pair.get("q"), str) or not isinstance(pair.get("a"), str):
            return [], "", f"QA[{k}] needs str 'q' and 'a'"
        turns += [{"from": "human", "value": pair["q"]}, {"from": "gpt", "value": pair["a"]}]
        if pair.get("i"):
            instructions.append(str(pair["i"]))
    if records.normalize_placeholders(" ".join(t["value"] for t in turns)).count(records.IMAGE_PLACEHOLDER):
        return [], "", "QA text already holds a media placeholder"
    turns[0]["value"] = f"{records.IMAGE_PLACEHOLDER} {turns[0]['value']}"
    return turns, "\n".join(instructions), ""


def items_from_json(json_path: str, video_dir: str) -> List[Dict]:
    entries = expect_list(load_json(json_path, "VideoChat json"), json_path, "VideoChat json")
    out = []
    for uid, entry in keyed_entries(entries, NAME, "video"):
        turns, instruction, error = qa_turns(entry.get("QA"))
        if not entry.get("video") and not error:
            error = "no 'video' field"
        out.append(item(id=uid, media="video", path=os.path.join(video_dir, str(entry.get("video", ""))),
                        kind="conversation", conversations=turns, error=error,
                        meta={"i": instruction} if instruction else {}))
    return out


def splits(source_dir: str, video_dir: Optional[str] = None) -> Dict[str, List[Dict]]:
    """`source_dir/videochat_instruct_11k.json`, videos under `video_dir` (default source_dir/videos)."""
    return {"train": items_from_json(os.path.join(source_dir, ANNOTATION),
                                     video_dir or os.path.join(source_dir, "videos"))}
