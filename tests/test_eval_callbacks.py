"""The ImageNet zero-shot and retrieval callbacks in a tiny training run with fixture data: logged like every metric,
equal to ``evlp eval`` on the checkpoint the run wrote, skipped when the data is absent, fatal at setup when it is
broken, silent on ranks other than 0."""

from __future__ import annotations

import csv
import json
import logging
from types import SimpleNamespace

import pytest

from evlp.config import load_config
from evlp.errors import EvlpError
from evlp.eval.datasets import fixed_subset, load_karpathy_split
from evlp.train.checkpoint import list_checkpoints
from evlp.train.eval_callbacks import RetrievalCallback, ZeroShotCallback, benchmark_callbacks
from evlp.train.recipe import run_pretraining
from tests.test_eval_commands import TINY_EVAL, evlp_eval, make_imagenet, make_karpathy, one_torch_thread  # noqa: F401

# One epoch of 3 steps and one validation; the quickstart's own evaluation after training is off (not under test).
RUN = [*TINY_EVAL, "trainer.max_epochs=1", "eval.retrieval=false", "eval.zeroshot=false"]


def cfg_for(base_dir, *extra):
    return load_config("quickstart", [f"base_dir={base_dir}", *RUN, *extra])


def logged(run_dir) -> dict[str, list[tuple[int, float]]]:
    rows: dict[str, list[tuple[int, float]]] = {}
    with (run_dir / "metrics.csv").open() as f:
        for r in csv.DictReader(f):
            rows.setdefault(r["name"], []).append((int(r["step"]), float(r["value"])))
    return rows


def test_callbacks_in_a_training_run_match_evlp_eval(tmp_path, capsys):
    make_karpathy(tmp_path, "coco")
    make_imagenet(tmp_path)
    cfg = cfg_for(tmp_path, "eval.imagenet_zeroshot_callback=true", "eval.retrieval_callback=coco")
    run_pretraining(cfg)

    metrics = logged(tmp_path / "logs" / "quickstart")
    names = ["val/imagenet_zeroshot_top1", "val/imagenet_zeroshot_top5", "val/coco_retrieval_mean_recall",
             "val/coco_retrieval_r1", *(f"val/coco_retrieval_{d}_r{k}" for d in ("tr", "ir") for k in (1, 5, 10))]
    validation_steps = [step for step, _ in metrics["val/loss"]]
    assert len(validation_steps) == 1
    for name in names:
        assert [step for step, _ in metrics[name]] == validation_steps, name  # logged like val/loss
        assert 0 <= metrics[name][0][1] <= 100
    assert metrics["val/coco_retrieval_ir_r10"][0][1] == 100.0  # 10 >= the 4 images

    # The validation ran after the last step, with the weights of the final checkpoint: `evlp eval` on it, with the
    # callback's batch size, gives the same numbers (the zero-shot callback shares its evaluator the same way).
    checkpoint = list_checkpoints(tmp_path / "models" / "quickstart")[-1][1]
    assert evlp_eval("retrieval", "--dataset", "coco", f"model.model_path={checkpoint}", "--batch-size", "16",
                     "--workers", "0", "--no-progress") == 0
    result = json.loads((tmp_path / "logs" / "eval" / checkpoint.stem / "retrieval_coco.json").read_text())
    for key, name in [("mean_recall", "mean_recall"), ("TR@1", "tr_r1"), ("IR@5", "ir_r5")]:
        assert result["metrics"][key] == pytest.approx(metrics[f"val/coco_retrieval_{name}"][0][1], rel=1e-6)  # float32


def test_absent_data_skips_with_one_line_and_broken_data_stops_before_training(tmp_path, caplog):
    tokenizer = SimpleNamespace()
    trainer = SimpleNamespace(is_global_zero=True)
    callbacks = [ZeroShotCallback(tmp_path, tokenizer, 32), RetrievalCallback("flickr30k", tmp_path, tokenizer, 32)]
    with caplog.at_level(logging.WARNING, logger="evlp"):
        for callback in callbacks:
            callback.setup(trainer, None, "fit")
    assert [r.getMessage() for r in caplog.records] == [
        f"imagenet zero-shot callback skipped: {tmp_path}/imagenet/val not found",
        f"flickr30k retrieval callback skipped: {tmp_path}/flickr30k not found",
    ]
    assert not any(c.ready for c in callbacks)

    make_karpathy(tmp_path, "coco")
    next((tmp_path / "coco" / "val2014").glob("*.jpg")).unlink()
    with pytest.raises(EvlpError, match="1 of 4 coco test images are missing"):
        run_pretraining(cfg_for(tmp_path, "eval.retrieval_callback=coco"))
    assert not (tmp_path / "models").exists()  # no training step ran


def test_only_rank_zero_evaluates(tmp_path):
    make_imagenet(tmp_path)
    callback = ZeroShotCallback(tmp_path, SimpleNamespace(), 32)
    callback.setup(SimpleNamespace(is_global_zero=False), None, "fit")
    assert not callback.ready

    def fail(*args):
        raise AssertionError("rank 1 evaluated")

    callback.ready, callback.evaluate = True, fail  # even with the data loaded, another rank just returns
    callback.on_validation_epoch_end(SimpleNamespace(is_global_zero=False, sanity_checking=False), None)


def test_config_switches(tmp_path):
    assert benchmark_callbacks(cfg_for(tmp_path), None) == []  # off by default
    callbacks = benchmark_callbacks(cfg_for(tmp_path, "eval.imagenet_zeroshot_callback=true",
                                            "eval.retrieval_callback=flickr30k", "eval.callback_max_images=2"), None)
    assert [type(c) for c in callbacks] == [ZeroShotCallback, RetrievalCallback]
    assert all(c.max_images == 2 and c.image_size == 32 and c.batch_size == 16 for c in callbacks)
    with pytest.raises(EvlpError, match="eval.retrieval_callback=cocoo: unknown dataset; expected one of coco"):
        benchmark_callbacks(cfg_for(tmp_path, "eval.retrieval_callback=cocoo"), None)


def test_max_images_keeps_a_fixed_subset_with_all_its_captions(tmp_path):
    make_karpathy(tmp_path, "coco", n_test=4)
    split = load_karpathy_split("coco", tmp_path)
    rows = fixed_subset(len(split.image_paths), 2)
    assert rows == fixed_subset(len(split.image_paths), 2) and len(rows) == 2  # the same at every validation
    subset = split.subset(rows)
    assert subset.image_paths == [split.image_paths[i] for i in rows]
    expected = [(c, split.image_paths[i]) for c, i in zip(split.captions, split.caption_image) if i in rows]
    assert [(c, subset.image_paths[i]) for c, i in zip(subset.captions, subset.caption_image)] == expected
    assert fixed_subset(4, None) == fixed_subset(4, 10) == [0, 1, 2, 3]
