"""``evlp download coco`` / ``flickr30k`` from fixture zips served on 127.0.0.1, and safe archive extraction."""

import io
import json
import tarfile
import zipfile
from collections import Counter
from pathlib import Path

import pytest

from evlp.data.archives import extract_tar, extract_zip
from evlp.data.coco import download_coco, download_flickr30k
from evlp.errors import EvlpError
from tests.test_data_download import encode, photo, read_pairs, server  # noqa: F401 (server is a fixture)

# Karpathy-format images: (split, folder, cocoid, number of captions). 3 images in train + restval, 1 val, 2 test.
COCO_IMAGES = [("train", "train2014", 9, 5), ("restval", "val2014", 42, 6), ("train", "train2014", 25, 5),
               ("val", "val2014", 73, 5), ("test", "val2014", 74, 5), ("test", "val2014", 75, 4)]


def coco_name(folder: str, cocoid: int) -> str:
    return f"COCO_{folder}_{cocoid:012d}.jpg"


def karpathy(images: list[dict], dataset: str) -> bytes:
    return json.dumps({"images": images, "dataset": dataset}).encode()


def coco_annotations() -> list[dict]:
    images, sentid = [], 0
    for imgid, (split, folder, cocoid, n) in enumerate(COCO_IMAGES):
        sentences = []
        for k in range(n):
            sentences.append({"raw": f"Image {cocoid} caption {k}. ", "tokens": [], "imgid": imgid, "sentid": sentid})
            sentid += 1
        images.append({"filepath": folder, "filename": coco_name(folder, cocoid), "imgid": imgid, "split": split,
                       "sentences": sentences, "cocoid": cocoid, "sentids": [s["sentid"] for s in sentences]})
    return images


def zip_bytes(members: dict[str, bytes], extra: list[zipfile.ZipInfo] = ()) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        for info in extra:
            zf.writestr(info, b"payload")
    return buffer.getvalue()


def serve_coco(server, flickr_images: list[dict] | None = None) -> None:
    for folder in ("train2014", "val2014"):
        members = {f"{folder}/": b""}
        for i, (_, f, cocoid, _) in enumerate(COCO_IMAGES):
            if f == folder:
                members[f"{folder}/{coco_name(folder, cocoid)}"] = encode(photo(320 + i, 300, seed=i), "JPEG")
        server.files[f"{folder}.zip"] = zip_bytes(members)
    server.files["caption_datasets.zip"] = zip_bytes({
        "dataset_coco.json": karpathy(coco_annotations(), "coco"),
        "dataset_flickr30k.json": karpathy(flickr_images or [], "flickr30k"),
        "dataset_flickr8k.json": karpathy([], "flickr8k"),
    })  # fmt: skip


def test_coco_downloads_extracts_and_writes_karpathy_shards(server, tmp_path):
    serve_coco(server)
    results = download_coco(tmp_path, base_url=f"{server.url}/files/", shard_size=4, workers=2)
    root = tmp_path / "coco"

    # The raw layout evaluation reads; archives removed, nothing else left behind.
    assert sorted(p.name for p in (root / "train2014").iterdir()) == [coco_name("train2014", 9),
                                                                      coco_name("train2014", 25)]
    assert len(list((root / "val2014").iterdir())) == 4
    assert json.loads((root / "dataset_coco.json").read_text())["images"] == coco_annotations()
    assert sorted(p.name for p in root.iterdir()) == ["dataset_coco.json", "shards", "train2014", "val2014"]

    expected = {"train": [9, 42, 25], "val": [73], "test": [74, 75]}
    captions = {cocoid: n for _, _, cocoid, n in COCO_IMAGES}
    for split, result in zip(("train", "val", "test"), results):
        pairs = read_pairs(str(root / "shards" / split), tmp_path)
        # One sample per caption, image_id = cocoid, captions stripped.
        assert Counter(p["image_id"] for p in pairs) == {c: captions[c] for c in expected[split]}
        assert {p["caption"] for p in pairs} == {f"Image {c} caption {k}." for c in expected[split]
                                                 for k in range(captions[c])}
        assert result.succeeded == len(pairs) and result.failed == Counter()
        stats = json.loads((root / "shards" / split / "stats.json").read_text())
        assert stats["num_samples"] == len(pairs)

    # Caption-major order within a block of 4 images: the first shard holds one caption of each train image.
    train = read_pairs(str(root / "shards" / "train" / "000000.tar"), tmp_path)
    assert [p["image_id"] for p in train] == [9, 42, 25, 9]
    assert [p["caption"] for p in train[:3]] == ["Image 9 caption 0.", "Image 42 caption 0.", "Image 25 caption 0."]

    # A rerun finds everything in place: no request, nothing rewritten.
    server.log.clear()
    results = download_coco(tmp_path, base_url=f"{server.url}/files/", shard_size=4, workers=2)
    assert server.log == [] and all(r.attempted == 0 for r in results)


def test_zip_members_leaving_the_target_are_refused(server, tmp_path):
    link = zipfile.ZipInfo("train2014/link.jpg")
    link.external_attr = (0o120777 << 16)  # a symbolic link
    cases = {
        "../evil.txt": zip_bytes({"train2014/a.jpg": b"x", "../evil.txt": b"owned"}),
        "/tmp/abs.txt": zip_bytes({"/tmp/abs.txt": b"owned"}),
        "symbolic link": zip_bytes({"train2014/a.jpg": b"x"}, extra=[link]),
    }
    for what, data in cases.items():
        archive = tmp_path / "bad.zip"
        archive.write_bytes(data)
        with pytest.raises(EvlpError, match="refusing to extract"):
            extract_zip(archive, tmp_path / "out")
        assert not (tmp_path / "evil.txt").exists(), what
        assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.txt"))

    # Through the command: the served train2014.zip carries a ../evil member.
    serve_coco(server)
    server.files["train2014.zip"] = cases["../evil.txt"]
    with pytest.raises(EvlpError, match="refusing to extract train2014.zip: member '../evil.txt'"):
        download_coco(tmp_path / "data", base_url=f"{server.url}/files/")
    assert not (tmp_path / "data" / "evil.txt").exists() and not (tmp_path / "data" / "coco" / "train2014").exists()


def test_tar_members_leaving_the_target_are_refused(tmp_path):
    def tar_with(info: tarfile.TarInfo) -> Path:
        archive = tmp_path / "bad.tar.gz"
        with tarfile.open(archive, "w:gz") as tar:
            info.size = 0 if info.issym() else 3
            tar.addfile(info, None if info.issym() else io.BytesIO(b"bad"))
        return archive

    with pytest.raises(EvlpError, match="refusing to extract bad.tar.gz"):
        extract_tar(tar_with(tarfile.TarInfo("../evil.JPEG")), tmp_path / "out")
    assert not (tmp_path / "evil.JPEG").exists()
    link = tarfile.TarInfo("link.JPEG")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    with pytest.raises(EvlpError, match="refusing to extract bad.tar.gz"):
        extract_tar(tar_with(link), tmp_path / "out")
    # An absolute name is refused too (not silently made relative), whatever the Python version.
    with pytest.raises(EvlpError, match="refusing to extract bad.tar.gz: member '/abs.JPEG' would land outside"):
        extract_tar(tar_with(tarfile.TarInfo("/abs.JPEG")), tmp_path / "out")
    assert not (tmp_path / "out" / "abs.JPEG").exists()

    damaged = tmp_path / "damaged.tar.gz"
    damaged.write_bytes(b"\x1f\x8b\x08\x00" + b"junk" * 20)
    with pytest.raises(EvlpError, match="damaged"):
        extract_tar(damaged, tmp_path / "out")


def flickr_annotations(ids: list[int]) -> list[dict]:
    splits = ["train", "train", "val", "test"]
    return [{"filename": f"{fid}.jpg", "imgid": i, "split": splits[i], "sentids": [2 * i, 2 * i + 1],
             "sentences": [{"raw": f"flickr {fid} says {k}", "sentid": 2 * i + k, "imgid": i} for k in range(2)]}
            for i, fid in enumerate(ids)]


def test_flickr30k_needs_the_user_images_then_writes_shards(server, tmp_path):
    ids = [1000092795, 10002456, 1000268201, 1000344755]
    serve_coco(server, flickr_annotations(ids))
    with pytest.raises(EvlpError, match=r"forms\.illinois\.edu/sec/229675"):
        download_flickr30k(tmp_path, base_url=f"{server.url}/files/")
    images = tmp_path / "flickr30k" / "flickr30k-images"
    images.mkdir(parents=True)
    for i, fid in enumerate(ids[:3]):  # the test image is missing: counted, not fatal
        (images / f"{fid}.jpg").write_bytes(encode(photo(200, 150, seed=i), "JPEG"))
    (images / f"{ids[3]}.jpg").write_bytes(b"<html>not a photo</html>")
    results = download_flickr30k(tmp_path, base_url=f"{server.url}/files/", shard_size=2, workers=1)
    root = tmp_path / "flickr30k"
    assert json.loads((root / "dataset_flickr30k.json").read_text())["images"] == flickr_annotations(ids)
    train = read_pairs(str(root / "shards" / "train"), tmp_path)
    assert [(p["image_id"], p["caption"]) for p in train] == [
        (ids[0], f"flickr {ids[0]} says 0"), (ids[1], f"flickr {ids[1]} says 0"),
        (ids[0], f"flickr {ids[0]} says 1"), (ids[1], f"flickr {ids[1]} says 1")]
    assert [p["image_id"] for p in read_pairs(str(root / "shards" / "val"), tmp_path)] == [ids[2]] * 2
    test_result = results[2]
    assert test_result.succeeded == 0 and test_result.failed == Counter(not_an_image=2)
    assert "0 of 2 rows" in test_result.line()


def test_images_missing_altogether_is_an_error(server, tmp_path):
    serve_coco(server, flickr_annotations([1, 2, 3, 4]))
    nested = tmp_path / "flickr30k" / "flickr30k-images" / "flickr30k-images"
    nested.mkdir(parents=True)
    with pytest.raises(EvlpError, match="nested one level deeper"):
        download_flickr30k(tmp_path, base_url=f"{server.url}/files/")


def test_bad_karpathy_file_is_a_clear_error(tmp_path):
    from evlp.data.coco import load_karpathy

    path = Path(tmp_path / "dataset_coco.json")
    path.write_text(json.dumps({"images": [{"filename": "a.jpg", "split": "train", "sentences": [{"raw": 3}]}]}))
    with pytest.raises(EvlpError, match="not a Karpathy split file"):
        load_karpathy(path)
