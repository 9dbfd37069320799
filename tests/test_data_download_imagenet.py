"""``evlp download imagenet`` / ``glue`` with the hub faked, and the ``download`` / ``data`` argument parsing."""

import argparse
import io
import tarfile

import httpx2  # the HTTP client of huggingface_hub, whose errors carry its responses
import pytest
from huggingface_hub.errors import GatedRepoError

import evlp.data.hub as hub
import evlp.pretrained.commands as pretrained
from evlp.data import commands
from evlp.data.imagenet import download_imagenet
from evlp.errors import EvlpError
from tests.needs import need_module
from tests.test_data_download import GOOD, fake_hub


def tar_gz(names: list[str]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name in names:
            data = GOOD["small.png"][0]
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


TRAIN_0 = ["n01440764_10026_n01440764.JPEG", "n01443537_2_n01443537.JPEG"]
TRAIN_1 = ["n01484850_7_n01484850.JPEG"]
VAL = ["ILSVRC2012_val_00000001_n01751748.JPEG", "ILSVRC2012_val_00000002_n09193705.JPEG"]
HUB_FILES = {  # laid out as the hub serves ILSVRC/imagenet-1k
    "data/train_images_0.tar.gz": tar_gz(TRAIN_0),
    "data/train_images_1.tar.gz": tar_gz(TRAIN_1),
    "data/val_images.tar.gz": tar_gz(VAL),
    "data/test_images.tar.gz": tar_gz(["ILSVRC2012_test_00000001.JPEG"]),
    "classes.py": b"IMAGENET2012_CLASSES = {}",
    "README.md": b"gated",
}


def test_imagenet_downloads_extracts_and_resumes(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(hub, "snapshot_download", fake_hub(HUB_FILES, calls))
    line = download_imagenet(tmp_path, token="hf_test")
    root = tmp_path / "imagenet"
    assert calls[0] == dict(repo_id="ILSVRC/imagenet-1k", repo_type="dataset", token="hf_test",
                            allow_patterns=["data/train_images_*", "data/val_images*"], ignore_patterns=[])
    assert sorted(p.name for p in (root / "train").iterdir()) == sorted(TRAIN_0 + TRAIN_1)
    assert sorted(p.name for p in (root / "val").iterdir()) == VAL
    assert not (root / "test").exists() and not list((root / "data").glob("*.tar.gz"))  # archives deleted
    assert "3 train, 2 val images" in line and "the full dataset has 1,281,167 train" in line

    # A rerun skips what was extracted: the hub is asked for nothing already done.
    download_imagenet(tmp_path)
    assert calls[1]["ignore_patterns"] == ["data/train_images_0.tar.gz", "data/train_images_1.tar.gz",
                                           "data/val_images.tar.gz"]


def test_imagenet_refuses_unsafe_archives_and_reports_hub_errors(tmp_path, monkeypatch):
    evil = io.BytesIO()
    with tarfile.open(fileobj=evil, mode="w:gz") as tar:
        info = tarfile.TarInfo("../../escaped.JPEG")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    monkeypatch.setattr(hub, "snapshot_download", fake_hub({"data/val_images.tar.gz": evil.getvalue()}, []))
    with pytest.raises(EvlpError, match="refusing to extract val_images.tar.gz"):
        download_imagenet(tmp_path)
    assert not (tmp_path / "escaped.JPEG").exists() and not (tmp_path.parent / "escaped.JPEG").exists()

    def gated(*args, **kwargs):
        request = httpx2.Request("GET", "https://huggingface.co/api/datasets/ILSVRC/imagenet-1k")
        raise GatedRepoError("403 Client Error: access to this repo is restricted",
                             response=httpx2.Response(403, request=request))

    monkeypatch.setattr(hub, "snapshot_download", gated)
    with pytest.raises(EvlpError, match=r"gated: accept its terms at https://huggingface.co/datasets/ILSVRC/imagenet"):
        download_imagenet(tmp_path / "other")


def test_glue_saves_each_task_to_disk(tmp_path, monkeypatch):
    datasets = need_module("datasets")
    asked = []

    def load_dataset(path, name):
        asked.append((path, name))
        return datasets.DatasetDict({
            "train": datasets.Dataset.from_dict({"sentence": ["a", "b"], "label": [0, 1], "idx": [0, 1]}),
            "validation": datasets.Dataset.from_dict({"sentence": ["c"], "label": [1], "idx": [0]}),
        })  # fmt: skip

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    from evlp.data.glue import download_glue

    lines = download_glue(tmp_path, ["cola", "sst2"])
    assert asked == [("nyu-mll/glue", "cola"), ("nyu-mll/glue", "sst2")]
    assert lines[0] == f"glue cola: train 2, validation 1 rows in {tmp_path / 'glue' / 'cola'}"
    saved = datasets.load_from_disk(str(tmp_path / "glue" / "sst2"))
    assert saved["train"]["sentence"] == ["a", "b"]
    assert download_glue(tmp_path, ["cola"]) == [f"glue cola: already in {tmp_path / 'glue' / 'cola'}"]
    assert len(asked) == 2
    with pytest.raises(EvlpError, match="unknown GLUE task 'sst'"):
        download_glue(tmp_path, ["sst"])


# -- argument parsing -----------------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="evlp")
    commands.register(p.add_subparsers(dest="command", required=True))
    return p


def test_download_weights_target_keeps_working(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr(pretrained, "download_weights", lambda path, base_url, convert: seen.update(
        path=path, base_url=base_url, convert=convert))
    args = parser().parse_args(["download", "weights", "--data-path", str(tmp_path), "--base-url", "http://m/",
                                "--convert"])
    assert args.handler(args) == 0
    assert seen == dict(path=str(tmp_path), base_url="http://m/", convert=True)


def test_download_targets_parse_their_options(tmp_path):
    p = parser()
    args = p.parse_args(["download", "cc3m", "--data-path", "/d", "--index", "x.tsv", "--concurrency", "32",
                         "--shard-size", "500", "--image-size", "0", "--timeout", "2.5"])
    assert (args.what, args.index, args.concurrency, args.shard_size, args.image_size, args.timeout, args.source) == \
        ("cc3m", "x.tsv", 32, 500, 0, 2.5, "web")
    args = p.parse_args(["download", "cc12m", "--data-path", "/d", "--source", "hub", "--repo", "me/cc12m"])
    assert (args.source, args.repo, args.index_url, args.max_rows) == ("hub", "me/cc12m", None, None)
    assert p.parse_args(["download", "cc12m", "--data-path", "/d", "--max-rows", "all"]).max_rows == "all"
    assert p.parse_args(["download", "cc12m", "--data-path", "/d", "--max-rows", "5000"]).max_rows == 5000
    args = p.parse_args(["download", "glue", "--data-path", "/d", "--task", "rte", "--task", "mrpc"])
    assert args.task == ["rte", "mrpc"]
    args = p.parse_args(["data", "convert", "pairs.csv", "--out", "/o", "--image-column", "file"])
    assert (args.input, args.out, args.image_column, args.caption_column) == ("pairs.csv", "/o", "file", None)
    for bad in (["download", "cc3m", "--data-path", "/d", "--concurrency", "0"],
                ["download", "coco", "--data-path", "/d", "--image-size", "-1"],
                ["download", "mnist", "--data-path", "/d"],
                ["download", "cc12m", "--data-path", "/d", "--max-rows", "everything"],
                ["download", "cc12m", "--data-path", "/d", "--max-rows", "0"]):
        with pytest.raises(SystemExit):
            p.parse_args(bad)

    # A missing CC3M index is a one-line error naming the official page (what the CLI prints).
    args = p.parse_args(["download", "cc3m", "--data-path", str(tmp_path)])
    with pytest.raises(EvlpError, match="ai.google.com/research/ConceptualCaptions/download"):
        args.handler(args)
