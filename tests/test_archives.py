"""Archive extraction under attack: crafted .tar.gz and .zip files against ``evlp.data.archives`` and its callers.

Each archive here is a real file built the way an attacker would build it; the extraction must refuse it before
anything lands outside the target folder, whatever the Python version (tarfile's own ``data`` filter is bypassable
before 3.11.13 / 3.12.11 / 3.13.4: CVE-2025-4517 and friends).
"""

from __future__ import annotations

import io
import os
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest

import evlp.data.archives as archives
import evlp.data.hub as hub
from evlp.data.archives import extract_tar, extract_zip
from evlp.data.coco import fetch_coco_files
from evlp.data.imagenet import download_imagenet
from evlp.errors import EvlpError
from tests.test_data_download import fake_hub, server  # noqa: F401 (server is a fixture)
from tests.test_data_download_coco import serve_coco, zip_bytes


def add(tar: tarfile.TarFile, name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", link: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def realpath_overflow_tar(path: Path, dest: Path, escape_to: Path) -> Path:
    """The CVE-2025-4517 construction: a chain of symlinks whose expansion passes PATH_MAX, so that
    ``os.path.realpath`` (which the data filter relies on) stops resolving; a link placed after it points anywhere,
    and a file written through it lands in ``escape_to``."""
    steps = "abcdefghijklmnop"
    # Long enough that the expanded chain plus the destination's own path passes PATH_MAX (4096) at the last link.
    component = "d" * ((4096 - len(str(dest.resolve())) - 1) // (len(steps) + 1))
    with tarfile.open(path, "w:gz") as tar:
        chain = ""
        for step in steps:
            add(tar, os.path.join(chain, component), tarfile.DIRTYPE)
            add(tar, os.path.join(chain, step), tarfile.SYMTYPE, link=component)
            chain = os.path.join(chain, component)
        overflow = os.path.join(*steps, "l" * 254)
        add(tar, overflow, tarfile.SYMTYPE, link=os.path.join(*[".."] * len(steps)))  # back to dest, unchecked
        up = os.path.relpath(escape_to, dest)
        add(tar, "escape", tarfile.SYMTYPE, link=os.path.join(overflow, up))
        add(tar, "escape/owned.JPEG", data=b"written outside the target folder")
    return path


def test_the_realpath_overflow_bypass_is_refused(tmp_path):
    dest = tmp_path / "imagenet" / "train"
    outside = tmp_path / "outside"
    outside.mkdir()
    archive = realpath_overflow_tar(tmp_path / "val_images.tar.gz", dest, outside)
    with pytest.raises(EvlpError, match=r"refusing to extract val_images.tar.gz: member 'a' is a symbolic link"):
        extract_tar(archive, dest)
    assert list(outside.iterdir()) == []


@pytest.mark.parametrize("kind, name, link, what", [
    (tarfile.SYMTYPE, "photo.JPEG", "/etc/passwd", "a symbolic link"),
    (tarfile.SYMTYPE, "inside.JPEG", "other.JPEG", "a symbolic link"),  # even one that stays inside
    (tarfile.LNKTYPE, "photo.JPEG", "/etc/passwd", "a hard link"),
    (tarfile.LNKTYPE, "inside.JPEG", "other.JPEG", "a hard link"),
    (tarfile.CHRTYPE, "null", "", "a character device"),
    (tarfile.BLKTYPE, "sda", "", "a block device"),
    (tarfile.FIFOTYPE, "pipe", "", "a FIFO"),
])
def test_tar_members_other_than_files_and_folders_are_refused(tmp_path, kind, name, link, what):
    archive = tmp_path / "x.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        add(tar, "other.JPEG", data=b"fine")
        add(tar, name, kind, link=link)
    with pytest.raises(EvlpError, match=f"refusing to extract x.tar.gz: member '{name}' is {what}"):
        extract_tar(archive, tmp_path / "out")
    assert not (tmp_path / "out" / name).exists() and not (tmp_path / "out" / name).is_symlink()


@pytest.mark.parametrize("name", ["/abs.JPEG", "../up.JPEG", "a/../../up.JPEG", "C:/win.JPEG", "a\\..\\..\\up"])
def test_tar_and_zip_names_leaving_the_target_are_refused(tmp_path, name):
    archive = tmp_path / "x.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        add(tar, name, data=b"bad")
    with pytest.raises(EvlpError, match="refusing to extract x.tar.gz: member .* outside"):
        extract_tar(archive, tmp_path / "out")
    zipped = tmp_path / "x.zip"
    zipped.write_bytes(zip_bytes({name: b"bad"}))
    with pytest.raises(EvlpError, match="refusing to extract x.zip: member .* outside"):
        extract_zip(zipped, tmp_path / "zout")
    assert not any(p.is_file() for p in tmp_path.rglob("*") if p.suffix not in (".gz", ".zip"))


def test_a_link_already_in_the_target_folder_is_not_followed(tmp_path):
    """The target folder may hold a symbolic link from earlier (another tool, a user): writing through it would
    put the file elsewhere."""
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "sub").symlink_to(outside)
    archive = tmp_path / "x.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        add(tar, "sub/owned.JPEG", data=b"bad")
    with pytest.raises(EvlpError, match="refusing to extract x.tar.gz: member 'sub/owned.JPEG' would land outside"):
        extract_tar(archive, dest)
    zipped = tmp_path / "x.zip"
    zipped.write_bytes(zip_bytes({"sub/owned.JPEG": b"bad"}))
    with pytest.raises(EvlpError, match="refusing to extract x.zip: member 'sub/owned.JPEG' would land outside"):
        extract_zip(zipped, dest)
    assert list(outside.iterdir()) == []


@pytest.mark.parametrize("mode, what", [(stat.S_IFLNK | 0o777, "a symbolic link"), (stat.S_IFIFO | 0o644, "a FIFO"),
                                        (stat.S_IFCHR | 0o644, "a character device")])
def test_zip_members_other_than_files_and_folders_are_refused(tmp_path, mode, what):
    special = zipfile.ZipInfo("train2014/special")
    special.create_system, special.external_attr = 3, mode << 16
    archive = tmp_path / "x.zip"
    archive.write_bytes(zip_bytes({"train2014/a.jpg": b"x"}, extra=[special]))
    with pytest.raises(EvlpError, match=f"refusing to extract x.zip: member 'train2014/special' is {what}"):
        extract_zip(archive, tmp_path / "out")


def test_decompression_bombs_are_refused_before_filling_the_disk(tmp_path, monkeypatch):
    zeros = b"\0" * (8 << 20)  # 8 MiB of zeros compress ~1000:1
    bomb = tmp_path / "bomb.tar.gz"
    with tarfile.open(bomb, "w:gz") as tar:
        for k in range(4):
            add(tar, f"zeros{k}.JPEG", data=zeros)
    zbomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(zbomb, "w", zipfile.ZIP_DEFLATED) as zf:
        for k in range(4):
            zf.writestr(f"zeros{k}.JPEG", zeros)
    assert bomb.stat().st_size < 200_000 and zbomb.stat().st_size < 200_000
    monkeypatch.setattr(archives, "MIN_BUDGET", 1 << 20)  # the floor that lets tiny archives through
    with pytest.raises(EvlpError, match=r"refusing to extract bomb.tar.gz: it would expand to more than"):
        extract_tar(bomb, tmp_path / "out")
    written = sum(p.stat().st_size for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert written <= 8 << 20  # stopped at the member that would pass the budget
    with pytest.raises(EvlpError, match=r"refusing to extract bomb.zip: it would expand to more than"):
        extract_zip(zbomb, tmp_path / "zout")
    assert not (tmp_path / "zout").exists()  # a zip's sizes are known up front: nothing is written

    monkeypatch.setattr(archives, "MAX_TOTAL", 10)  # the absolute cap, whatever the archive's size
    small = tmp_path / "small.zip"
    small.write_bytes(zip_bytes({"a.jpg": b"0123456789ab"}))
    with pytest.raises(EvlpError, match="refusing to extract small.zip: it would expand to more than 10 bytes"):
        extract_zip(small, tmp_path / "sout")


def test_ordinary_archives_still_extract(tmp_path):
    archive = tmp_path / "x.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        add(tar, "cifar", tarfile.DIRTYPE)
        add(tar, "cifar/data_batch_1", data=b"batch")
        add(tar, "./cifar/readme.html", data=b"<p>hi</p>")
    assert extract_tar(archive, tmp_path / "out") == 2
    assert (tmp_path / "out" / "cifar" / "data_batch_1").read_bytes() == b"batch"
    mode = (tmp_path / "out" / "cifar" / "readme.html").stat().st_mode
    assert stat.S_ISREG(mode) and not mode & (stat.S_ISUID | stat.S_ISGID | 0o022)


def test_a_crafted_imagenet_archive_writes_nothing_outside(tmp_path, monkeypatch):
    """The reported attack: a .tar.gz fed to `evlp download imagenet` that wrote a file four levels above
    imagenet/train."""
    target = tmp_path / "data" / "imagenet" / "train"
    above = tmp_path / "above"  # imagenet/train/../../../above
    above.mkdir()
    evil = tmp_path / "evil.tar.gz"
    realpath_overflow_tar(evil, target, above)
    monkeypatch.setattr(hub, "snapshot_download",
                        fake_hub({"data/train_images_0.tar.gz": evil.read_bytes()}, []))
    with pytest.raises(EvlpError, match="refusing to extract train_images_0.tar.gz"):
        download_imagenet(tmp_path / "data")
    assert list(above.iterdir()) == []
    assert not (tmp_path / "data" / "imagenet" / ".extracted" / "train_images_0.tar.gz").exists()


def test_a_corrupt_coco_zip_is_one_line_and_the_rerun_recovers(server, tmp_path):  # noqa: F811
    """A deflate stream damaged in the middle of a member: zipfile raises zlib.error (not BadZipFile)."""
    serve_coco(server)
    good = server.files["train2014.zip"]
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("train2014/", b"")
        zf.writestr("train2014/big.jpg", os.urandom(4000) + b"\0" * 200_000)
    data = bytearray(buffer.getvalue())
    start = data.index(b"big.jpg") + len(b"big.jpg")
    data[start + 4200 : start + 4300] = b"\xff" * 100  # inside the compressed run of zeros
    server.files["train2014.zip"] = bytes(data)

    root = tmp_path / "coco"
    with pytest.raises(EvlpError) as e:
        fetch_coco_files(tmp_path, base_url=f"{server.url}/files/")
    message = str(e.value)
    assert "\n" not in message and str(root / "train2014.zip") in message
    assert "damaged" in message and "delete it and rerun" in message
    assert sorted(p.name for p in root.iterdir()) == ["train2014.zip"]  # no half-extracted folder left behind

    # Doing what the line says recovers.
    (root / "train2014.zip").unlink()
    server.files["train2014.zip"] = good
    fetch_coco_files(tmp_path, base_url=f"{server.url}/files/")
    assert (root / "train2014").is_dir() and (root / "dataset_coco.json").is_file()
