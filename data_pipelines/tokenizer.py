"""Text tokenizers: load an HF tokenizer from a local directory, or build a small LLaMA-like one.

`TextEncoder` is the only interface `prompts.py` and the loader use. It wraps an HF tokenizer the
way Video-LLaMA's datasets do: pad = unk (`tokenizer.pad_token = tokenizer.unk_token`), and the
`<ImageHere>` patch token added as a special token, so a string with N placeholders tokenizes to
N patch ids (one id past the text vocab, as the reference's `IMAGE_PATCH_TOKEN_ID`).

Exact ids depend on the tokenizer, not on this code. transformers 5 builds LLaMA tokenizers as a
`tokenizers` BPE with a Metaspace pre-tokenizer. With `legacy=False` (the default for configs that
do not say) the text after a special token (`<ImageHere>`, `<s>`, `</s>`) gets no "▁" prefix; the
slow sentencepiece tokenizer the reference ran (transformers ~4.28) prefixed every such piece. Load
Vicuna / LLaMA-2 with `load_tokenizer(path, legacy=True)` to get that behaviour back.

The demo tokenizer (`build_demo_tokenizer`) has LLaMA's layout: `<unk>`=0, `<s>`=1, `</s>`=2,
byte-fallback pieces `<0x00>`..`<0xFF>` = 3..258 (so `\\n` is 13 as in LLaMA), then BPE pieces
learned from the given texts, "▁" marking word starts. It is saved as `tokenizer.json` +
`tokenizer_config.json` (class `LlamaTokenizer`) and loads offline with `AutoTokenizer`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import string
from pathlib import Path
from typing import Any, Iterable, Sequence

from data_pipelines.records import IMAGE_PLACEHOLDER

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")
IMAGE_PATCH_TOKEN = IMAGE_PLACEHOLDER
NUM_BYTE_PIECES = 256
# Files any of which makes a directory loadable by AutoTokenizer.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "tokenizer_config.json")


class TokenizerError(ValueError):
    """A tokenizer directory is missing, incomplete or unusable."""


def load_tokenizer(path: str | os.PathLike, **kwargs: Any):
    """`AutoTokenizer.from_pretrained(path)` from local files only, with errors naming `path`.

    `kwargs` go to `from_pretrained` (e.g. `legacy=True` for reference-exact LLaMA-1/2 ids).
    """
    path = Path(path)
    if not path.is_dir():
        raise TokenizerError(f"tokenizer directory {str(path)!r} does not exist")
    present = [f for f in _TOKENIZER_FILES if (path / f).is_file()]
    if not present:
        raise TokenizerError(f"tokenizer directory {str(path)!r} has none of the files {_TOKENIZER_FILES}")
    from transformers import AutoTokenizer  # heavy import, only when a tokenizer is really loaded

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True, **kwargs)
    except Exception as e:  # transformers raises many types; all mean the same thing here
        raise TokenizerError(f"cannot load a tokenizer from {str(path)!r} (found {present}): {e}") from e


@dataclasses.dataclass
class TextEncoder:
    """Callable `encoder(text, add_bos=True, max_length=None) -> list[int]` over an HF tokenizer.

    Building one mutates `tokenizer` as the reference does: adds `<ImageHere>` (special, never
    split) and sets pad = unk when the tokenizer has no pad token.
    """
    tokenizer: Any
    bos_id: int = dataclasses.field(init=False)
    pad_id: int = dataclasses.field(init=False)
    patch_id: int = dataclasses.field(init=False)

    def __post_init__(self):
        tok = self.tokenizer
        if IMAGE_PATCH_TOKEN not in tok.get_vocab():
            tok.add_tokens([IMAGE_PATCH_TOKEN], special_tokens=True)
        if tok.pad_token is None and tok.unk_token is not None:
            tok.pad_token = tok.unk_token
        if tok.bos_token_id is None:
            raise TokenizerError(f"tokenizer {type(tok).__name__} has no bos token; Video-LLaMA prompts need one")
        self.bos_id = int(tok.bos_token_id)
        # LLaMA's pad = unk = 0; a tokenizer with neither pads with 0, which the batch masks anyway.
        self.pad_id = int(tok.pad_token_id) if tok.pad_token_id is not None else 0
        self.patch_id = int(tok.convert_tokens_to_ids(IMAGE_PATCH_TOKEN))

    def __call__(self, text: str, add_bos: bool = True, max_length: int | None = None) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=add_bos)["input_ids"]
        # Right truncation keeping BOS, as `tokenizer(..., max_length=n, truncation=True)`.
        return list(ids[:max_length] if max_length is not None else ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))


def _byte_pieces() -> list[str]:
    return [f"<0x{b:02X}>" for b in range(NUM_BYTE_PIECES)]


def save_llama_like_tokenizer(vocab: dict[str, int], merges: Sequence[tuple[str, str]],
                              out_dir: str | os.PathLike, model_max_length: int = 4096) -> Path:
    """Writes a byte-fallback BPE with LLaMA's Metaspace / BOS conventions to `out_dir`.

    `vocab` must hold SPECIAL_TOKENS at ids 0, 1, 2 and every `<0xNN>` byte piece.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    for i, tok in enumerate(SPECIAL_TOKENS):
        if vocab.get(tok) != i:
            raise TokenizerError(f"vocab must map {tok!r} to {i}, got {vocab.get(tok)}")
    missing = [p for p in _byte_pieces() if p not in vocab]
    if missing:
        raise TokenizerError(f"vocab lacks {len(missing)} byte-fallback pieces, e.g. {missing[:3]}")
    tok = Tokenizer(models.BPE(vocab=dict(vocab), merges=[tuple(m) for m in merges], unk_token="<unk>",
                               byte_fallback=True, fuse_unk=True))
    # split=False: BPE runs over the whole text as sentencepiece does; merges never join across
    # a word start because training saw words one at a time.
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None,
        "add_bos_token": True, "add_eos_token": False, "legacy": False,
        "clean_up_tokenization_spaces": False, "model_max_length": model_max_length,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    return out


def build_demo_tokenizer(texts: Iterable[str], out_dir: str | os.PathLike, vocab_size: int = 1024) -> Path:
    """Trains a small LLaMA-like BPE tokenizer on `texts` and saves it to `out_dir`.

    Printable ASCII is always in the alphabet; anything else falls back to byte pieces. The vocab
    may end up smaller than `vocab_size` when the texts run out of pairs to merge.
    """
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    base = len(SPECIAL_TOKENS) + NUM_BYTE_PIECES
    alphabet = [c for c in string.printable if not c.isspace()] + ["▁"]
    if vocab_size < base + len(alphabet):
        raise TokenizerError(f"vocab_size {vocab_size} < {base + len(alphabet)} "
                             f"(3 specials + 256 byte pieces + {len(alphabet)} ASCII pieces)")
    texts = list(texts)
    if not texts:
        raise TokenizerError("build_demo_tokenizer needs at least one training text")
    trainee = Tokenizer(models.BPE(unk_token="<unk>"))
    # Pieces never join letters to digits, punctuation or newlines (sentencepiece's script split,
    # LLaMA's single digits): without it the answer word fused with what follows ("red###",
    # "right\n###Human:"), so an answer was a different token from the same word in a sentence.
    trainee.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True),
        pre_tokenizers.Split(Regex(r"▁?[A-Za-z]+|[0-9]|\s|[^A-Za-z0-9▁\s]+|▁"), behavior="isolated")])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - NUM_BYTE_PIECES, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=alphabet, show_progress=False)
    trainee.train_from_iterator(texts, trainer)
    learned = json.loads(trainee.to_str())["model"]
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for piece in _byte_pieces():
        vocab[piece] = len(vocab)
    for piece, _ in sorted(learned["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m) if not isinstance(m, str) else tuple(m.split(" ")) for m in learned["merges"]]
    return save_llama_like_tokenizer(vocab, merges, out_dir)
