"""The ImageNet zero-shot and retrieval callbacks in a tiny training run with fixture data: logged like every metric,
equal to ``evlp eval`` on the checkpoint the run wrote, skipped when the data is absent, fatal at setup when it is
broken, silent on ranks other than 0. The quickstart's callbacks in a tiny quickstart: logged at every validation,
equal to results.json after the last one, without any effect on training."""

from __future__ import annotations

import csv
import json
import logging
from types import SimpleNamespace

import pytest

import torch

from evlp.config import load_config
from evlp.data.synthetic import zero_shot_tasks
from evlp.errors import EvlpError
from evlp.eval.datasets import fixed_subset, load_karpathy_split
from evlp.train.checkpoint import list_checkpoints
from evlp.train.eval_callbacks import (RETRIEVAL_NAMES, QuickstartCallback, RetrievalCallback, ZeroShotCallback,
                                       benchmark_callbacks)
from evlp.train.evaluate import first_images
from evlp.train.recipe import run_pretraining
from evlp.train.report import PRETRAINING_PANELS
from tests.test_eval_commands import TINY_EVAL, evlp_eval, make_imagenet, make_karpathy, one_torch_thread  # noqa: F401
from tests.test_train import TINY, train_losses

# One epoch of 3 steps and one validation; the quickstart's own evaluation after training and its callbacks are off
# (not under test here, but below).
RUN = [*TINY_EVAL, "trainer.max_epochs=1", "eval.retrieval=false", "eval.zeroshot=false",
       "eval.zeroshot_callback=null", "eval.retrieval_callback=null"]


def cfg_for(base_dir, *extra):
    return load_config("quickstart", [f"base_dir={base_dir}", *RUN, *extra])


def quickstart_cfg(base_dir, *extra):
    """tests/test_train.py's tiny quickstart (3 steps an epoch, 16 held-out images), its callbacks on as shipped."""
    return load_config("quickstart", [f"base_dir={base_dir}", *TINY, *extra])


QUICKSTART_METRICS = [
    "val/quickstart_retrieval_mean_recall", "val/quickstart_retrieval_r1",
    *(f"val/quickstart_retrieval_{d}_r{k}" for d in ("tr", "ir") for k in (1, 5, 10)),
    "val/quickstart_zeroshot_top1", *(f"val/quickstart_zeroshot_{task.name}_top1" for task in zero_shot_tasks()),
]


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
    assert benchmark_callbacks(cfg_for(tmp_path), None) == []  # RUN turns the quickstart's off; off by default
    assert benchmark_callbacks(load_config("training/s_smke", []), None) == []
    callbacks = benchmark_callbacks(cfg_for(tmp_path, "eval.imagenet_zeroshot_callback=true",
                                            "eval.retrieval_callback=flickr30k", "eval.callback_max_images=2"), None)
    assert [type(c) for c in callbacks] == [ZeroShotCallback, RetrievalCallback]
    assert all(c.max_images == 2 and c.image_size == 32 and c.batch_size == 16 for c in callbacks)
    callbacks = benchmark_callbacks(cfg_for(tmp_path, "eval.zeroshot_callback=imagenet"), None)  # the newer switch
    assert [type(c) for c in callbacks] == [ZeroShotCallback]
    with pytest.raises(EvlpError, match="eval.retrieval_callback=cocoo: unknown dataset; expected one of coco"):
        benchmark_callbacks(cfg_for(tmp_path, "eval.retrieval_callback=cocoo"), None)
    with pytest.raises(EvlpError, match="eval.zeroshot_callback=coco: unknown dataset; expected one of imagenet, "
                                        "quickstart"):
        benchmark_callbacks(cfg_for(tmp_path, "eval.zeroshot_callback=coco"), None)


def test_quickstart_config_turns_the_quickstart_callbacks_on(tmp_path, caplog):
    val_set = object()
    callbacks = benchmark_callbacks(load_config("quickstart", [f"base_dir={tmp_path}"]), None, val_set)
    assert [type(c) for c in callbacks] == [QuickstartCallback]  # one callback, one pass over the split
    assert callbacks[0].retrieval and callbacks[0].zeroshot and callbacks[0].val_set is val_set
    assert callbacks[0].data_folder() == tmp_path / "quickstart"
    only_retrieval = benchmark_callbacks(quickstart_cfg(tmp_path, "eval.zeroshot_callback=imagenet"), None)
    assert [type(c) for c in only_retrieval] == [ZeroShotCallback, QuickstartCallback]
    assert only_retrieval[1].retrieval and not only_retrieval[1].zeroshot
    with caplog.at_level("WARNING", logger="evlp"):  # the quickstart config with other data: skipped, said so
        assert benchmark_callbacks(quickstart_cfg(tmp_path, "data.val=[]"), None) == []
    assert "eval.zeroshot_callback=quickstart and eval.retrieval_callback=quickstart skipped" in caplog.text
    assert "data.val=[] does not name quickstart" in caplog.text


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


# ---------------------------------------------------------------------------------------------------------------
# The quickstart's callbacks


def test_quickstart_callbacks_log_at_every_validation_and_match_results_json(tmp_path):
    results = run_pretraining(quickstart_cfg(tmp_path, "trainer.max_epochs=2"))
    run_dir = tmp_path / "logs" / "quickstart"
    metrics = logged(run_dir)
    validation_steps = [step for step, _ in metrics["val/loss"]]
    assert len(validation_steps) == 2  # one validation per epoch
    for name in QUICKSTART_METRICS:
        assert [step for step, _ in metrics[name]] == validation_steps, name  # logged like val/loss
        assert all(0 <= value <= 100 for _, value in metrics[name]), name
    assert metrics["val/quickstart_retrieval_ir_r1"] != metrics["val/quickstart_retrieval_ir_r10"]

    # TensorBoard gets them like every metric, and curves.png draws them.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir)).Reload()
    assert set(QUICKSTART_METRICS) <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("val/quickstart_zeroshot_top1")] == validation_steps
    drawn = {name for _, names in PRETRAINING_PANELS for name in names}
    assert {"val/quickstart_retrieval_tr_r1", "val/quickstart_retrieval_ir_r1", "val/quickstart_retrieval_mean_recall",
            "val/quickstart_zeroshot_top1", "val/quickstart_zeroshot_shape_top1"} <= drawn
    assert (run_dir / "curves.png").is_file()

    # The last validation ran after the last step: the evaluation after training (one shared function, the same
    # weights) gives the same numbers.
    last = {name: values[-1][1] for name, values in metrics.items()}
    assert set(results["retrieval"]) == {"TR@1", "TR@5", "TR@10", "IR@1", "IR@5", "IR@10"}
    for key, value in results["retrieval"].items():
        assert last[f"val/quickstart_retrieval_{RETRIEVAL_NAMES[key]}"] == pytest.approx(value, abs=1e-9), key
    assert last["val/quickstart_zeroshot_top1"] == pytest.approx(results["zeroshot"]["top1"], abs=1e-9)
    assert set(results["zeroshot"]["tasks"]) == {task.name for task in zero_shot_tasks()}
    for name, task in results["zeroshot"]["tasks"].items():
        assert last[f"val/quickstart_zeroshot_{name}_top1"] == pytest.approx(task["top1"], abs=1e-9), name


def test_quickstart_callbacks_leave_training_unchanged_and_take_max_images(tmp_path):
    common = ["trainer.max_epochs=2", "eval.retrieval=false", "eval.zeroshot=false"]
    run_pretraining(quickstart_cfg(tmp_path / "off", *common, "eval.zeroshot_callback=null",
                                   "eval.retrieval_callback=null"))
    run_pretraining(quickstart_cfg(tmp_path / "on", *common, "eval.callback_max_images=5"))
    off, on = logged(tmp_path / "off" / "logs" / "quickstart"), logged(tmp_path / "on" / "logs" / "quickstart")
    assert not any(name.startswith("val/quickstart_") for name in off)
    assert train_losses(tmp_path / "on" / "logs" / "quickstart") == train_losses(tmp_path / "off" / "logs" /
                                                                                 "quickstart")
    assert on["val/loss"] == off["val/loss"]
    # 5 images with one caption each: every caption and every image is within the top 5.
    for name in ["val/quickstart_retrieval_tr_r5", "val/quickstart_retrieval_ir_r5"]:
        assert [value for _, value in on[name]] == [100.0, 100.0], name


def test_first_images_keeps_the_rows_of_the_first_images_and_stops_reading():
    def batch(ids):
        return {"image_id": torch.tensor(ids), "text": torch.tensor(ids) * 10, "meta": [{"i": i} for i in ids]}

    def never():
        raise AssertionError("read past the last kept image")
        yield

    def batches():
        yield batch([7, 7, 3])
        yield batch([3, 9, 7, 1])
        yield from never()

    kept = list(first_images(batches(), 3))
    assert [b["image_id"].tolist() for b in kept] == [[7, 7, 3], [3, 9, 7]]
    assert [m["i"] for m in kept[1]["meta"]] == [3, 9, 7] and kept[1]["text"].tolist() == [30, 90, 70]
    assert [b["image_id"].tolist() for b in first_images(iter([batch([1, 2])]), None)] == [[1, 2]]
