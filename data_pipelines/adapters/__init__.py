"""Dataset adapters: each turns a public dataset's own files into writer items.

Every adapter module has NAME and `splits(source_dir, **paths) -> {split: [item, ...]}`; items are
decoded into records by `common.build_example`.
"""
from data_pipelines.adapters import cc595k, cc_sbu_align, llava_instruct, videochat, webvid

ADAPTERS = {m.NAME: m for m in (webvid, cc595k, cc_sbu_align, llava_instruct, videochat)}
