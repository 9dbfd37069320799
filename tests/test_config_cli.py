"""Config loading, overrides, one-line errors and `evlp info`."""

import json
import subprocess
import sys

import pytest

from evlp.cli import main
from evlp.config import available_configs, load_config
from evlp.errors import EvlpError


def test_packaged_configs_are_listed():
    names = available_configs()
    assert "quickstart" in names and "training/s_smke" in names


def test_paths_derive_from_base_dir():
    cfg = load_config("training/s_smke", ["base_dir=/data"])
    assert cfg.model_path == "/data/models" and cfg.log_dir == "/data/logs" and cfg.data_path == "/data"
    assert cfg.model.image_tower.path == "/data/models/base_imagenet.pt"
    assert cfg.model.teacher.path == "/data/models/beitv2_base_patch16_224_pt1k.pth"
    assert cfg.data.train[0] == "/data/coco/shards/train"


def test_s_smke_recipe_values():
    cfg = load_config("training/s_smke")
    assert cfg.model.image_tower.depth == 6 and cfg.model.text_tower.depth == 6
    assert cfg.loss.memory_bank_size == 65536 and cfg.loss.kd_temperature == 0.07
    assert list(cfg.optim.betas) == [0.9, 0.98] and cfg.optim.eps == 1e-6 and cfg.optim.weight_decay == 0.01
    assert cfg.optim.base_lr == 1e-4 and cfg.trainer.max_epochs == 7 and cfg.data.batch_size == 256
    assert list(cfg.data.crop_scale) == [0.9, 1.0] and cfg.data.color_jitter == 0.4 and cfg.data.max_text_len == 64


def test_overrides_are_typed():
    cfg = load_config("quickstart", ["trainer.max_epochs=1", "model.dropout=0.1", "resume=latest"])
    assert cfg.trainer.max_epochs == 1 and cfg.model.dropout == 0.1 and cfg.resume == "latest"


@pytest.mark.parametrize("name,overrides,expected", [
    ("training/s_smk", [], "nearest valid choices: training/s_smke"),
    ("quickstart", ["trainer.max_epoch=3"], "nearest valid keys: trainer.max_epochs"),
    ("quickstart", ["trainer.max_epochs=abc"], "wrong type for 'trainer.max_epochs'"),
    ("quickstart", ["base_dir"], "not of the form key=value"),
])
def test_bad_input_is_one_clear_error(name, overrides, expected):
    with pytest.raises(EvlpError, match=expected):
        load_config(name, overrides)


def test_cli_error_is_one_line_and_exit_2(capsys):
    assert main(["info", "--config", "training/nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("evlp: error: unknown config 'training/nope'") and "\n" not in err


def test_info_reports_the_student_parameter_count():
    out = subprocess.run([sys.executable, "-m", "evlp.cli", "info", "--config", "training/s_smke", "--json"],
                         capture_output=True, text=True, check=True).stdout
    info = json.loads(out)
    assert info["student"]["total"] == 117_318_146
    assert info["student"]["image_tower"]["params"] == 43_270_656
    assert info["student"]["text_tower"]["params"] == 66_364_416
    assert info["student"]["shared_block"]["params"] == 7_088_640
    assert info["student"]["trainable"] == 117_318_146 - 196 * 768  # fixed sin-cos positions
