"""The fine-tuning plumbing every task family shares: schedules, best-checkpoint choice, pretrained-part loading,
sweeps that go on past a failed task, and the config schema's errors."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from evlp.config import load_config
from evlp.errors import EvlpError
from evlp.finetune import sweep as sweep_module
from evlp.finetune.runner import LAST, build_task
from evlp.finetune.source import load_pretrained
from evlp.train.callbacks import BestCheckpoint
from evlp.train.optim import warmup_linear
from tests.api_support import toy_run  # noqa: F401
from tests.test_finetune_vision import imagenet_dir, vision_cfg  # noqa: F401


def test_warmup_then_linear_decay_to_zero():
    f = warmup_linear(100, 0.1)
    assert f(0) == 0 and f(5) == pytest.approx(0.5) and f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.5) and f(100) == 0 and f(130) == 0


class FakeTrainer:
    """What BestCheckpoint reads from a Lightning trainer; ``save_checkpoint`` writes the step into the file."""

    def __init__(self):
        self.callback_metrics, self.global_step = {}, 0
        self.is_global_zero, self.sanity_checking = True, False
        self.strategy = SimpleNamespace(broadcast=lambda obj, src=0: obj)  # one process

    def save_checkpoint(self, path, weights_only=False):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(str(self.global_step))


@pytest.mark.parametrize("mode, values, best_step", [("max", [50.0, 70.0, 60.0, float("nan")], 2),
                                                     ("min", [0.9, 0.5, 0.7, float("nan")], 2)])
def test_best_checkpoint_keeps_only_the_best_and_a_last_one(tmp_path, mode, values, best_step):
    trainer, best = FakeTrainer(), BestCheckpoint(tmp_path, "val/score", mode, last=LAST)
    for step, value in enumerate(values, start=1):
        trainer.global_step = step
        trainer.callback_metrics = {"val/score": torch.tensor(value), "val/loss": torch.tensor(1.0 / step)}
        best.on_validation_end(trainer, None)
    kept = sorted(p.name for p in tmp_path.iterdir())
    assert kept == sorted([LAST, f"model-{best_step}-{1.0 / best_step:.4f}-val.ckpt"])
    assert best.best_step == best_step and best.best_value == values[best_step - 1]
    assert (tmp_path / LAST).read_text() == str(len(values))  # the last validation, for resume


def test_a_monitor_the_task_never_logs_is_named(tmp_path):
    trainer = FakeTrainer()
    trainer.callback_metrics = {"val/loss": torch.tensor(1.0)}
    with pytest.raises(EvlpError, match="val/top1.*val/loss"):
        BestCheckpoint(tmp_path, "val/top1", "max").on_validation_end(trainer, None)


def test_unknown_task_and_unknown_key_are_one_line_errors():
    with pytest.raises(EvlpError, match="unknown config 'fine_tuning/nope'"):
        load_config("fine_tuning/nope")
    cfg = load_config("fine_tuning/mrpc")
    cfg.task = "mrcp"
    with pytest.raises(EvlpError, match="task='mrcp' does not exist; expected one of .*mrpc"):
        build_task(cfg)
    with pytest.raises(EvlpError, match="unknown config key 'optim.lrr'.*optim.lr"):
        load_config("fine_tuning/mrpc", ["optim.lrr=1"])


def test_pretrained_parts_say_what_was_kept_and_dropped(toy_run):
    checkpoint, _ = toy_run
    image = load_pretrained(checkpoint, keep="image")
    assert "image_tower" in image.summary and "dropped" in image.summary and "text_tower" in image.summary
    assert "kd_loss.*" in image.summary  # the memory bank: training state, named, not loaded
    student = load_pretrained(checkpoint, keep="student")
    assert "the whole S-SMKE student" in student.summary and student.tokenizer is not None
    with pytest.raises(EvlpError, match="model.model_path is not set"):
        load_pretrained(None, keep="text")
    with pytest.raises(EvlpError, match="no such file"):
        load_pretrained(checkpoint.parent / "missing.ckpt", keep="text")


def test_a_checkpoint_without_a_student_is_refused_before_training(tmp_path):
    path = tmp_path / "glue.ckpt"
    torch.save({"state_dict": {"classifier.weight": torch.zeros(2, 4)}, "hyper_parameters": {}}, path)
    with pytest.raises(EvlpError, match="holds no S-SMKE student"):
        load_pretrained(path, keep="text")


def test_sweep_goes_on_past_a_failed_task_and_writes_one_table(tmp_path, monkeypatch):
    ran = []

    def fake_run(cfg):
        ran.append(cfg.run_name)
        if cfg.task == "retrieval_coco":
            raise EvlpError("coco: split file missing")
        return {"headline": {"IR@1": 64.6, "TR@1": 82.0}, "parameters": 117_000_000,
                "protocol": {"resolution": 224}}

    monkeypatch.setattr("evlp.finetune.runner.run_finetune", fake_run)
    rows, out = sweep_module.run_sweep("retrieval", [f"base_dir={tmp_path}"])
    assert [r["status"] for r in rows] == ["failed", "ok"] and len(ran) == 2
    table = (out / "summary.md").read_text()
    assert "| flickr30k | 224x224 | 64.60 | 82.00 | 117.0M |" in table
    assert "fine_tuning/retrieval_coco" in table and "coco: split file missing" in table
    assert out == tmp_path / "logs" / "sweep_retrieval" and (out / "summary.json").is_file()


def test_vision_and_glue_tables_follow_the_seed_readme():
    # run names as a rerun of the sweep gives them (an earlier sweep's runs hold the plain names)
    vision = [{"status": "ok", "task": "imagenet", "run_name": "imagenet_linear-2", "headline": {"acc@1": 65.0},
               "parameters": 44_000_000, "resolution": 224, "overrides": ["model.linear_classifier=True"]},
              {"status": "ok", "task": "imagenet", "run_name": "imagenet-2", "headline": {"acc@1": 75.5},
               "parameters": 44_700_000, "resolution": 224, "overrides": ["model.linear_classifier=False"]}]
    assert "| imagenet | 224x224 | 75.50 | 65.00 | 44.7M |" in sweep_module.summary_markdown("vision", vision)
    glue = [{"status": "ok", "task": "cola", "headline": {"MCC": 14.2}, "parameters": 67_000_000}]
    assert "| COLA | MCC | 14.20 | 67.0M |" in sweep_module.summary_markdown("glue", glue)
    with pytest.raises(EvlpError, match="unknown sweep"):
        sweep_module.run_sweep("audio", [])


def test_finetune_refuses_a_pretraining_config(capsys):
    from evlp.cli import main

    assert main(["finetune", "--config", "training/s_smke"]) == 2
    assert "takes a fine_tuning/<task> config" in capsys.readouterr().err


def test_resume_latest_equals_an_uninterrupted_run(toy_run, imagenet_dir, tmp_path, monkeypatch):
    """Two epochs straight, against one epoch, a crash, and ``resume=latest``: the same weights at the end (mixup,
    RandAugment and the shuffle all draw random numbers, so the random state must travel in ``last.ckpt``)."""
    from evlp.finetune.runner import run_finetune

    checkpoint, _ = toy_run
    common = [f"data_path={imagenet_dir}", "trainer.max_epochs=2"]
    run_finetune(vision_cfg("imagenet", tmp_path / "straight", checkpoint, *common))

    original = BestCheckpoint.on_validation_end

    def crash_after_first_epoch(self, trainer, module):
        original(self, trainer, module)
        raise RuntimeError("killed")

    monkeypatch.setattr(BestCheckpoint, "on_validation_end", crash_after_first_epoch)
    with pytest.raises(RuntimeError, match="killed"):
        run_finetune(vision_cfg("imagenet", tmp_path / "resumed", checkpoint, *common))
    monkeypatch.setattr(BestCheckpoint, "on_validation_end", original)
    run_finetune(vision_cfg("imagenet", tmp_path / "resumed", checkpoint, *common, "resume=latest"))

    def final_state(base):
        return torch.load(base / "models" / "imagenet_finetune" / LAST, weights_only=True)

    straight, resumed = final_state(tmp_path / "straight"), final_state(tmp_path / "resumed")
    assert straight["global_step"] == resumed["global_step"] == 4
    for key, value in straight["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key
