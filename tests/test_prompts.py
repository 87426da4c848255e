"""Exact ids / targets of the four Video-LLaMA prompt styles, built by hand.

The tokenizer here is hand-made so every expected id can be written down: LLaMA's layout
(<unk>=0, <s>=1, </s>=2, byte pieces 3..258 so "\\n" -> <0x0A> = 13), one piece per printable
ASCII char, "▁" for a space, and the only merges "▁"+letter (sentencepiece's "space joins the next
word" property, which is what makes the reference's length arithmetic drift). `<ImageHere>` is
added as a special token by `TextEncoder`, as the reference does.
"""
import string

import numpy as np
import pytest

from data_pipelines import prompts
from data_pipelines.tokenizer import (TextEncoder, TokenizerError, build_demo_tokenizer, load_tokenizer,
                                      save_llama_like_tokenizer)

N = 2  # media tokens per example in these tests
X = -100


@pytest.fixture(scope="module")
def char_tok(tmp_path_factory):
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    vocab["▁"] = len(vocab)
    for c in string.printable:
        if not c.isspace():
            vocab[c] = len(vocab)
    merges = []
    for c in string.ascii_letters:
        vocab["▁" + c] = len(vocab)
        merges.append(("▁", c))
    out = save_llama_like_tokenizer(vocab, merges, tmp_path_factory.mktemp("char_tok"))
    return TextEncoder(load_tokenizer(out))


def T(enc, spec):
    """Ids of space-separated pieces; 'NL' is the <0x0A> byte piece, 'P' the patch token."""
    names = {"NL": "<0x0A>", "P": "<ImageHere>"}
    return enc.tokenizer.convert_tokens_to_ids([names.get(p, p) for p in spec.split()])


def test_char_tokenizer_layout(char_tok):
    assert (char_tok.bos_id, char_tok.pad_id) == (1, 0)
    assert char_tok.patch_id == len(char_tok.tokenizer) - 1  # added past the text vocab
    assert char_tok("Hi\n") == [1, *T(char_tok, "▁H i NL")]
    assert T(char_tok, "NL") == [13]


def test_caption_stage1_exact(char_tok):
    # stage 1: no prompt, end_sym "\n", blip-processed caption "A dog runs." -> "a dog runs"
    cap = prompts.blip_caption("A dog runs.")
    assert cap == "a dog runs"
    ids, tg = prompts.tokenize_caption(cap, char_tok, N, prompt=None, end_sym="\n", max_txt_len=32)
    text = T(char_tok, "▁a ▁d o g ▁r u n s NL")
    assert ids == [1, *T(char_tok, "P P"), *text]
    assert tg == [X, X, X, *text]
    # max_txt_len counts caption tokens only (the "\n" is cut first)
    ids, tg = prompts.tokenize_caption(cap, char_tok, N, prompt=None, end_sym="\n", max_txt_len=4)
    assert ids == [1, *T(char_tok, "P P"), *text[:4]] and tg == [X, X, X, *text[:4]]


def test_caption_stage2_prompt_exact(char_tok):
    prompt = prompts.VICUNA_CAPTION_TEMPLATE.format("<Image><ImageHere></Image> Describe.")
    assert prompt == "###Human: <Image><ImageHere></Image> Describe. ###Assistant: "
    ids, tg = prompts.tokenize_caption("a cat", char_tok, N, prompt=prompt, end_sym="###", max_txt_len=320)
    # p_before / p_after / caption are tokenized separately, none with BOS, each with its own "▁"
    before = T(char_tok, "▁ # # # H u m a n : ▁ < I m a g e >")
    after = T(char_tok, "▁ < / I m a g e > ▁D e s c r i b e . ▁ # # # A s s i s t a n t : ▁")
    text = T(char_tok, "▁a ▁c a t # # #")
    assert ids == [1, *before, *T(char_tok, "P P"), *after, *text]
    assert tg == [X] * (1 + len(before) + N + len(after)) + text


def test_vicuna_single_turn_exact(char_tok):
    turns = prompts.insert_media([{"from": "human", "value": "<ImageHere>\nHi"}, {"from": "gpt", "value": "Yo"}],
                                 "image", N)
    assert turns[0]["value"] == "<Image><ImageHere><ImageHere></Image>\nHi"
    ids, tg = prompts.tokenize_vicuna(turns, char_tok)
    full = ("<s> ▁ NL NL "                                            # 0..3   header "\n\n"
            "# # # H u m a n : ▁ < I m a g e > P P < / I m a g e > NL H i NL "  # 4..34  human turn
            "# # # A s s i s t a n t : ▁Y o NL "                      # 35..50 assistant turn
            "# # #")                                                   # 51..53
    assert ids == T(char_tok, full)
    # lengths tokenized alone (with BOS and a "▁"): header 4, human 33, assistant 18.
    # mask [:4]; human: [4+2 : 4+33] = [6:37]; assistant kept; cursor drifts 2 per piece.
    expected = list(ids)
    expected[0:4] = [X] * 4
    expected[6:37] = [X] * 31
    assert tg == expected
    assert [i for i, t in enumerate(tg) if t != X] == [4, 5] + list(range(37, 54))


def test_vicuna_multi_turn_exact(char_tok):
    turns = [{"from": "human", "value": "A?"}, {"from": "gpt", "value": "B"},
             {"from": "human", "value": "C?"}, {"from": "gpt", "value": "D"}]
    ids, tg = prompts.tokenize_vicuna(turns, char_tok)
    full = ("<s> ▁ NL NL "                          # 0..3
            "# # # H u m a n : ▁A ? NL "            # 4..15   (alone, with <s> ▁: 14)
            "# # # A s s i s t a n t : ▁B NL "      # 16..30  (alone: 17)
            "# # # H u m a n : ▁C ? NL "            # 31..42  (alone: 14)
            "# # # A s s i s t a n t : ▁D NL "      # 43..57  (alone: 17)
            "# # #")                                # 58..60
    assert ids == T(char_tok, full)
    # cursor: 4 -> mask [6:18] -> 18 -> 35 -> mask [37:49] -> 49 -> 66
    keep = [4, 5] + list(range(18, 37)) + list(range(49, 61))
    assert [i for i, t in enumerate(tg) if t != X] == keep
    assert all(tg[i] == ids[i] for i in keep)


LLAMA2_HEAD = "▁ [ I N S T ] ▁ < < S Y S > > NL ▁ NL < < / S Y S > > NL NL"



def test_vicuna_aligned_targets_have_no_drift(char_tok):
    """The same rule as the reference (header masked, every human turn masked but its first 2
    positions) with each piece's length in the conversation: every answer is a target."""
    turns = [{"from": "human", "value": "A?"}, {"from": "gpt", "value": "B"},
             {"from": "human", "value": "C?"}, {"from": "gpt", "value": "D"}]
    ids, tg = prompts.tokenize_vicuna(turns, char_tok, aligned=True)
    assert ids == prompts.tokenize_vicuna(turns, char_tok)[0]
    # in context: header 0..3, human 4..15, assistant 16..30, human 31..42, assistant 43..57, ### 58..60
    keep = [4, 5] + list(range(16, 33)) + list(range(43, 61))
    assert [i for i, t in enumerate(tg) if t != X] == keep
    assert all(tg[i] == ids[i] for i in keep)
    assert prompts.tokenize_conversation(turns, char_tok, "vicuna", aligned=True) == (ids, tg)

def test_llama2_single_turn_exact(char_tok):
    turns = prompts.insert_media([{"from": "human", "value": "<ImageHere> Hi"}, {"from": "gpt", "value": "Yo"}],
                                 "image", N)
    text = prompts.llama2_text(turns)
    assert text == ("[INST] <<SYS>>\n \n<</SYS>>\n\n<Image><ImageHere><ImageHere></Image> Hi [/INST] Yo </s>")
    ids, tg = prompts.tokenize_llama2(turns, char_tok)
    instr = f"{LLAMA2_HEAD} < I m a g e > P P < / I m a g e > ▁H i ▁ [ / I N S T ]"
    answer = "▁Y o ▁ </s>"
    assert ids == [1, *T(char_tok, instr), *T(char_tok, answer)]
    n_instr = len(T(char_tok, instr))
    # instruction_len = len(<s> + instr + trailing "▁") - 2 = n_instr: exactly the instruction
    assert tg == [X] * (1 + n_instr) + T(char_tok, answer)


def test_llama2_multi_turn_exact(char_tok):
    turns = [{"from": "human", "value": "A?"}, {"from": "gpt", "value": "B"},
             {"from": "human", "value": "C?"}, {"from": "gpt", "value": "D"}]
    text = prompts.llama2_text(turns)
    assert text == "[INST] <<SYS>>\n \n<</SYS>>\n\nA? [/INST] B </s><s>[INST] C? [/INST] D </s>"
    ids, tg = prompts.tokenize_llama2(turns, char_tok)
    instr1 = T(char_tok, f"{LLAMA2_HEAD} A ? ▁ [ / I N S T ]")
    ans1 = T(char_tok, "▁B ▁ </s>")
    # after the special "<s>" the text gets no "▁" prefix (transformers 5, legacy=False)
    instr2 = T(char_tok, "<s> [ I N S T ] ▁C ? ▁ [ / I N S T ]")
    ans2 = T(char_tok, "▁D ▁ </s>")
    assert ids == [1, *instr1, *ans1, *instr2, *ans2]
    assert tg == [X] * (1 + len(instr1)) + ans1 + [X] * len(instr2) + ans2


def test_llama2_rejects_non_alternating(char_tok):
    turns = [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}]
    with pytest.raises(prompts.PromptError, match="rec7.*turn 1.*alternating"):
        prompts.tokenize_llama2(turns, char_tok, where="rec7")


def test_video_insert_media_prepends_wrapper_and_time_message():
    msg = prompts.video_time_message(np.array([0.0, 1.25, 2.5], np.float32))
    assert msg == "The video contains 3 frames sampled at 0.0, 1.2, 2.5 seconds. "
    turns = prompts.insert_media([{"from": "human", "value": "<ImageHere>\nWhat?"}, {"from": "gpt", "value": "x"}],
                                 "video", 2, msg)
    assert turns[0]["value"] == "<Video><ImageHere><ImageHere></Video> " + msg + "What?"
    with pytest.raises(prompts.PromptError, match="2 <ImageHere>"):
        prompts.insert_media([{"from": "human", "value": "<ImageHere><ImageHere>"}], "image", 2, where="r")


def test_pack_example_masks_media_and_padding(char_tok):
    ids, tg = prompts.tokenize_caption("a cat", char_tok, N, end_sym="\n")
    row = prompts.pack_example(ids, tg, char_tok.patch_id, char_tok.pad_id, seq_len=12, num_media_tokens=N)
    n = len(ids)
    assert row["input_ids"].dtype == np.int32 and row["input_ids"].shape == (12,)
    assert row["media_mask"].tolist() == [False, True, True] + [False] * 9
    assert row["input_ids"][1:3].tolist() == [0, 0]
    assert row["attention_mask"].tolist() == [1] * n + [0] * (12 - n)
    assert (row["targets"][n:] == X).all() and (row["targets"][:3] == X).all()
    with pytest.raises(prompts.PromptError, match="1 media tokens in the first 2 positions"):
        prompts.pack_example(ids, tg, char_tok.patch_id, char_tok.pad_id, seq_len=2, num_media_tokens=N)


def test_blip_caption_word_limit():
    assert prompts.blip_caption("Hello, World!!  Foo:bar ") == "hello, world foo bar"
    assert prompts.blip_caption(" ".join(["w"] * 60)) == " ".join(["w"] * 50)


def test_demo_tokenizer_roundtrip(tmp_path):
    texts = ["a red ball bounces on the floor", "Describe this image in detail."] * 10
    out = build_demo_tokenizer(texts, tmp_path / "tok", vocab_size=400)
    tok = load_tokenizer(out)
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.convert_tokens_to_ids("<0x0A>") == 13
    ids = tok("a red ball\né 😀")["input_ids"]
    assert ids[0] == 1 and tok.convert_ids_to_tokens(ids[1:3]) == ["▁a", "▁red"]
    assert tok.decode(ids, skip_special_tokens=True) == "a red ball\né 😀"  # byte fallback


def test_demo_tokenizer_keeps_words_apart_from_punctuation(tmp_path):
    # Trained on text where a word is always followed by the same punctuation, BPE would fuse
    # them ("red###"); the answer word must be the same token as the word in a sentence.
    texts = ["###Human: What colour?\n###Assistant: red###", "a red ball 12.5 seconds"] * 50
    tok = load_tokenizer(build_demo_tokenizer(texts, tmp_path / "tok", vocab_size=500))
    pieces = tok.tokenize(texts[0])
    assert "▁red" in pieces and "###" in pieces
    assert all(not (any(c.isalpha() for c in p) and any(c in "#:?\n" or c.isdigit() for c in p)) for p in pieces), pieces
    assert tok.tokenize("12.5") == ["▁", "1", "2", ".", "5"]


def test_tokenizer_errors(tmp_path):
    with pytest.raises(TokenizerError, match="nope.*does not exist"):
        load_tokenizer(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenizerError, match="empty.*has none of the files"):
        load_tokenizer(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="bad"):
        load_tokenizer(bad)


def test_vicuna_aligned_targets_refuse_a_tokenizer_that_merges_across_turns():
    class Merging:
        bos_id, pad_id, patch_id = 1, 0, 2

        def __call__(self, text, add_bos=True, max_length=None):
            ids, i = [1] if add_bos else [], 0
            while i < len(text):     # "\n#" is one token: the boundary after a turn's "\n" splits it
                step = 2 if text[i:i + 2] == "\n#" else 1
                ids.append(10 + sum(map(ord, text[i:i + step])))
                i += step
            return ids

    turns = [{"from": "human", "value": "A?"}, {"from": "gpt", "value": "B"}]
    prompts.tokenize_vicuna(turns, Merging())          # the reference's rule does not need the split
    with pytest.raises(prompts.PromptError, match="merges tokens across a turn boundary"):
        prompts.tokenize_vicuna(turns, Merging(), aligned=True)
