"""TextTokenizer: fixed-length [CLS] ... [SEP] [PAD] ids with a True-at-padding mask; load_tokenizer errors."""

import pickle

import pytest
import torch

from evlp.data.synthetic import write_vocab
from evlp.data.tokenizer import TextTokenizer, load_tokenizer
from evlp.errors import EvlpError


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return TextTokenizer(load_tokenizer(write_vocab(tmp_path_factory.mktemp("vocab"))), max_len=12)


def test_shapes_padding_and_special_tokens(tokenizer):
    hf = tokenizer.tokenizer
    ids, mask = tokenizer(["Two small red circles.", "a star"])
    assert ids.shape == mask.shape == (2, 12) and ids.dtype == torch.long and mask.dtype == torch.bool
    assert ids[0].tolist()[:7] == [hf.cls_token_id, *hf.convert_tokens_to_ids(["two", "small", "red", "circles", "."]),
                                   hf.sep_token_id]  # fmt: skip
    assert mask[0].tolist() == [False] * 7 + [True] * 5
    assert (ids[mask] == 0).all() and tokenizer.pad_id == 0  # [PAD] is id 0
    assert mask[1].sum() == 12 - 4


def test_truncation_keeps_cls_and_sep(tokenizer):
    hf = tokenizer.tokenizer
    ids, mask = tokenizer(["one two three " * 10])
    assert ids.shape == (1, 12) and not mask.any()
    assert ids[0, 0] == hf.cls_token_id and ids[0, -1] == hf.sep_token_id


def test_empty_caption_and_empty_batch(tokenizer):
    hf = tokenizer.tokenizer
    ids, mask = tokenizer([""])
    assert ids[0, :2].tolist() == [hf.cls_token_id, hf.sep_token_id] and mask[0].sum() == 10
    ids, mask = tokenizer([])
    assert ids.shape == (0, 12) and mask.dtype == torch.bool
    with pytest.raises(TypeError):
        tokenizer("not a list")


def test_picklable_for_workers(tokenizer):
    clone = pickle.loads(pickle.dumps(tokenizer))
    texts = ["three big blue stars at the top"]
    assert all(torch.equal(a, b) for a, b in zip(clone(texts), tokenizer(texts)))


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(EvlpError, match="not found"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(EvlpError, match="not a tokenizer folder"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(EvlpError) as err:
        load_tokenizer(tmp_path)
    assert "\n" not in str(err.value)
