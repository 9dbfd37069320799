"""GLUE fine-tuning: the nine configs train from the toy pretraining checkpoint on tiny GLUE fixtures laid out as the
hub's data saved with ``save_to_disk``; corpus-level metrics equal scikit-learn's and SciPy's; STS-B labels stay
floats; input errors are one-line EvlpErrors before any training; ``evlp finetune`` and ``evlp sweep glue``."""

from __future__ import annotations

import json
import random
import shutil

import numpy as np
import pytest
import torch

from evlp.config import load_config
from evlp.errors import EvlpError
from evlp.eval import glue_metrics as gm
from evlp.finetune import glue
from evlp.finetune.runner import run_finetune
from tests.api_support import toy_run  # noqa: F401
from tests.needs import need_module

datasets = need_module("datasets", module_level=True)
datasets.disable_progress_bars()
sklearn_metrics = need_module("sklearn.metrics", module_level=True)
stats = need_module("scipy.stats", module_level=True)

CONFIGS = {"cola": "cola", "mnli": "mnli", "mrpc": "mrpc", "qnli": "qnli", "qqp": "qqp", "rte": "rte",
           "sst": "sst2", "stsb": "stsb", "wnli": "wnli"}
# The hub's columns and label names (nyu-mll/glue).
COLUMNS = {"cola": ("sentence",), "sst2": ("sentence",), "mrpc": ("sentence1", "sentence2"),
           "qqp": ("question1", "question2"), "stsb": ("sentence1", "sentence2"), "mnli": ("premise", "hypothesis"),
           "qnli": ("question", "sentence"), "rte": ("sentence1", "sentence2"), "wnli": ("sentence1", "sentence2")}
LABELS = {"cola": ["unacceptable", "acceptable"], "sst2": ["negative", "positive"],
          "mrpc": ["not_equivalent", "equivalent"], "qqp": ["not_duplicate", "duplicate"],
          "mnli": ["entailment", "neutral", "contradiction"], "qnli": ["entailment", "not_entailment"],
          "rte": ["entailment", "not_entailment"], "wnli": ["not_entailment", "entailment"]}
SPLITS = {"mnli": ("train", "validation_matched", "validation_mismatched", "test_matched", "test_mismatched")}
FAST = ["data.batch_size=4", "data.eval_batch_size=8", "data.num_workers=0", "data.limit_train_samples=8",
        "data.download=false", "trainer.max_steps=2", "trainer.max_epochs=1", "trainer.accelerator=cpu",
        "trainer.devices=1", "trainer.log_every_n_steps=1", "trainer.progress_bar=false"]


def toy_words() -> list[str]:
    from evlp.data.synthetic import SPECIAL_TOKENS, vocabulary

    return [w for w in vocabulary() if w not in SPECIAL_TOKENS and len(w) > 2 and w.isalpha()]


def make_glue_task(root, task: str, sizes=None, seed: int = 0, drop_split: str | None = None):
    """``root/glue/<task>`` as ``evlp download glue`` writes it: the hub's splits, columns and features; test labels
    hidden (-1). Some pairs are long enough to be truncated to the toy tower's 32 positions."""
    rng = random.Random(seed)
    words = toy_words()
    regression = task == "stsb"
    label = datasets.Value("float32") if regression else datasets.ClassLabel(names=LABELS[task])
    features = datasets.Features({**{c: datasets.Value("string") for c in COLUMNS[task]}, "label": label,
                                  "idx": datasets.Value("int32")})
    splits = {}
    for split in SPLITS.get(task, ("train", "validation", "test")):
        n = (sizes or {}).get(split, 16 if split == "train" else 12)
        rows = {c: [" ".join(rng.choices(words, k=rng.choice([3, 6, 20]))) for _ in range(n)] for c in COLUMNS[task]}
        if split.startswith("test"):
            rows["label"] = [-1.0 if regression else -1] * n
        elif regression:
            rows["label"] = [round(rng.uniform(0, 5), 3) for _ in range(n)]
        else:
            rows["label"] = [i % len(LABELS[task]) for i in range(n)]
        rows["idx"] = list(range(n))
        if split != drop_split:
            splits[split] = datasets.Dataset.from_dict(rows, features=features)
    datasets.DatasetDict(splits).save_to_disk(str(root / "glue" / task))
    return root / "glue" / task


@pytest.fixture(scope="module")
def glue_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("glue_data")
    for i, task in enumerate(CONFIGS.values()):
        make_glue_task(root, task, seed=i)
    return root


def overrides(base, checkpoint, data_path, *extra):
    return [f"base_dir={base}", f"model.model_path={checkpoint}", f"data_path={data_path}", *FAST, *extra]


# ---------------------------------------------------------------------------------------------------------------
# Metrics


def test_metrics_equal_scikit_learn_and_scipy():
    rng = np.random.default_rng(0)
    y, p = rng.integers(0, 2, 101), rng.integers(0, 2, 101)
    assert gm.accuracy(p, y) == pytest.approx(100 * sklearn_metrics.accuracy_score(y, p))
    assert gm.f1(p, y) == pytest.approx(100 * sklearn_metrics.f1_score(y, p))
    assert gm.matthews_corrcoef(p, y) == pytest.approx(100 * sklearn_metrics.matthews_corrcoef(y, p))
    y3, p3 = rng.integers(0, 3, 90), rng.integers(0, 3, 90)  # MNLI-like: the multi-class MCC and accuracy
    assert gm.matthews_corrcoef(p3, y3) == pytest.approx(100 * sklearn_metrics.matthews_corrcoef(y3, p3))
    assert gm.accuracy(p3, y3) == pytest.approx(100 * sklearn_metrics.accuracy_score(y3, p3))
    scores = rng.uniform(0, 5, 80).round(1)  # rounded: many ties, average ranks
    predicted = (scores + rng.normal(0, 1.5, 80)).round(0)
    assert gm.spearman(predicted, scores) == pytest.approx(100 * stats.spearmanr(predicted, scores)[0])
    assert gm.pearson(predicted, scores) == pytest.approx(100 * stats.pearsonr(predicted, scores)[0])
    assert gm.glue_metrics("mrpc", p, y) == {"f1": gm.f1(p, y), "accuracy": gm.accuracy(p, y)}
    assert set(gm.glue_metrics("stsb", predicted, scores)) == {"spearman", "pearson"}
    # Degenerate sets: 0, not NaN (scikit-learn's convention for MCC and F1).
    assert gm.matthews_corrcoef(np.ones(8), y[:8]) == 0.0 and gm.f1(np.zeros(8), np.zeros(8)) == 0.0
    assert gm.spearman(np.ones(8), scores[:8]) == 0.0


def test_corpus_metrics_differ_from_the_originals_batch_means():
    """The original averaged per-batch values (reference §10 item 33); the whole set's value is the metric."""
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 64)
    p = np.where(rng.random(64) < 0.7, y, 1 - y)
    batches = [slice(i, i + 16) for i in range(0, 64, 16)]
    for ours, theirs in ((gm.matthews_corrcoef, sklearn_metrics.matthews_corrcoef), (gm.f1, sklearn_metrics.f1_score)):
        batch_mean = np.mean([100 * theirs(y[b], p[b]) for b in batches])
        assert ours(p, y) == pytest.approx(100 * theirs(y, p))
        assert abs(ours(p, y) - batch_mean) > 0.1
    scores = rng.uniform(0, 5, 64)
    predicted = scores + rng.normal(0, 2, 64)
    batch_mean = np.mean([100 * stats.spearmanr(predicted[b], scores[b])[0] for b in batches])
    assert gm.spearman(predicted, scores) == pytest.approx(100 * stats.spearmanr(predicted, scores)[0])
    assert abs(gm.spearman(predicted, scores) - batch_mean) > 0.1


# ---------------------------------------------------------------------------------------------------------------
# Training


@pytest.mark.parametrize("config", list(CONFIGS))
def test_each_glue_config_trains_and_evaluates(toy_run, glue_root, tmp_path, config):
    checkpoint, _ = toy_run
    task = CONFIGS[config]
    cfg = load_config(f"fine_tuning/{config}", overrides(tmp_path, checkpoint, glue_root))
    results = run_finetune(cfg)
    metrics = results["metrics"]
    expected = {"cola": ["mcc"], "mrpc": ["f1", "accuracy"], "qqp": ["f1", "accuracy"],
                "stsb": ["spearman", "pearson"]}.get(task, ["accuracy"])
    prefixes = ["matched_", "mismatched_"] if task == "mnli" else [""]
    for prefix in prefixes:
        for name in [*expected, "loss"]:
            value = metrics[f"val/{prefix}{name}"]
            assert np.isfinite(value)
            if name != "loss":
                assert (-100 if name in ("mcc", "spearman", "pearson") else 0) <= value <= 100
    monitor = f"val/{prefixes[0]}{expected[0]}"
    assert results["best"]["monitor"] == monitor and results["steps"] == 2
    display = {"mcc": "MCC", "f1": "F1", "spearman": "Spearman", "accuracy": "Accuracy"}[expected[0]]
    assert results["headline"] == {display: metrics[monitor]}
    protocol = results["protocol"]
    assert protocol["train"] == "train, 8 rows" and "test" in protocol and "32 tokens" in protocol["input"]
    assert protocol["validation"] == ("validation_matched, 12 rows, validation_mismatched, 12 rows"
                                      if task == "mnli" else "validation, 12 rows")
    assert "pooler freshly initialised" in results["source"] and "text_tower" in results["source"]
    # The best checkpoint reloads without running code from it, and strictly into a fresh task's module.
    best = torch.load(results["best"]["checkpoint"], weights_only=True)
    assert best["hyper_parameters"]["glue"]["task"] == task
    fresh = glue.build_task(cfg).module
    fresh.load_state_dict(best["state_dict"], strict=True)
    classifier = best["state_dict"]["model.classifier.weight"]
    assert classifier.shape[0] == {"mnli": 3, "stsb": 1}.get(task, 2)
    run_dir = tmp_path / "logs" / cfg.run_name
    assert (run_dir / "report.md").is_file() and json.loads((run_dir / "results.json").read_text())["task"] == task


def test_stsb_labels_stay_floats(toy_run, glue_root, tmp_path):
    checkpoint, _ = toy_run
    cfg = load_config("fine_tuning/stsb", overrides(tmp_path, checkpoint, glue_root, "data.limit_train_samples=16"))
    task = glue.build_task(cfg)
    stored = datasets.load_from_disk(str(glue_root / "glue" / "stsb"))
    batch = next(iter(task.val_loaders))
    assert batch["labels"].dtype == torch.float32
    expected = torch.tensor(stored["validation"]["label"][:len(batch["labels"])], dtype=torch.float32)
    assert torch.equal(batch["labels"], expected) and not torch.equal(expected, expected.round())
    train = next(iter(task.train_loader))
    assert train["labels"].dtype == torch.float32 and (train["token_type_ids"] == 1).any()  # pairs: segment 1
    with torch.no_grad():
        logits = task.module(train)
        loss = task.module.per_sample_loss(logits, train["labels"]).mean()
    assert logits.shape == (4, 1)
    assert float(loss) == pytest.approx(float(((logits.view(-1).float() - train["labels"]) ** 2).mean()))


def test_pairs_are_truncated_longest_first_with_segments_and_padding(toy_run, glue_root, tmp_path):
    checkpoint, _ = toy_run
    cfg = load_config("fine_tuning/rte", overrides(tmp_path, checkpoint, glue_root))
    task = glue.build_task(cfg)
    collate = task.train_loader.collate_fn
    long = " ".join(["circle"] * 40)
    batch = collate([(0, (long, "red square"), 1), (1, ("blue", "one"), 0)])
    ids, mask, segments = batch["token_ids"], batch["padding_mask"], batch["token_type_ids"]
    assert ids.shape == (2, 32)  # capped at the toy tower's 32 positions
    assert not mask[0].any() and mask[1].sum() == 32 - 5  # [CLS] blue [SEP] one [SEP]
    assert segments[0, -3:].tolist() == [1, 1, 1]  # the short second sentence is kept whole
    assert segments[1, :5].tolist() == [0, 0, 0, 1, 1]


# ---------------------------------------------------------------------------------------------------------------
# Errors before training


def test_input_errors_are_one_line_before_training(toy_run, glue_root, tmp_path):
    checkpoint, _ = toy_run
    args = overrides(tmp_path, checkpoint, glue_root)
    cfg = load_config("fine_tuning/mrpc", args)
    cfg.task = "boolq"
    with pytest.raises(EvlpError, match="task='boolq' does not exist"):
        run_finetune(cfg)
    with pytest.raises(EvlpError, match="not a GLUE task"):
        glue.build_task(cfg)

    data = tmp_path / "data"
    make_glue_task(data, "mrpc", drop_split="validation")
    with pytest.raises(EvlpError, match="mrpc: .* has no validation split .*found train, test"):
        run_finetune(load_config("fine_tuning/mrpc", overrides(tmp_path, checkpoint, data)))
    make_glue_task(data, "mnli", drop_split="validation_mismatched")
    with pytest.raises(EvlpError, match="no validation_mismatched split"):
        run_finetune(load_config("fine_tuning/mnli", overrides(tmp_path, checkpoint, data)))
    with pytest.raises(EvlpError, match=r"glue/qqp not found; fetch it with `evlp download glue --task qqp"):
        run_finetune(load_config("fine_tuning/qqp", overrides(tmp_path, checkpoint, data)))
    renamed = datasets.load_from_disk(str(glue_root / "glue" / "rte")).rename_column("sentence2", "hypothesis")
    renamed.save_to_disk(str(data / "glue" / "rte"))
    with pytest.raises(EvlpError, match="lacks the column.* sentence2"):
        run_finetune(load_config("fine_tuning/rte", overrides(tmp_path, checkpoint, data)))
    with pytest.raises(EvlpError, match="model.num_classes=2, but GLUE mnli has 3 classes"):
        run_finetune(load_config("fine_tuning/mnli", [*args, "model.num_classes=2"]))

    state = torch.load(checkpoint, weights_only=True)
    state["state_dict"] = {k: v for k, v in state["state_dict"].items() if not k.startswith("student.text_tower.")}
    torch.save(state, tmp_path / "image_only.ckpt")
    with pytest.raises(EvlpError, match=r"starts from the text tower .*no student\.text_tower"):
        run_finetune(load_config("fine_tuning/mrpc", overrides(tmp_path, tmp_path / "image_only.ckpt", glue_root)))
    assert not (tmp_path / "logs").exists() and not (tmp_path / "models").exists()  # nothing trained


def test_the_pooler_comes_from_the_runs_original_bert(toy_run, glue_root, tmp_path):
    """A run that started from a pretrained BERT gets that BERT's pooler (read offline from its folder)."""
    from transformers import BertModel

    from evlp.data.synthetic import write_vocab
    from evlp.models.text import bert_config

    checkpoint, _ = toy_run
    state = torch.load(checkpoint, weights_only=True)
    text = state["hyper_parameters"]["cfg"]["model"]["text_tower"]
    bert_dir = write_vocab(tmp_path / "tiny_bert")
    tokens = len((bert_dir / "vocab.txt").read_text().splitlines())
    BertModel(bert_config(vocab_size=tokens, hidden_size=32, num_attention_heads=2, intermediate_size=128,
                          num_hidden_layers=2, max_position_embeddings=32)).save_pretrained(bert_dir)
    assert text["width"] == 32 and text["num_heads"] == 2
    text["path"] = str(bert_dir)
    torch.save(state, tmp_path / "from_bert.ckpt")
    cfg = load_config("fine_tuning/mrpc", overrides(tmp_path, tmp_path / "from_bert.ckpt", glue_root))
    task = glue.build_task(cfg)
    assert f"pooler pretrained from {bert_dir}" in task.summary
    saved = BertModel.from_pretrained(bert_dir).pooler.dense.weight
    assert torch.equal(task.module.model.pooler.dense.weight, saved)
    assert all(p.requires_grad for p in task.module.model.pooler.parameters())


# ---------------------------------------------------------------------------------------------------------------
# Command line and sweep


def test_evlp_finetune_command(toy_run, glue_root, tmp_path, capsys):
    from evlp.cli import main

    checkpoint, _ = toy_run
    code = main(["finetune", "--config", "fine_tuning/mrpc", *overrides(tmp_path, checkpoint, glue_root)])
    assert code == 0
    out = capsys.readouterr().out
    assert "val/f1:" in out and "best checkpoint:" in out
    assert (tmp_path / "logs" / "glue_mrpc" / "results.json").is_file()


def test_sweep_glue_writes_nine_rows_and_goes_on_past_missing_data(toy_run, glue_root, tmp_path):
    from evlp.finetune.sweep import run_sweep

    checkpoint, _ = toy_run
    data = tmp_path / "data"
    (data / "glue").mkdir(parents=True)
    for task in CONFIGS.values():
        if task != "qnli":  # its data is missing
            shutil.copytree(glue_root / "glue" / task, data / "glue" / task)
    rows, out = run_sweep("glue", overrides(tmp_path, checkpoint, data, "trainer.max_steps=1",
                                               "data.limit_train_samples=4"))
    assert [r["task"] for r in rows] == [CONFIGS[c] for c in ("cola", "mnli", "mrpc", "qnli", "qqp", "rte", "sst",
                                                              "stsb", "wnli")]
    assert [r["status"] for r in rows].count("ok") == 8
    failed = next(r for r in rows if r["status"] != "ok")
    assert failed["task"] == "qnli" and "glue/qnli not found" in failed["error"]
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["runs"]) == 9
    table = (out / "summary.md").read_text()
    assert "| MRPC | F1 |" in table and "| STSB | Spearman |" in table and "| COLA | MCC |" in table
    assert "| MNLI | Accuracy |" in table and "fine_tuning/qnli" in table and "not found" in table
    assert len([line for line in table.splitlines() if line.startswith("| ") and "---" not in line]) == 1 + 8


# ---------------------------------------------------------------------------------------------------------------
# Using the fine-tuned classifier


@pytest.mark.parametrize("config", ["mrpc", "stsb"])
def test_load_text_classifier_needs_only_the_fine_tuning_checkpoint(toy_run, glue_root, tmp_path, monkeypatch,
                                                                    config):
    checkpoint, _ = toy_run
    source = tmp_path / "pretrained.ckpt"
    shutil.copy(checkpoint, source)
    cfg = load_config(f"fine_tuning/{config}", overrides(tmp_path, source, glue_root))
    best = run_finetune(cfg)["best"]["checkpoint"]
    task = glue.build_task(cfg)  # the training module, with the best weights
    task.module.load_state_dict(torch.load(best, weights_only=True)["state_dict"], strict=True)
    task.module.eval()
    batch = next(iter(task.val_loaders))
    with torch.no_grad():
        expected = task.module(batch)

    source.unlink()  # neither the pretraining checkpoint nor its loader is used
    monkeypatch.setattr(glue, "load_pretrained", lambda *a, **k: pytest.fail("read the pretraining checkpoint"))
    model, encode, info = glue.load_text_classifier(best)
    assert not model.training
    assert info["task"] == config and info["max_len"] == 32 and info["num_classes"] == (1 if config == "stsb" else 2)
    assert info["labels"] == (None if config == "stsb" else ["not_equivalent", "equivalent"])
    rows = datasets.load_from_disk(str(glue_root / "glue" / config))["validation"]
    n = len(batch["labels"])
    inputs = encode(rows["sentence1"][:n], rows["sentence2"][:n])
    for key in ("token_ids", "padding_mask", "token_type_ids"):
        assert torch.equal(inputs[key], batch[key])
    with torch.no_grad():
        logits = model(**inputs)
        single = model(**encode(rows["sentence1"][0], rows["sentence2"][0]))
    torch.testing.assert_close(logits, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(single, expected[:1], atol=1e-5, rtol=1e-5)  # unpadded: same up to float order
    with pytest.raises(EvlpError, match="takes sentence pairs"):
        encode("one sentence")

    with pytest.raises(EvlpError, match="is not an evlp GLUE fine-tuning checkpoint"):
        glue.load_text_classifier(checkpoint)
