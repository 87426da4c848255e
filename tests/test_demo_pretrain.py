"""The demo's tower pretraining pieces: the packed LM corpus, the caption heads' loss."""
import jax.numpy as jnp
import numpy as np
import pytest

from data_pipelines.tokenizer import build_demo_tokenizer, load_tokenizer
from vllama_jax.demo import pretrain


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    texts = ["a red circle moving left", "What colour is the object? red", "a low tone beeps slowly"] * 20
    return load_tokenizer(build_demo_tokenizer(texts, tmp_path_factory.mktemp("tok"), vocab_size=400))


def test_corpus_packs_each_group_apart(tok):
    groups = [["a red circle moving left", "What colour is the object? red"], ["a low tone beeps slowly"],
              ["a red circle"] * 6]
    lengths = [[len(tok(t)["input_ids"]) for t in g] for g in groups]
    corpus = pretrain.tokenize_corpus(groups, tok, max_len=sum(lengths[2][:4]))
    ids, mask, loss = corpus["input_ids"], corpus["attention_mask"], corpus["loss_mask"]
    # Group 0 in one row, group 1 in its own, group 2 split at a text boundary over two rows.
    assert mask.sum(1).tolist() == [sum(lengths[0]), sum(lengths[1]), sum(lengths[2][:4]), sum(lengths[2][4:])]
    assert ids.shape[1] % 8 == 0 or ids.shape[1] == sum(lengths[2][:4])
    row0 = [t for t in ids[0][: mask[0].sum()]]
    assert row0 == tok(groups[0][0])["input_ids"] + tok(groups[0][1])["input_ids"]
    # Every real token is a target but each text's BOS (nothing predicts where a text starts).
    assert np.array_equal(loss, mask * (ids != tok.bos_token_id))
    assert (ids[mask > 0] == tok.bos_token_id).sum() == sum(map(len, groups))
    with pytest.raises(ValueError, match="tokens > max_len 4"):
        pretrain.tokenize_corpus(groups, tok, max_len=4)


def test_caption_loss_scores_every_frame():
    labels = np.array([[1, 2], [3, 0]], np.int32)
    bag = jnp.zeros((2, 5)), np.zeros((2, 5), np.float32)
    clip = jnp.asarray(np.eye(4)[labels[:, 0]] * 50.0)               # right for both clips
    frames = np.zeros((2, 3, 4))
    frames[:, :, :] = np.eye(4)[labels[:, 1]][:, None] * 50.0          # right on every frame ...
    frames[1, 2] = np.eye(4)[1] * 50.0                                # ... but one
    loss, metrics = pretrain.caption_loss((bag[0], (clip, jnp.asarray(frames))), {"bag": bag[1], "labels": labels},
                                          bag_weight=0.0)
    assert float(metrics["acc0"]) == 1.0 and float(metrics["acc1"]) == pytest.approx(5 / 6)
    assert float(loss) == pytest.approx(50.0 / 6, rel=1e-3)         # one frame of six off by 50 nats
    outputs, batch = (bag[0], (clip, jnp.asarray(frames))), {"bag": bag[1], "labels": labels}
    weighted, _ = pretrain.caption_loss(outputs, batch, bag_weight=0.0, attribute_weights=(1.0, 0.1))
    assert float(weighted) == pytest.approx(5.0 / 6, rel=1e-3)      # the frame head's loss a tenth
    with pytest.raises(ValueError, match="1 weights for 2 attributes"):
        pretrain.caption_loss(outputs, batch, bag_weight=0.0, attribute_weights=(1.0,))


def test_attribute_labels_name_the_bad_example():
    attributes = {"colour": ("red", "green"), "pitch": ("low", "high")}
    labels = pretrain.attribute_labels([{"colour": "green", "pitch": "low"}, {"colour": "red", "pitch": "high"}],
                                       attributes)
    assert labels.tolist() == [[1, 0], [0, 1]]
    with pytest.raises(ValueError, match=r"example 1: attribute 'pitch' is 'purple', expected one of"):
        pretrain.attribute_labels([{"colour": "red", "pitch": "low"}, {"colour": "red", "pitch": "purple"}], attributes)
    with pytest.raises(ValueError, match=r"example 0: attribute 'colour' is None"):
        pretrain.attribute_labels([{"pitch": "low"}], attributes)
