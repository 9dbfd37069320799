"""Image classification fine-tuning (ImageNet, CIFAR-10/100) at toy size: end-to-end runs from the session's toy
S-SMKE checkpoint, CIFAR downloaded from a local server, corpus-level top-k, layer-wise lr decay, the frozen tower of
linear evaluation, and errors raised before training."""

import functools
import hashlib
import io
import json
import pickle
import threading
from dataclasses import replace
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import top_k_accuracy_score

from evlp.cli import main
from evlp.config import load_config
from evlp.data import classification
from evlp.data.classification import CIFAR, NumpyUnpickler, load_cifar, make_cifar_tarball
from evlp.errors import EvlpError
from evlp.eval.datasets import imagenet_synsets
from evlp.finetune.module import first_of_each
from evlp.finetune.runner import run_finetune
from evlp.finetune.source import load_pretrained
from evlp.finetune.vision import (VisionModule, build_task, eval_transform, load_classifier,
                                  soft_target_cross_entropy, topk_hits)
from evlp.models.heads import ImageClassifier
from evlp.models.image import Data2Vec2ImageTower
from evlp.train.checkpoint import load_training_checkpoint
from tests.api_support import toy_run  # noqa: F401

SYNSETS = imagenet_synsets()[:3]
# The toy checkpoint's tower takes 32x32 images; two training batches of 4, one validation pass.
TINY = ["data.image_size=32", "data.batch_size=4", "data.eval_batch_size=4", "data.num_workers=0",
        "data.limit_train_samples=8", "trainer.max_epochs=1", "trainer.accelerator=cpu", "trainer.devices=1",
        "trainer.precision=32-true", "trainer.progress_bar=false", "trainer.log_every_n_steps=1"]


def vision_cfg(name, base, checkpoint, *extra):
    return load_config(f"fine_tuning/{name}", [f"base_dir={base}", f"model.model_path={checkpoint}", *TINY, *extra])


@pytest.fixture(scope="module")
def imagenet_dir(tmp_path_factory):
    """``imagenet/{train,val}`` in the flat layout: 3 synsets, 4 training and 2 validation images each (one grey)."""
    base = tmp_path_factory.mktemp("imagenet_data")
    rng = np.random.default_rng(0)
    for split, per_class in (("train", 4), ("val", 2)):
        folder = base / "imagenet" / split
        folder.mkdir(parents=True)
        for c, synset in enumerate(SYNSETS):
            for i in range(per_class):
                pixels = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
                pixels[..., c] = 255  # a colour per class
                image = Image.fromarray(pixels)
                if (c, i) == (1, 0):
                    image = image.convert("L")
                name = f"{synset}_{i}_{synset}.JPEG" if split == "train" else f"ILSVRC2012_val_{c}{i}_{synset}.JPEG"
                image.save(folder / name)
    return base


class CountingHandler(SimpleHTTPRequestHandler):
    requests: list

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.requests.append(self.path)
        super().do_GET()


@pytest.fixture(scope="module")
def cifar_server(tmp_path_factory):
    """A local mirror holding small CIFAR-10/100 tarballs in the official layout; yields (url, requests, md5s)."""
    root = tmp_path_factory.mktemp("cifar_mirror")
    md5 = {}
    for name in CIFAR:
        path = make_cifar_tarball(root / CIFAR[name].archive, name, images_per_file=12 if name == "cifar10" else 100)
        md5[name] = hashlib.md5(path.read_bytes()).hexdigest()
    requests = []
    handler = type("Handler", (CountingHandler,), {"requests": requests})
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}", requests, md5
    server.shutdown()
    server.server_close()


@pytest.fixture
def fixture_md5(monkeypatch, cifar_server):
    """The mirror's tarballs are not the official files: let their MD5s pass."""
    for name, digest in cifar_server[2].items():
        monkeypatch.setitem(CIFAR, name, replace(CIFAR[name], md5=digest))


def pretrained_tower_state(checkpoint):
    return {k: v.clone() for k, v in load_pretrained(checkpoint, keep="image").image_tower.state_dict().items()}


# ---------------------------------------------------------------------------------------------------------------
# End to end


def test_imagenet_full_finetune_end_to_end(toy_run, imagenet_dir, tmp_path):
    checkpoint, _ = toy_run
    cfg = vision_cfg("imagenet", tmp_path, checkpoint, f"data_path={imagenet_dir}")
    results = run_finetune(cfg)

    run_dir = tmp_path / "logs" / "imagenet_finetune"
    assert json.loads((run_dir / "results.json").read_text()) == results
    assert set(results["headline"]) == {"acc@1", "acc@5"} and results["steps"] == 2
    assert {"val/loss", "val/top1", "val/top5"} <= set(results["metrics"])
    assert results["headline"]["acc@1"] == results["metrics"]["val/top1"]
    p = results["protocol"]
    assert p["resolution"] == 32 and p["evaluation"] == "full" and p["layer_decay"] == 0.81
    assert (p["train_images"], p["val_images"], p["standard_splits"]) == (8, 6, False)
    assert p["mixup"]["cutmix_alpha"] == 1.0 and p["val_split"] == "val"
    assert "image_tower" in results["source"] and "full fine-tuning" in results["source"]
    assert (run_dir / "report.md").is_file()

    # The best checkpoint reads with weights_only=True and loads strictly, into the training module and on its own.
    best = load_training_checkpoint(results["best"]["checkpoint"])
    task = build_task(cfg)
    assert task.module.model.tower.training  # full fine-tuning trains the tower in training mode
    task.module.load_state_dict(best["state_dict"], strict=True)
    model, info = load_classifier(results["best"]["checkpoint"])
    assert info == {"num_classes": 1000, "image_size": 32, "eval_crop_pct": 0.875, "pooling": "mean",
                    "task": "imagenet"}

    # The reported metrics are those of a plain top-k count over the whole validation set.
    transform = eval_transform(info["image_size"], info["eval_crop_pct"])
    files = sorted((imagenet_dir / "imagenet" / "val").iterdir())
    images = torch.stack([transform(Image.open(f).convert("RGB")) for f in files])
    labels = np.array([SYNSETS.index(f.stem.rsplit("_", 1)[1]) for f in files])
    with torch.no_grad():
        logits = model(images).numpy()
        task.module.eval()
        assert np.allclose(task.module(images).numpy(), logits, atol=1e-5)
    for k in (1, 5):
        expected = 100 * top_k_accuracy_score(labels, logits, k=k, labels=range(1000))
        assert results["metrics"][f"val/top{k}"] == pytest.approx(expected, abs=1e-4)
    loss = torch.nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels))
    assert results["metrics"]["val/loss"] == pytest.approx(float(loss), rel=1e-4)


def test_linear_evaluation_trains_the_head_only(toy_run, imagenet_dir, tmp_path):
    checkpoint, _ = toy_run
    cfg = vision_cfg("imagenet", tmp_path, checkpoint, f"data_path={imagenet_dir}", "model.linear_classifier=true")
    task = build_task(cfg)
    model = task.module.model
    head = {id(p) for m in (model.norm, model.head) for p in m.parameters()}
    assert {id(p) for g in task.module.param_groups() for p in g["params"]} == head
    assert not any(p.requires_grad for p in model.tower.parameters())
    task.module.train()
    assert not model.tower.training and model.head.training

    results = run_finetune(cfg)
    assert results["protocol"]["evaluation"] == "linear" and results["protocol"]["layer_decay"] is None
    best = load_training_checkpoint(results["best"]["checkpoint"])
    tuned = {k.removeprefix("model.tower."): v for k, v in best["state_dict"].items() if k.startswith("model.tower.")}
    before = pretrained_tower_state(checkpoint)
    assert tuned.keys() == before.keys()
    assert all(torch.equal(tuned[k], before[k]) for k in before)
    # ... while the head did train, and the optimizer only ever held the head.
    assert not torch.equal(best["state_dict"]["model.norm.weight"], torch.ones_like(best["state_dict"]["model.norm.weight"]))
    held = sum(len(g["params"]) for g in best["optimizer_states"][0]["param_groups"])
    assert held == len(head)


def test_an_upstream_data2vec2_file_is_a_starting_point(imagenet_dir, tmp_path):
    # The 4-block, 32-wide fairseq fixture of tests/fixtures/pretrained, at its own 224 px.
    d2v = Path(__file__).parent / "fixtures" / "pretrained" / "data2vec2_fairseq_tiny.pt"
    cfg = vision_cfg("imagenet", tmp_path, d2v, f"data_path={imagenet_dir}", "data.image_size=224")
    task = build_task(cfg)
    assert task.summary.startswith("loaded the Data2Vec2 image tower (4 blocks")
    assert {g["lr_scale"] for g in task.module.param_groups()} == {0.81 ** k for k in range(6)}
    images, labels, _ = next(iter(task.val_loaders))
    assert images.shape == (4, 3, 224, 224) and task.module(images).shape == (4, 1000)


def test_cifar10_downloads_from_a_mirror_and_finetunes_through_the_cli(toy_run, cifar_server, fixture_md5,
                                                                       tmp_path, capsys):
    checkpoint, _ = toy_run
    url, requests, _ = cifar_server
    requests.clear()
    argv = ["finetune", "--config", "fine_tuning/cifar10", f"base_dir={tmp_path}", f"model.model_path={checkpoint}",
            f"data.download_url={url}", "trainer.max_steps=2", "data.limit_val_samples=10", *TINY]
    assert main(argv) == 0
    assert requests == ["/cifar-10-python.tar.gz"]
    folder = tmp_path / "cifar10" / "cifar-10-batches-py"
    assert sorted(p.name for p in (tmp_path / "cifar10").iterdir()) == ["cifar-10-batches-py"]  # tarball removed
    assert (folder / "test_batch").is_file()
    results = json.loads((tmp_path / "logs" / "cifar10_finetune" / "results.json").read_text())
    assert results["protocol"]["val_split"] == "test" and results["protocol"]["val_images"] == 10
    assert results["protocol"]["train_images"] == 8 and results["steps"] == 2
    assert "val/top1" in capsys.readouterr().out

    # A second run finds the data in place and downloads nothing.
    assert main([*argv, "run_name=again"]) == 0
    assert requests == ["/cifar-10-python.tar.gz"]


def test_cifar100_fine_labels_and_a_wrong_checksum(cifar_server, fixture_md5, tmp_path, monkeypatch):
    url, _, _ = cifar_server
    classification.download_cifar(tmp_path, "cifar100", url)
    train, test = load_cifar(tmp_path, "cifar100", "train"), load_cifar(tmp_path, "cifar100", "test")
    assert train.pixels.shape == (100, 32, 32, 3) and train.pixels.dtype == np.uint8
    assert sorted(set(train.labels)) == list(range(100)) and len(test) == 100

    monkeypatch.setitem(CIFAR, "cifar10", replace(CIFAR["cifar10"], md5="0" * 32))
    with pytest.raises(EvlpError, match="not the official cifar-10-python.tar.gz"):
        classification.download_cifar(tmp_path / "other", "cifar10", url)
    assert not (tmp_path / "other" / "cifar10" / "cifar-10-python.tar.gz").exists()


def test_cifar_batches_are_read_without_running_code(tmp_path):
    class Exploit:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": [Exploit()]}, protocol=2))
    with pytest.raises(EvlpError, match=r"builtin__\.print is not allowed"):
        classification.read_cifar_batch(path)
    for protocol in (2, 4, 5):  # numpy arrays as Python 2 (the official files), 3 and numpy 2 pickle them
        batch = {b"data": np.arange(6, dtype=np.uint8).reshape(1, 6), b"labels": [3]}
        out = NumpyUnpickler(io.BytesIO(pickle.dumps(batch, protocol=protocol)), encoding="bytes").load()
        assert np.array_equal(out[b"data"], batch[b"data"]) and out[b"labels"] == [3]
    with pytest.raises(pickle.UnpicklingError, match="object array"):
        NumpyUnpickler(io.BytesIO(pickle.dumps(np.array([None]), protocol=2)), encoding="bytes").load()


# ---------------------------------------------------------------------------------------------------------------
# Pieces


@pytest.mark.parametrize("name, classes, decay", [("imagenet", 1000, 0.81), ("cifar10", 10, 0.75),
                                                  ("cifar100", 100, 0.75)])
def test_configs_hold_the_thesis_table(name, classes, decay):
    cfg = load_config(f"fine_tuning/{name}")
    assert (cfg.task, cfg.run_name, cfg.model.num_classes, cfg.model.layer_decay) == (name, f"{name}_finetune",
                                                                                      classes, decay)
    assert not cfg.model.linear_classifier and cfg.model.pooling == "mean" and cfg.data.image_size == 224
    assert cfg.trainer.max_epochs == 15 and cfg.data.batch_size == 256
    o = cfg.optim
    assert (o.lr, list(o.betas), o.eps, o.weight_decay, o.schedule, o.warmup_fraction) == (
        1e-3, [0.9, 0.999], 1e-8, 0.01, "cosine", 0.1)
    a = cfg.augment
    assert (a.mixup_alpha, a.cutmix_alpha, a.mixup_prob, a.mixup_switch_prob, a.label_smoothing) == (
        0.8, 1.0, 0.9, 0.5, 0.1)
    assert (a.auto_augment, a.reprob, a.remode, a.recount) == ("rand-m9-mstd0.5-inc1", 0.25, "pixel", 1)


def test_topk_counts_each_sample_once_and_match_sklearn():
    torch.manual_seed(0)
    logits, labels = torch.randn(50, 10), torch.randint(0, 10, (50,))
    # A DistributedSampler on 3 ranks pads 50 samples to 51 by repeating sample 0.
    index = torch.cat([torch.arange(50), torch.tensor([0])])
    keep = first_of_each(index)
    hits = topk_hits(logits[index], labels[index])
    for k in (1, 5):
        ours = hits[k][keep].float().mean().item()
        assert ours == pytest.approx(top_k_accuracy_score(labels.numpy(), logits.numpy(), k=k, labels=range(10)))
    assert topk_hits(torch.randn(4, 3), torch.zeros(4, dtype=torch.long))[5].all()  # fewer classes than k


def test_soft_target_loss_sums_over_classes():
    logits = torch.randn(4, 1000)
    labels = torch.tensor([1, 2, 3, 4])
    one_hot = torch.nn.functional.one_hot(labels, 1000).float()
    assert soft_target_cross_entropy(logits, one_hot) == pytest.approx(
        torch.nn.functional.cross_entropy(logits, labels).item(), rel=1e-5)


def _module(depth, decay=0.81):
    tower = Data2Vec2ImageTower(img_size=32, patch_size=16, embed_dim=32, depth=depth, num_heads=2)
    cfg = load_config("fine_tuning/imagenet", [f"model.layer_decay={decay}"])
    return VisionModule(cfg, ImageClassifier(tower, 1000))


def test_layer_decay_groups_follow_the_thesis_table():
    module = _module(depth=6)
    groups = module.param_groups()
    names = {id(p): n for n, p in module.model.named_parameters()}
    layer_of = {}
    for g in groups:
        layer = int(g["name"].split("_")[1])
        assert g["lr_scale"] == pytest.approx(0.81 ** (7 - layer))
        for p in g["params"]:
            layer_of[names[id(p)]] = layer
    assert len(layer_of) == sum(p.requires_grad for p in module.parameters())  # every trained parameter, once
    assert "tower.pos_embed" not in layer_of  # fixed sin-cos positions do not train
    for name, layer in layer_of.items():
        if name.startswith(("norm.", "head.")):
            assert layer == 7, name
        elif name.startswith("tower.blocks."):
            assert layer == int(name.split(".")[2]) + 1, name
        else:
            assert name.split(".")[1] in ("cls_token", "patch_embed", "norm_pre") and layer == 0, name
    lrs = [float(f"{1e-3 * 0.81 ** (7 - layer):.1e}") for layer in range(8)]
    assert lrs == [2.3e-4, 2.8e-4, 3.5e-4, 4.3e-4, 5.3e-4, 6.6e-4, 8.1e-4, 1e-3]  # spec/thesis.md §2.2
    decayed = {g["name"]: g["weight_decay"] for g in groups}
    assert decayed["layer_0_no_decay"] == 0.0 and decayed["layer_3_decay"] == 0.01


def test_layer_ids_of_a_twelve_block_tower():
    model = _module(depth=12, decay=0.75).model
    assert model.layer_id("tower.blocks.0.attn.qkv.weight") == 1
    assert model.layer_id("tower.blocks.10.attn.qkv.weight") == 11
    assert model.layer_id("tower.blocks.11.mlp.fc2.bias") == 12
    assert model.layer_id("head.weight") == model.layer_id("norm.bias") == 13
    assert model.layer_id("tower.cls_token") == 0
    scales = {g["name"]: g["lr_scale"] for g in _module(depth=12, decay=0.75).param_groups()}
    assert scales["layer_11_decay"] == pytest.approx(0.75 ** 2) and scales["layer_13_decay"] == 1.0


def test_head_initialisation_and_pooling():
    torch.manual_seed(0)
    tower = Data2Vec2ImageTower(img_size=32, patch_size=16, embed_dim=32, depth=1, num_heads=2)
    model = ImageClassifier(tower, 1000)
    w = model.head.weight
    assert w.abs().max() <= 0.04 and 0.015 < w.std() < 0.02 and not model.head.bias.any()
    images = torch.randn(2, 3, 32, 32)
    tokens = tower.forward_features(images)
    assert torch.allclose(model.features(images), tokens[:, 1:].mean(1))
    model.pooling = "cls"
    assert torch.allclose(model.features(images), tokens[:, 0])


# ---------------------------------------------------------------------------------------------------------------
# Errors before training


def test_missing_data_and_wrong_checkpoints_are_refused_before_training(toy_run, tmp_path):
    checkpoint, _ = toy_run
    with pytest.raises(EvlpError, match=r"ImageNet train folder .*imagenet/train not found.*evlp download imagenet"):
        run_finetune(vision_cfg("imagenet", tmp_path, checkpoint))
    with pytest.raises(EvlpError, match=r"cifar10 train: .*data_batch_1 not found.*cifar-10-batches-py"):
        run_finetune(vision_cfg("cifar10", tmp_path, checkpoint, "data.download=false"))

    glue = tmp_path / "glue.ckpt"
    torch.save({"state_dict": {"model.text_tower.bert.embeddings.word_embeddings.weight": torch.zeros(4, 2),
                               "model.classifier.weight": torch.zeros(2, 2)}, "hyper_parameters": {}}, glue)
    with pytest.raises(EvlpError, match="starts from the image tower.*holds no S-SMKE student"):
        run_finetune(vision_cfg("cifar10", tmp_path, glue))
    with pytest.raises(EvlpError, match="data.image_size=224.*set data.image_size=32"):
        build_task(vision_cfg("cifar10", tmp_path, checkpoint, "data.image_size=224"))
    assert not (tmp_path / "models").exists() and not (tmp_path / "logs").exists()


def test_sweep_vision_runs_linear_then_full_on_each_dataset_and_writes_the_table(toy_run, imagenet_dir, cifar_server,
                                                                                fixture_md5, tmp_path):
    import shutil

    from evlp.finetune.sweep import run_sweep

    checkpoint, _ = toy_run
    shutil.copytree(imagenet_dir / "imagenet", tmp_path / "imagenet")
    rows, out = run_sweep("vision", [f"base_dir={tmp_path}", f"model.model_path={checkpoint}",
                                     f"data.download_url={cifar_server[0]}", "trainer.max_steps=1",
                                     "data.limit_val_samples=6", *TINY])
    assert [(r["task"], r["run_name"], r["status"]) for r in rows] == [
        ("imagenet", "imagenet_finetune_linear", "ok"), ("imagenet", "imagenet_finetune", "ok"),
        ("cifar100", "cifar100_finetune_linear", "ok"), ("cifar100", "cifar100_finetune", "ok"),
        ("cifar10", "cifar10_finetune_linear", "ok"), ("cifar10", "cifar10_finetune", "ok")]
    table = (out / "summary.md").read_text().splitlines()
    assert "| Dataset | Resolution | finetune acc@1 | lin eval acc@1 | #params |" in table
    for task in ("imagenet", "cifar100", "cifar10"):
        full, linear = (json.loads((tmp_path / "logs" / f"{task}_finetune{s}" / "results.json").read_text())
                        for s in ("", "_linear"))
        row = (f"| {task} | 32x32 | {full['headline']['acc@1']:.2f} | {linear['headline']['acc@1']:.2f} | "
               f"{full['parameters'] / 1e6:.1f}M |")
        assert row in table
