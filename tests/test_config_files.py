"""A user's own YAML config (``--config my.yaml``, ``extends:``), starting from trained weights (``init_from=``), and
``resume=`` of a checkpoint that does not fit: one clear line each, for evlp train, info and finetune."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from evlp.cli import main
from evlp.config import load_config
from evlp.errors import EvlpError
from evlp.train.checkpoint import list_checkpoints, load_training_checkpoint
from evlp.train.recipe import run_pretraining
from tests.test_own_data import captioned_folder, own_data_overrides
from tests.test_train import TINY


def write(path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_own_yaml_extends_a_packaged_config_with_relative_paths(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "configs" / "base.yaml", "extends: quickstart\nmodel:\n  embed_dim: 96\nseed: 7\n")
    write(tmp_path / "configs" / "mine.yaml", "extends: base.yaml  # next to this file\nrun_name: mine\nseed: 8\n")
    cfg = load_config("configs/mine.yaml", ["model.depth=1"])
    assert (cfg.run_name, cfg.seed, cfg.model.embed_dim, cfg.model.depth) == ("mine", 8, 96, 1)
    assert cfg.data.train == ["quickstart"] and cfg.model.image_tower.depth == 1  # interpolations resolve after
    assert main(["info", "--config", "configs/mine.yaml"]) == 0
    assert "96" in capsys.readouterr().out
    # a file extending nothing starts from the schema's defaults
    write(tmp_path / "plain.yaml", "run_name: plain\n")
    assert load_config("plain.yaml").run_name == "plain" and load_config("plain.yaml").data.batch_size == 256


@pytest.mark.parametrize("text, message", [
    ("extends: quickstart\nmodel:\n  embed_dimm: 8\n", r"unknown config key 'model.embed_dimm' in .*bad.yaml; "
                                                        r"nearest valid keys: model.embed_dim"),
    ("extends: quickstart\nseed: many\n", r"wrong type for 'seed' in .*bad.yaml"),
    ("extends: quickstrat\n", r"unknown config 'quickstrat'; nearest valid choices: quickstart"),
    ("extends: other.yaml\n", r"config file .*other.yaml not found \(extended by .*bad.yaml\)"),
    ("extends: bad.yaml\n", r"extends itself"),
    ("extends: [quickstart]\n", r"`extends:` names one config"),
    ("- a list\n", r"must hold a mapping"),
    ("model: {embed_dim: 8\n", r"is not valid YAML"),
])
def test_bad_config_files_are_one_line_errors(tmp_path, monkeypatch, capsys, text, message):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "bad.yaml", text)
    with pytest.raises(EvlpError, match=message):
        load_config("bad.yaml")
    assert main(["info", "--config", "bad.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("evlp: error:") and len(err.strip().splitlines()) == 1


def test_finetune_takes_a_file_that_extends_a_fine_tuning_config(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    seen = []
    monkeypatch.setattr("evlp.finetune.runner.run_finetune", lambda cfg: seen.append(cfg) or {})
    write(tmp_path / "mrpc.yaml", "extends: fine_tuning/mrpc\nrun_name: my-mrpc\noptim:\n  lr: 3.0e-5\n")
    assert main(["finetune", "--config", "mrpc.yaml", "trainer.max_epochs=1"]) == 0
    assert (seen[0].task, seen[0].run_name, seen[0].optim.lr, seen[0].trainer.max_epochs) == ("mrpc", "my-mrpc",
                                                                                              3e-5, 1)
    write(tmp_path / "pretrain.yaml", "extends: training/s_smke\n")
    assert main(["finetune", "--config", "pretrain.yaml"]) == 2
    assert "extends one (`extends: fine_tuning/mrpc`)" in capsys.readouterr().err
    assert main(["train", "--config", "mrpc.yaml"]) == 2
    assert "is a fine-tuning config: run `evlp finetune --config mrpc.yaml" in capsys.readouterr().err


class StudentAtStart(L.Callback):
    """The student's and the memory bank's state and the optimizer's state when training starts."""

    def on_train_start(self, trainer, module):
        self.student = {k: v.clone() for k, v in module.student.state_dict().items()}
        self.bank = module.kd_loss.memory_bank.clone()
        self.optimizer_state = dict(trainer.optimizers[0].state)
        self.step = trainer.global_step


def test_init_from_a_checkpoint_or_an_export_starts_from_its_weights_only(tmp_path, capsys):
    captioned_folder(tmp_path / "photos", 16)
    assert main(["data", "convert", str(tmp_path / "photos"), "--out", str(tmp_path / "shards"),
                 "--workers", "1"]) == 0
    shards = str(tmp_path / "shards")
    overrides = own_data_overrides(tmp_path, shards, shards)
    run_pretraining(load_config("quickstart", [*overrides, "run_name=donor", "trainer.max_steps=4"]))
    checkpoint = list_checkpoints(tmp_path / "models" / "donor")[-1][1]
    donor = load_training_checkpoint(checkpoint)
    # a run's checkpoint folder stands for its newest checkpoint
    assert main(["export", str(tmp_path / "models" / "donor"), "--out", str(tmp_path / "exported")]) == 0
    capsys.readouterr()

    for source in (checkpoint, tmp_path / "exported"):
        start = StudentAtStart()
        run_pretraining(load_config("quickstart", [*overrides, "run_name=new", f"init_from={source}",
                                                   "trainer.max_steps=2", "data.quickstart.seed=5"]),
                        extra_callbacks=[start])
        for key, value in start.student.items():
            torch.testing.assert_close(value, donor["state_dict"][f"student.{key}"], msg=key)
        assert start.step == 0 and not start.optimizer_state  # a fresh optimizer and schedule
        assert not torch.equal(start.bank, donor["state_dict"]["kd_loss.memory_bank"])  # a fresh memory bank
        err = capsys.readouterr().err
        kind = "checkpoint of step 4" if source == checkpoint else "export of step 4"
        assert f"init_from: the student's weights" in err and f"from the {kind} {source}" in err
        assert "optimizer, schedule, step and memory bank start fresh" in err


def test_init_from_or_resume_of_a_model_that_does_not_fit_is_one_line(tmp_path, capsys):
    base = [f"base_dir={tmp_path}", *TINY, "trainer.max_steps=2"]
    assert main(["train", *base]) == 0
    checkpoint = list_checkpoints(tmp_path / "models" / "quickstart")[-1][1]
    capsys.readouterr()
    wider = ["model.embed_dim=48"]
    assert main(["train", *base, *wider, f"init_from={checkpoint}"]) == 2
    err = capsys.readouterr().err
    assert "the weights do not fit SSMKE" in err and "tokenizer must be those of the run that made it" in err
    assert len(err.strip().splitlines()) == 1
    assert main(["train", *base, *wider, "trainer.max_steps=4", f"resume={checkpoint}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "the checkpoint does not fit this run's model (" in err and "shape mismatch: student.tte_scale" in err
    assert "--config <its run folder>/config.yaml" in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {"classifier.weight": torch.zeros(2, 2)}}, foreign)
    assert main(["train", *base, f"resume={foreign}"]) == 2
    assert "not an evlp pretraining checkpoint" in capsys.readouterr().err
