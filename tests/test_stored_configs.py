"""Configs read back from files (a checkpoint's hyper_parameters, an export's config.json) are data: an
interpolation such as ``${oc.env:SECRET}`` in them is refused, never resolved, so no environment variable's value
can end up in an export, a model card or a hub upload."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import evlp
from evlp.api import load_model
from evlp.cli import main as evlp_main
from evlp.errors import EvlpError
from evlp.eval.checkpoint import read_student_checkpoint
from evlp.finetune.glue import load_text_classifier
from tests.api_support import FakeHub, TOY_EXPORT, toy_run  # noqa: F401  (toy_run: session fixture)

SECRET = "hunter2-not-for-the-hub"


@pytest.fixture
def crafted(toy_run, tmp_path, monkeypatch):
    """A real training checkpoint whose stored config was edited to read an environment variable."""
    monkeypatch.setenv("EVLP_TEST_SECRET", SECRET)
    ckpt = torch.load(toy_run[0], map_location="cpu", weights_only=True)
    cfg = ckpt["hyper_parameters"]["cfg"]
    cfg["run_name"] = "${oc.env:EVLP_TEST_SECRET}"
    cfg["model"]["image_tower"]["model_kwargs"] = {"note": "key ${oc.env:EVLP_TEST_SECRET,default}"}
    path = tmp_path / "crafted.ckpt"
    torch.save(ckpt, path)
    return path


def test_a_checkpoint_config_is_never_resolved_against_the_environment(crafted, tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants

    for load in (read_student_checkpoint, load_model, evlp.load):
        with pytest.raises(EvlpError, match=r"interpolation .*oc\.env.* refused") as info:
            load(crafted)
        assert SECRET not in str(info.value) and "\n" not in str(info.value)

    # `evlp export --push-to-hub`: one line, exit 2, nothing written, nothing uploaded.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_fake_token")
    out = tmp_path / "export"
    with FakeHub() as hub:
        code = evlp_main(["export", str(crafted), "--out", str(out), "--push-to-hub", "me/leak",
                          "--hub-endpoint", hub.endpoint])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "refused" in err and SECRET not in err
    assert not out.exists() and hub.commits == [] and hub.repos == []


def test_an_export_config_is_never_resolved_against_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("EVLP_TEST_SECRET", SECRET)
    folder = tmp_path / "export"
    shutil.copytree(TOY_EXPORT, folder)
    config = json.loads((folder / "config.json").read_text())
    config["model"]["text_tower"]["tokenizer"] = "${oc.env:EVLP_TEST_SECRET}"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(EvlpError, match=r"interpolation .*oc\.env.* refused") as info:
        load_model(folder)
    assert SECRET not in str(info.value)


def test_a_glue_checkpoint_config_is_never_resolved(tmp_path, monkeypatch):
    monkeypatch.setenv("EVLP_TEST_SECRET", SECRET)
    path = tmp_path / "glue.ckpt"
    torch.save({"state_dict": {"model.tower.x": torch.zeros(1)},
                "hyper_parameters": {"glue": {"task": "sst2", "num_heads": 2, "num_classes": 2, "max_len": 8},
                                     "cfg": {"run_name": "${oc.env:EVLP_TEST_SECRET}"}}}, path)
    with pytest.raises(EvlpError, match=r"interpolation .*oc\.env.* refused") as info:
        load_text_classifier(path)
    assert SECRET not in str(info.value)
