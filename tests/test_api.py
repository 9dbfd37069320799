"""evlp.load / evlp.classify on a training checkpoint: the rebuilt student is the trained one; bad input is one line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

import evlp
from evlp.data.synthetic import generate_sample
from evlp.errors import EvlpError
from evlp.models.build import build_student
from evlp.train.checkpoint import load_training_checkpoint
from tests.api_support import toy_run  # noqa: F401  (session fixture)


def images(n: int, size: int = 32) -> list[Image.Image]:
    return [generate_sample(i, split="val", image_size=size).image for i in range(n)]


def test_import_evlp_stays_light():
    code = "import evlp, sys; print('torch' in sys.modules, sorted(set(evlp.__all__) - set(dir(evlp))))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False []"


def test_load_checkpoint_equals_the_trained_student(toy_run):
    ckpt_path, _ = toy_run
    model, preprocess, tokenizer = evlp.load(ckpt_path)
    assert not model.training

    # The reference: the student as training built it, with the checkpoint's weights.
    ckpt = load_training_checkpoint(ckpt_path)
    cfg = OmegaConf.create(ckpt["hyper_parameters"]["cfg"])
    reference = build_student(cfg.model, kd_dim=cfg.model.teacher.width, tokenizer=tokenizer.tokenizer,
                              load_weights=False)
    reference.load_state_dict({k[len("student."):]: v for k, v in ckpt["state_dict"].items()
                               if k.startswith("student.")})
    reference.eval()

    pixels = torch.stack([preprocess(im) for im in images(4)])
    assert pixels.shape == (4, 3, 32, 32)
    token_ids, padding_mask = tokenizer(["two small red circles at the top left", "a blue star"])
    assert token_ids.shape == padding_mask.shape == (2, 24) and padding_mask.dtype == torch.bool
    with torch.no_grad():
        image_embeddings = model.encode_image(pixels)
        text_embeddings = model.encode_text(token_ids, padding_mask)
        torch.testing.assert_close(image_embeddings, reference.encode_image(pixels), atol=1e-6, rtol=0)
        torch.testing.assert_close(text_embeddings, reference.encode_text(token_ids, padding_mask), atol=1e-6, rtol=0)
    torch.testing.assert_close(image_embeddings.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(text_embeddings.norm(dim=-1), torch.ones(2))


def test_classify_and_zero_shot_classifier(toy_run, tmp_path):
    model, preprocess, tokenizer = evlp.load(toy_run[0])
    assert evlp.zero_shot_classifier is evlp.eval.zero_shot_classifier
    classnames, templates = ["red", "green", "blue"], ["a picture of a {} shape.", "{} shapes."]
    pictures = images(3)
    path = tmp_path / "picture.png"
    pictures[0].save(path)

    results = evlp.classify(model, preprocess, tokenizer, pictures, classnames, templates)
    assert len(results) == 3 and all(label in classnames and 0 < p <= 1 for label, p in results)
    # The same answer from a path and from an already preprocessed batch.
    assert evlp.classify(model, preprocess, tokenizer, path, classnames, templates) == [results[0]]
    batch = torch.stack([preprocess(p) for p in pictures])
    for (label, p), (label2, p2) in zip(results, evlp.classify(model, preprocess, tokenizer, batch, classnames,
                                                               templates)):
        assert label == label2 and p == pytest.approx(p2, abs=1e-6)
    # CLIP's probabilities: softmax over classes of the learned scale times the cosines.
    with torch.no_grad():
        classifier = evlp.zero_shot_classifier(model, tokenizer, classnames, templates)
        probs = (model.logit_scales[-1].exp().clamp(max=100) * model.encode_image(batch) @ classifier).softmax(-1)
    assert [p for _, p in results] == pytest.approx(probs.max(-1).values.tolist(), abs=1e-6)


@pytest.mark.cuda
def test_load_on_gpu_matches_cpu(toy_run):
    cpu_model, preprocess, tokenizer = evlp.load(toy_run[0])
    gpu_model, _, _ = evlp.load(toy_run[0], device="cuda")
    pixels = torch.stack([preprocess(im) for im in images(4)])
    token_ids, padding_mask = tokenizer(["a red circle", "two green squares on the left"])
    with torch.no_grad():
        torch.testing.assert_close(gpu_model.encode_image(pixels.cuda()).cpu(), cpu_model.encode_image(pixels),
                                   atol=1e-4, rtol=0)
        torch.testing.assert_close(gpu_model.encode_text(token_ids.cuda(), padding_mask.cuda()).cpu(),
                                   cpu_model.encode_text(token_ids, padding_mask), atol=1e-4, rtol=0)


def one_line_error(path) -> str:
    with pytest.raises(EvlpError) as e:
        evlp.load(path)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_bad_input_is_one_line(tmp_path, toy_run):
    assert "does not exist" in one_line_error(tmp_path / "missing.ckpt")
    (tmp_path / "notes.ckpt").write_text("not a checkpoint")
    assert "cannot read checkpoint" in one_line_error(tmp_path / "notes.ckpt")
    # Readable torch files of the wrong kind: another model's weights, a student without its run config.
    torch.save({"state_dict": {"head.weight": torch.zeros(2, 2)}}, tmp_path / "other.ckpt")
    assert "holds no S-SMKE student" in one_line_error(tmp_path / "other.ckpt")
    ckpt = load_training_checkpoint(toy_run[0])
    del ckpt["hyper_parameters"]
    torch.save(ckpt, tmp_path / "no_config.ckpt")
    assert "has no run config" in one_line_error(tmp_path / "no_config.ckpt")
    (tmp_path / "weights.safetensors").write_bytes(b"")
    assert "pass the `evlp export` folder" in one_line_error(tmp_path / "weights.safetensors")
    # Folders: empty, and one whose config.json is someone else's.
    (tmp_path / "empty").mkdir()
    assert "is not an `evlp export` folder" in one_line_error(tmp_path / "empty")
    other = tmp_path / "hf_model"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (other / "model.safetensors").write_bytes(b"")
    assert "not an evlp export config" in one_line_error(other)
