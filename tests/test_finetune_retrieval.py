"""Retrieval fine-tuning (COCO / Flickr30K) from the toy pretraining checkpoint, on Karpathy-layout fixtures: both
configs train, validate by mean recall (max), evaluate the best weights on the test split and leave a checkpoint that
``evlp eval`` loads; the gradient cache equals a full-batch step; captions of one image are not each other's
negatives; bad inputs stop before training."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

import evlp.data.coco
from evlp.cli import main as evlp_main
from evlp.config import load_config
from evlp.errors import EvlpError
from evlp.eval.benchmarks import run_retrieval
from evlp.eval.checkpoint import load_student
from evlp.eval.datasets import load_karpathy_split
from evlp.finetune.retrieval import (CaptionPairs, PairCollate, build_task, grad_cache_backward, split_batch)
from evlp.finetune.runner import run_finetune
from evlp.finetune.source import load_pretrained
from evlp.finetune.sweep import run_sweep
from evlp.losses import ContrastiveLoss
from evlp.data.tokenizer import TextTokenizer
from tests.api_support import toy_run  # noqa: F401
from tests.test_eval_commands import make_karpathy, one_torch_thread  # noqa: F401

SPLITS = {"coco": {"train": 5, "restval": 2, "val": 3, "test": 3}, "flickr30k": {"train": 6, "val": 3, "test": 3}}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Both datasets in Karpathy's layout, every split's images present (the first image has 6 captions)."""
    root = tmp_path_factory.mktemp("karpathy")
    make_karpathy(root, "coco", splits=SPLITS["coco"])
    make_karpathy(root, "flickr30k", seed=1, splits=SPLITS["flickr30k"])
    return root


def overrides(base: Path, data_path: Path, checkpoint: Path, *extra: str) -> list[str]:
    """The toy student's sizes (32 px, 24 tokens), 2 epochs of 2 steps of 8 pairs, CPU, nothing downloaded."""
    return [f"base_dir={base}", f"data_path={data_path}", f"model.model_path={checkpoint}", "data.image_size=32",
            "data.max_text_len=24", "data.batch_size=8", "data.eval_batch_size=4", "data.num_workers=0",
            "data.download=false", "trainer.max_epochs=2", "trainer.limit_train_batches=2",
            "trainer.accelerator=cpu", "trainer.devices=1", "trainer.precision=32-true",
            "trainer.progress_bar=false", "trainer.log_every_n_steps=1", *extra]


def logged(run_dir: Path, name: str) -> list[float]:
    with (run_dir / "metrics.csv").open() as f:
        return [float(r["value"]) for r in csv.DictReader(f) if r["name"] == name]


def check_run(run_dir: Path, results: dict, dataset: str, data_path: Path) -> None:
    metrics = results["metrics"]
    for key in ("TR@1", "TR@5", "TR@10", "IR@1", "IR@5", "IR@10", "mean_recall", "R@1"):
        assert 0 <= metrics[f"test/{key}"] <= 100 and 0 <= metrics[f"val/{key}"] <= 100
    assert results["headline"] == {"IR@1": metrics["test/IR@1"], "TR@1": metrics["test/TR@1"]}
    assert json.loads((run_dir / "results.json").read_text()) == results
    protocol = results["protocol"]
    assert protocol["resolution"] == 32 and protocol["dataset"] == dataset and not protocol["standard_splits"]
    images = sum(n for s, n in SPLITS[dataset].items() if s in ("train", "restval"))
    assert protocol["counts"]["train_images"] == images and protocol["counts"]["train_pairs"] == 5 * images + 1
    assert protocol["counts"]["test_images"] == 3 and protocol["counts"]["test_captions"] == 15

    # The best checkpoint is the one of the highest validation mean recall, and its weights were measured again.
    best = results["best"]
    assert best["monitor"] == "val/mean_recall" and best["value"] == max(logged(run_dir, "val/mean_recall"))
    assert metrics["val/mean_recall"] == pytest.approx(best["value"])
    checkpoint = Path(best["checkpoint"])
    assert checkpoint.is_file() and checkpoint.name.endswith("-val.ckpt")
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)  # plain containers only
    assert state["hyper_parameters"]["cfg"]["data"]["max_text_len"] == 24
    assert any(k.startswith("student.image_tower.") for k in state["state_dict"])

    # evlp eval's loader rebuilds the fine-tuned student, and measures exactly the reported test numbers.
    student, tokenizer, image_size = load_student(checkpoint)
    assert image_size == 32 and tokenizer.max_len == 24
    split = load_karpathy_split(dataset, data_path, "test")
    again = run_retrieval(student, tokenizer, split, image_size, torch.device("cpu"), batch_size=4, num_workers=0,
                          progress=False)
    assert {f"test/{k}": v for k, v in again.metrics.items()} == {k: v for k, v in metrics.items()
                                                                  if k.startswith("test/")}


# ---------------------------------------------------------------------------------------------------------------
# End to end


def test_sweep_fine_tunes_both_datasets_with_micro_batches(toy_run, data, tmp_path):
    checkpoint, _ = toy_run
    rows, out = run_sweep("retrieval", overrides(tmp_path, data, checkpoint, "data.micro_batch_size=3"))
    assert [r["status"] for r in rows] == ["ok", "ok"], rows
    for row, dataset in zip(rows, ("coco", "flickr30k")):
        results = json.loads(Path(row["results"]).read_text())
        check_run(Path(row["results"]).parent, results, dataset, data)
        assert results["protocol"]["micro_batch_size"] == 3 and results["steps"] == 4
    table = (out / "summary.md").read_text()
    assert "| Dataset | Resolution | IR@1 | TR@1 | #params |" in table
    assert "| coco | 32x32 |" in table and "| flickr30k | 32x32 |" in table


def test_cli_fine_tunes_flickr30k(toy_run, data, tmp_path, capsys):
    checkpoint, _ = toy_run
    argv = ["finetune", "--config", "fine_tuning/retrieval_flickr30k",
            *overrides(tmp_path, data, checkpoint, "trainer.gradient_clip_val=1.0", "run_name=flickr_cli")]
    assert evlp_main(argv) == 0
    run_dir = tmp_path / "logs" / "flickr_cli"
    results = json.loads((run_dir / "results.json").read_text())
    check_run(run_dir, results, "flickr30k", data)
    assert results["protocol"]["micro_batch_size"] is None
    assert "not used: the teacher" in results["source"] and "memory bank" in results["source"]
    assert logged(run_dir, "lr/decay") and logged(run_dir, "train/loss") and logged(run_dir, "val/loss")
    assert "best checkpoint:" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------------
# The gradient cache


def tiny_batch(tokenizer: TextTokenizer, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    captions = ["a red dog", "two cats on a tree", "a small bird", "the sky over a river", "a man on the beach",
                "a car", "red car on a river", "two small birds in the sky"]
    token_ids, padding_mask = PairCollate(tokenizer).tokenize(captions)
    return {"image": torch.randn(8, 3, 32, 32, generator=generator), "text": token_ids, "padding_mask": padding_mask,
            "image_id": torch.tensor([0, 0, 1, 2, 2, 3, 4, 5])}


def gradients(student: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in student.named_parameters() if p.grad is not None}


def step_gradients(student, batch, micro_batch_size, seed=0):
    """Gradients of one ITC step (``grad_cache_backward``) with the random state seeded; and the state after it."""
    loss = ContrastiveLoss()

    def encode(chunk):
        return student.forward_image(chunk["image"])["x"], student.forward_text(chunk["text"],
                                                                                chunk["padding_mask"])["x"]

    def loss_fn(image, text):
        return loss(image, text, student.logit_scales[1].exp(), sample_ids=batch["image_id"])

    student.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = grad_cache_backward(encode, batch, loss_fn, micro_batch_size, loss_params=[student.logit_scales])
    return gradients(student), out, torch.get_rng_state()


def assert_same_gradients(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and "logit_scales" in a and "image_tower.pos_embed" not in a  # fixed sin-cos
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.fixture(scope="module")
def student_and_tokenizer(toy_run):
    parts = load_pretrained(toy_run[0], keep="student")
    return parts.student, TextTokenizer(parts.tokenizer.tokenizer, max_len=24)


def test_grad_cache_equals_the_full_batch_gradient(student_and_tokenizer):
    student, tokenizer = student_and_tokenizer
    batch = tiny_batch(tokenizer)
    student.eval()  # no dropout: the micro-batched and the full-batch forward are the same function
    try:
        full, full_out, _ = step_gradients(student, batch, None)
        for micro in (3, 4):  # uneven (3, 3, 2) and even chunks
            cached, cached_out, _ = step_gradients(student, batch, micro)
            assert_same_gradients(cached, full)
            torch.testing.assert_close(cached_out["loss"], full_out["loss"])
    finally:
        student.train()


def test_grad_cache_replays_dropout(student_and_tokenizer):
    """In train mode (BERT's dropout 0.1) the re-embedded micro-batches draw the masks of their first pass: the
    gradient equals that of the same micro-batches embedded once with gradient, and the random stream ends where
    that reference leaves it."""
    student, tokenizer = student_and_tokenizer
    student.train()
    batch = tiny_batch(tokenizer, seed=1)
    loss = ContrastiveLoss()
    student.zero_grad(set_to_none=True)
    torch.manual_seed(5)
    outputs = [(student.forward_image(c["image"])["x"], student.forward_text(c["text"], c["padding_mask"])["x"])
               for c in split_batch(batch, 3)]
    image, text = torch.cat([o[0] for o in outputs]), torch.cat([o[1] for o in outputs])
    loss(image, text, student.logit_scales[1].exp(), sample_ids=batch["image_id"])["loss"].backward()
    reference, reference_rng = gradients(student), torch.get_rng_state()

    cached, _, rng = step_gradients(student, batch, 3, seed=5)
    assert_same_gradients(cached, reference)
    assert torch.equal(rng, reference_rng)
    other, _, _ = step_gradients(student, batch, 3, seed=6)  # dropout is really on: another seed, other gradients
    assert not torch.allclose(other["text_tower.bert.embeddings.word_embeddings.weight"],
                              cached["text_tower.bert.embeddings.word_embeddings.weight"])


def no_dropout(module: nn.Module) -> None:
    for layer in module.modules():
        if isinstance(layer, nn.Dropout):
            layer.p = 0.0
        if hasattr(layer, "dropout_prob"):  # Hugging Face's SDPA attention reads a float
            layer.dropout_prob = 0.0


def test_one_lightning_step_with_micro_batches_updates_like_the_full_batch(toy_run, data, tmp_path):
    checkpoint, _ = toy_run
    weights = {}
    for micro in ("null", "3"):
        cfg = load_config("fine_tuning/retrieval_coco", overrides(
            tmp_path, data, checkpoint, f"data.micro_batch_size={micro}", "trainer.gradient_clip_val=0.5"))
        task = build_task(cfg)
        no_dropout(task.module.student)
        L.seed_everything(0, verbose=False)
        trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=1, limit_val_batches=0, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            precision="32-true")
        trainer.fit(task.module, train_dataloaders=task.train_loader)
        assert trainer.global_step == 1
        weights[micro] = {k: v.clone() for k, v in task.module.student.state_dict().items()}
    before = load_student(checkpoint)[0].state_dict()
    changed = [k for k in before if not torch.equal(weights["null"][k], before[k])]
    assert changed and "head.weight" not in changed and "fc_norm.weight" not in changed  # frozen
    for name in weights["null"]:
        torch.testing.assert_close(weights["3"][name], weights["null"][name], rtol=1e-4, atol=1e-6, msg=name)


# ---------------------------------------------------------------------------------------------------------------
# Negatives


def test_captions_of_the_same_image_are_not_negatives():
    torch.manual_seed(0)
    image = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    ids = torch.tensor([7, 7, 3, 9])  # pairs 0 and 1 show the same image
    scale = torch.tensor(10.0)
    out = ContrastiveLoss()(image, text, scale, sample_ids=ids)

    def ce(scores, positive, candidates):
        return -(scores[positive] - torch.logsumexp(scores[candidates], dim=0))

    same = ids[:, None] == ids[None, :]
    expected_i2t = torch.stack([ce(scale * image[i] @ text.T, i, [j for j in range(4) if j == i or not same[i, j]])
                                for i in range(4)]).mean()
    expected_t2i = torch.stack([ce(scale * text[i] @ image.T, i, [j for j in range(4) if j == i or not same[i, j]])
                                for i in range(4)]).mean()
    torch.testing.assert_close(out["image_loss"], expected_i2t)
    torch.testing.assert_close(out["text_loss"], expected_t2i)
    unmasked = ContrastiveLoss()(image, text, scale)
    assert not torch.allclose(unmasked["loss"], out["loss"])
    # Two captions of one image: no negative is left, so nothing to push apart.
    both = ContrastiveLoss()(image[:2], text[:2], scale, sample_ids=ids[:2])
    assert both["loss"] == 0 and ContrastiveLoss()(image[:2], text[:2], scale)["loss"] > 0


def test_training_batches_carry_the_image_of_each_caption(data, student_and_tokenizer):
    _, tokenizer = student_and_tokenizer
    split = load_karpathy_split("coco", data, "train")
    pairs = CaptionPairs(split, lambda image: torch.zeros(3, 4, 4))
    batch = PairCollate(tokenizer)([pairs[j] for j in range(len(pairs))])
    assert batch["image_id"].tolist() == split.caption_image
    assert batch["text"].shape[1] <= 24 and not batch["padding_mask"][:, 0].any()


# ---------------------------------------------------------------------------------------------------------------
# Inputs checked before training


@pytest.mark.parametrize("case, message", [
    ("missing_split_file", r"split file .*dataset_coco.json not found"),
    ("missing_image", r"1 of 5 coco train images are missing"),
    ("missing_flickr_images", r"flickr30k-images not found.*request access"),
    ("no_student", r"holds no S-SMKE student"),
    ("image_size", r"data.image_size=224, but the student .* takes 32x32 images; set data.image_size=32"),
    ("text_len", r"data.max_text_len=64, but the student's text tower has 32 positions"),
    ("accumulation", r"data.micro_batch_size"),
    ("batch_too_large", r"36 training pairs, fewer than one batch"),
])
def test_bad_inputs_stop_before_training(toy_run, data, tmp_path, case, message):
    checkpoint, _ = toy_run
    data_path, task, extra = tmp_path / "data", "retrieval_coco", []
    dataset = "flickr30k" if case == "missing_flickr_images" else "coco"
    make_karpathy(data_path, dataset, splits=SPLITS[dataset])
    if case == "missing_split_file":
        (data_path / "coco" / "dataset_coco.json").unlink()
    elif case == "missing_image":
        next((data_path / "coco" / "train2014").iterdir()).unlink()
    elif case == "missing_flickr_images":
        task = "retrieval_flickr30k"
        for image in (data_path / "flickr30k" / "flickr30k-images").iterdir():
            image.unlink()
        (data_path / "flickr30k" / "flickr30k-images").rmdir()
    elif case == "no_student":
        checkpoint = tmp_path / "text.ckpt"
        torch.save({"state_dict": {"model.classifier.weight": torch.zeros(2, 4)}, "hyper_parameters": {}}, checkpoint)
    elif case == "image_size":
        extra = ["data.image_size=224"]
    elif case == "text_len":
        extra = ["data.max_text_len=64"]
    elif case == "accumulation":
        extra = ["trainer.accumulate_grad_batches=2"]
    elif case == "batch_too_large":
        extra = ["data.batch_size=64"]
    cfg = load_config(f"fine_tuning/{task}", overrides(tmp_path, data_path, checkpoint, *extra))
    with pytest.raises(EvlpError, match=message):
        run_finetune(cfg)
    assert not (tmp_path / "models").exists()  # no checkpoint: nothing trained


def test_missing_karpathy_files_are_downloaded(toy_run, tmp_path, monkeypatch):
    checkpoint, _ = toy_run
    calls = []

    def fake_fetch(data_path, base_url=None, keep_archives=False):
        calls.append((Path(data_path), base_url))
        return make_karpathy(Path(data_path), "coco", splits=SPLITS["coco"])

    monkeypatch.setattr(evlp.data.coco, "fetch_coco_files", fake_fetch)
    cfg = load_config("fine_tuning/retrieval_coco", overrides(tmp_path, tmp_path / "data", checkpoint,
                                                              "data.download=true", "data.download_url=http://mirror/"))
    task = build_task(cfg)
    assert calls == [(tmp_path / "data", "http://mirror/")]
    assert task.protocol["counts"]["val_images"] == 3 and task.monitor == "val/mean_recall" and task.mode == "max"


def test_limits_keep_the_first_images_with_all_their_captions(toy_run, data, tmp_path):
    checkpoint, _ = toy_run
    cfg = load_config("fine_tuning/retrieval_coco", overrides(tmp_path, data, checkpoint, "data.batch_size=4",
                                                              "data.limit_train_samples=3", "data.limit_val_samples=2"))
    task = build_task(cfg)
    assert task.protocol["counts"] == {"train_images": 3, "train_pairs": 16, "val_images": 2, "val_captions": 10,
                                       "test_images": 2, "test_captions": 10}
    assert task.protocol["train_split"] == "train+restval" and not task.protocol["standard_splits"]
    assert len(task.train_loader) == 4  # 16 pairs, batches of 4
