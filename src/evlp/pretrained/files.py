"""Reading weight files: what a file is and what it holds, without running code from it and with one-line errors.

The formats evlp reads (``detect_format`` names them):

==================  ===================================================  ==============================================
format              file                                                 container
==================  ===================================================  ==============================================
data2vec2-fairseq   fairseq Data2Vec 2.0 image checkpoint                ``torch.save`` zip; a trainer dict, weights
                    (``base_imagenet.pt``)                               under ``['model']``, config under ``['cfg']``
beitv2-unilm        unilm BEiT v2 pretraining checkpoint                 ``torch.save`` zip; ``{'model': state_dict}``
                    (``beitv2_base_patch16_224_pt1k.pth``)
evlp-safetensors    a tower written by ``evlp weights convert``          safetensors; the architecture as JSON under
                                                                         the header metadata key ``'evlp'``
hf-bert             a Hugging Face BERT folder                           ``config.json`` (``model_type: bert``), the
                                                                         weights and the tokenizer files
==================  ===================================================  ==============================================

``.pt/.pth`` files are read with ``torch.load(weights_only=True)``; a file that refuses (fairseq's pickles numpy
scalars and fairseq objects) is read again with the restricted unpickler of ``evlp.pretrained.safe_pickle``. Before
either, the first bytes are sniffed so that an empty file, an HTML error page saved under a ``.pt`` name or a
truncated download is reported as such instead of as a pickle or zip error.
"""

from __future__ import annotations

import json
import pickle
import re
import warnings
import zipfile
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from evlp.errors import EvlpError
from evlp.pretrained.safe_pickle import restricted_pickle_module

FORMAT_NAMES = {
    "data2vec2-fairseq": "a fairseq Data2Vec2 image checkpoint (base_imagenet.pt)",
    "beitv2-unilm": "a unilm BEiTv2 checkpoint (beitv2_base_patch16_224_pt1k.pth)",
    "evlp-safetensors": "a tower converted by `evlp weights convert`",
    "hf-bert": "a Hugging Face BERT folder",
}
METADATA_KEY = "evlp"  # safetensors header metadata key holding the architecture JSON of a converted tower


@dataclass
class WeightFile:
    """A weight file read into memory. ``content`` is the unpickled checkpoint, or a converted file's tensors."""

    path: Path
    format: str
    content: dict
    metadata: dict | None  # the architecture JSON of an evlp-safetensors file
    how: str  # how it was read, for `evlp weights check`


_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]")
# How torch.load's messages start the sentences that advise loading unsafely (weights_only=False, which would run
# a hostile file's code and does not help a corrupt one) or filing a torch issue: never repeated to our users.
_TORCH_ADVICE = ("In PyTorch 2.6", "This file can still be loaded", "(1)", "(2)", "Re-running `torch.load`",
                 "Please file an issue", "Check the documentation of torch.load")


def first_line(error: BaseException) -> str:
    """The first line of an error's message that says what is wrong: ANSI codes removed, and torch.load's advice
    to retry unsafely, its "file an issue" and its miniz boilerplate left out."""
    lines = [line.strip() for line in _ANSI.sub("", str(error)).splitlines()]
    if lines and lines[0].startswith("Weights only load failed."):
        lines[0] = lines[0].removeprefix("Weights only load failed.").strip()
        lines = [re.sub(r"\s*Please use `torch\.serialization.*", "", line.removeprefix("WeightsUnpickler error:")
                        .strip()) for line in lines if not line.startswith(_TORCH_ADVICE)]
    text = next((line for line in lines if line), "") or type(error).__name__
    return re.sub(r"\s*This is an internal miniz error.*", "", text)


def unpickling_refused(path, error: BaseException) -> EvlpError:
    """The one line for a file that ``torch.load(weights_only=True)`` refused to unpickle."""
    return EvlpError(f"refusing to unpickle {path}: it holds more than tensors ({first_line(error)}), and evlp never "
                     f"unpickles objects, which could run code; re-save its tensors with torch.save or safetensors "
                     f"from code you trust")


def clip(names, limit: int = 6) -> str:
    """``'a, b, c, ... (+9 more)'``: keeps a list of keys readable on one line."""
    names = list(names)
    shown = ", ".join(str(n) for n in names[:limit])
    return shown + (f", ... (+{len(names) - limit} more)" if len(names) > limit else "")


def describe(obj) -> str:
    """What an unpickled object looks like, for 'found X, expected Y' messages."""
    if isinstance(obj, dict):
        return f"a dict with keys [{clip(obj)}]"
    return f"a {type(obj).__module__}.{type(obj).__qualname__}"


# The legacy (non-zip) torch.save format starts with a pickled magic number, whatever the pickle protocol.
_LEGACY_MAGIC = tuple(pickle.dumps(0x1950A86A20F9469CFC6C, protocol=p) for p in range(2, pickle.HIGHEST_PROTOCOL + 1))


def sniff(path: Path) -> str:
    """'zip', 'pickle' or 'safetensors' from the first bytes, or an EvlpError saying what the file is instead."""
    size = path.stat().st_size
    if size == 0:
        raise EvlpError(f"{path} is empty (0 bytes), expected a checkpoint; download it again")
    with open(path, "rb") as f:
        head = f.read(1024)
    if head.startswith(b"PK\x03\x04"):  # torch.save's default format since 1.6 is a zip archive
        return "zip"
    if head.startswith(b"\x80"):  # a pickle: torch.save's legacy format if it starts with torch's magic number
        if head.startswith(_LEGACY_MAGIC):
            return "pickle"
        raise EvlpError(f"{path} is a Python pickle, not a torch.save checkpoint (no torch magic number); evlp reads "
                        f"torch.save files and safetensors: re-save its tensors with torch.save from code you trust")
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith((b"<!doctype html", b"<html", b"<?xml", b"<head", b"<body")) or b"<html" in text:
        raise EvlpError(f"{path} is an HTML page ({size:,} bytes), not a checkpoint: probably an error page saved "
                        f"by a failed download; download it again (evlp download weights)")
    # safetensors: a little-endian u64 header length, then the JSON header
    if len(head) > 8 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < size:
        return "safetensors"
    raise EvlpError(f"{path} is neither a PyTorch checkpoint nor a safetensors file ({size:,} bytes starting with "
                    f"{head[:16]!r})")


@contextmanager
def quiet_torch_load():
    """torch.load warns about pickle protocols it was not written with: noise next to our own one-line errors."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*pickle protocol.*", category=UserWarning)
        yield


def _torch_load(path: Path, zipped: bool) -> tuple[object, str]:
    try:
        with quiet_torch_load():
            return (torch.load(path, map_location="cpu", weights_only=True, mmap=zipped),
                    "torch.load(weights_only=True)")
    except pickle.UnpicklingError:
        pass  # it pickles more than tensors (fairseq does): read it with the restricted unpickler below
    except Exception as e:
        raise EvlpError(f"{path}: unreadable checkpoint ({first_line(e)}); download it again") from e
    replaced: set[str] = set()
    try:
        with quiet_torch_load():
            obj = torch.load(path, map_location="cpu", weights_only=False, mmap=zipped,
                             pickle_module=restricted_pickle_module(replaced))
    except Exception as e:
        raise EvlpError(f"{path}: unreadable checkpoint ({type(e).__name__}: {first_line(e)}); "
                        f"download it again") from e
    how = "restricted unpickler (torch.load(weights_only=True) refused it)"
    if replaced:
        how += f"; inert placeholders for {', '.join(sorted(replaced))}"
    return obj, how


def classify(obj) -> str | None:
    """The upstream format of an unpickled checkpoint, from its key names; None if it is neither."""
    state = obj.get("model") if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        return None
    if any(k.startswith("modality_encoders.") for k in state):
        return "data2vec2-fairseq"
    if any(k.startswith("rel_pos_bias.") or k.endswith(".attn.q_bias") for k in state):
        return "beitv2-unilm"
    return None


def _read_safetensors(path: Path) -> WeightFile:
    try:
        with safe_open(path, "pt") as f:
            header = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as e:
        raise EvlpError(f"{path}: truncated or corrupt safetensors file ({first_line(e)}); convert or download it "
                        f"again") from e
    if METADATA_KEY not in header:
        raise EvlpError(f"{path} is a safetensors file without evlp metadata; evlp reads safetensors files written "
                        f"by `evlp weights convert` (convert the upstream .pt/.pth file)")
    try:
        metadata = json.loads(header[METADATA_KEY])
    except json.JSONDecodeError as e:
        raise EvlpError(f"{path}: unreadable evlp metadata ({first_line(e)})") from e
    if not isinstance(metadata, dict):
        raise EvlpError(f"{path}: evlp metadata is a JSON {type(metadata).__name__}, expected an object")
    return WeightFile(path, "evlp-safetensors", state, metadata, "safetensors")


def read_weight_file(path: str | Path) -> WeightFile:
    """Read a ``.pt/.pth`` checkpoint or an evlp ``.safetensors`` file, and tell which format it is."""
    path = Path(path)
    if not path.exists():
        raise EvlpError(f"{path}: no such file")
    if path.is_dir():
        raise EvlpError(f"{path} is a folder, expected a checkpoint file")
    kind = sniff(path)
    if kind == "safetensors":
        return _read_safetensors(path)
    if kind == "zip":
        try:
            with zipfile.ZipFile(path) as archive:
                records = archive.namelist()
        except zipfile.BadZipFile as e:
            raise EvlpError(f"{path}: truncated or corrupt checkpoint ({path.stat().st_size:,} bytes, the zip archive "
                            f"has no end record); download it again") from e
        if not any(name.endswith("/data.pkl") for name in records):
            raise EvlpError(f"{path} is a zip archive but not a torch.save checkpoint (no data.pkl record)")
    obj, how = _torch_load(path, zipped=kind == "zip")
    fmt = classify(obj)
    if fmt is None:
        raise EvlpError(f"{path}: unknown checkpoint layout ({describe(obj)}); expected "
                        f"{FORMAT_NAMES['data2vec2-fairseq']} or {FORMAT_NAMES['beitv2-unilm']}")
    return WeightFile(path, fmt, obj, None, how)


def check_download(path: Path, expected: str) -> None:
    """EvlpError unless a downloaded checkpoint is whole and of the ``expected`` format.

    Neither upstream publishes a digest for its weight files, so this is what can be checked: the CRC-32 that the
    ``torch.save`` zip container stores for every record (all of them are read), then the checkpoint's own layout,
    read without running code. The size was checked against the server's Content-Length by the download.
    """
    if sniff(path) == "zip":
        try:
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
        except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as e:
            raise EvlpError(f"{path.name}: truncated or corrupt zip container ({first_line(e)})") from None
        if bad is not None:
            raise EvlpError(f"{path.name}: record {bad} fails its CRC-32 check (damaged in transit)")
    found = read_weight_file(path).format
    if found != expected:
        raise EvlpError(f"{path.name} is {found}, not {expected} ({FORMAT_NAMES[expected]})")


def bert_folder_problem(path: Path) -> str | None:
    """Why ``path`` is not a Hugging Face BERT folder, or None if it is one."""
    config = path / "config.json"
    if not config.is_file():
        return "no config.json"
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return f"unreadable config.json ({first_line(e)})"
    if model_type != "bert":
        return f"config.json says model_type {model_type!r}, not 'bert'"
    return None


def detect_format(path: str | Path) -> str:
    """The format of a weight file or folder: 'data2vec2-fairseq', 'beitv2-unilm', 'evlp-safetensors' or 'hf-bert'.

    Reads the file (safely, see ``evlp.pretrained.safe_pickle``); raises ``EvlpError`` saying what the path is when
    it is none of these.
    """
    path = Path(path)
    if path.is_dir():
        problem = bert_folder_problem(path)
        if problem:
            raise EvlpError(f"{path} is a folder but not {FORMAT_NAMES['hf-bert']} ({problem})")
        return "hf-bert"
    return read_weight_file(path).format
