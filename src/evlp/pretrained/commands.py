"""``evlp weights {check,convert}`` and the body of ``evlp download weights``.

``register(subparsers)`` adds the ``weights`` command to the ``evlp`` parser; each handler takes the parsed arguments,
prints, and returns an exit code (user problems raise ``EvlpError``). ``download_weights`` is what
``evlp download weights --data-path DIR [--base-url URL] [--convert]`` runs.

    evlp weights check models/base_imagenet.pt      # format, architecture, parameters, does it load
    evlp weights convert models/base_imagenet.pt    # -> models/base_imagenet.pt.safetensors, preferred by loads
"""

from __future__ import annotations

import argparse
from pathlib import Path

from evlp.errors import EvlpError
from evlp.pretrained.bert import load_bert
from evlp.pretrained.download import download_file, sha256_file
from evlp.pretrained.files import check_download, detect_format, read_weight_file
from evlp.pretrained.loaders import convert_checkpoint, tower_from_file

# The two upstream files, under the names the configs expect in <base_dir>/models/. Neither upstream publishes a
# sha256 (docs/security.md): a download is checked by its container's CRCs and its layout (files.check_download).
WEIGHT_FORMATS = {"base_imagenet.pt": "data2vec2-fairseq", "beitv2_base_patch16_224_pt1k.pth": "beitv2-unilm"}
WEIGHT_URLS = {
    "base_imagenet.pt": "https://dl.fbaipublicfiles.com/fairseq/data2vec2/base_imagenet.pt",
    "beitv2_base_patch16_224_pt1k.pth":
        "https://github.com/addf400/files/releases/download/BEiT-v2/beitv2_base_patch16_224_pt1k.pth",
}


def _row(label: str, value) -> None:
    print(f"{label + ':':<14}{value}")


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _check_bert(path: Path) -> int:
    _row("format", detect_format(path))
    try:
        tower, tokenizer = load_bert(path)
    except EvlpError as e:
        _row("loads", f"no: {e}")
        return 1
    cfg = tower.bert.config
    _row("architecture", f"width {cfg.hidden_size}, depth {cfg.num_hidden_layers}, heads {cfg.num_attention_heads}, "
                         f"vocab {cfg.vocab_size:,}, max positions {cfg.max_position_embeddings}")
    _row("parameters", f"{_count(tower):,} ({type(tower).__name__}, without the pooler)")
    _row("tokenizer", f"{type(tokenizer).__name__}, {len(tokenizer):,} tokens")
    _row("loads", "yes")
    return 0


def cmd_weights_check(args: argparse.Namespace) -> int:
    path = Path(args.path)
    _row("path", path)
    if path.is_dir():
        return _check_bert(path)
    file = read_weight_file(path)
    _row("format", f"{file.format}, {path.stat().st_size:,} bytes, read with {file.how}")
    try:
        loaded = tower_from_file(file)
    except EvlpError as e:
        _row("loads", f"no: {e}")
        return 1
    _row("architecture", loaded.spec.describe())
    _row("parameters", f"{_count(loaded.tower):,} ({type(loaded.tower).__name__})")
    _row("dropped", "; ".join(f"{len(keys)} {reason}" for reason, keys in loaded.dropped.items()) or "nothing")
    _row("loads", "yes")
    return 0


def cmd_weights_convert(args: argparse.Namespace) -> int:
    out, loaded = convert_checkpoint(args.path, args.out)
    print(f"wrote {out}: {loaded.spec.kind}, {loaded.spec.describe()}, {_count(loaded.tower):,} parameters")
    return 0


def register(subparsers) -> None:
    """Add ``weights {check,convert}`` to the ``evlp`` sub-command parsers."""
    weights = subparsers.add_parser("weights", help="inspect and convert pretrained weight files")
    actions = weights.add_subparsers(dest="weights_command", required=True)

    check = actions.add_parser("check", help="detect a weight file's format and architecture, and try to load it")
    check.add_argument("path", help="a .pt/.pth checkpoint, a converted .safetensors file or a BERT folder")
    check.set_defaults(handler=cmd_weights_check)

    convert = actions.add_parser("convert", help="write an upstream checkpoint's tower as safetensors")
    convert.add_argument("path", help="base_imagenet.pt or beitv2_base_patch16_224_pt1k.pth")
    convert.add_argument("--out", default=None, help="output file (default: PATH.safetensors, which loads of PATH "
                         "then prefer)")
    convert.set_defaults(handler=cmd_weights_convert)


def download_weights(data_path: str | Path, base_url: str | None = None, convert: bool = False) -> list[Path]:
    """Fetch the Data2Vec2 and BEiTv2 checkpoints into ``<data_path>/models/`` (resuming partial downloads, checking
    each is whole and of the right format before it gets its name), print their sha256, and with ``convert`` also
    write their ``.safetensors``. ``base_url`` replaces the upstream locations (the file names are appended to it).
    Returns the checkpoint paths."""
    models = Path(data_path) / "models"
    paths = []
    for name, url in WEIGHT_URLS.items():
        if base_url:
            url = f"{base_url.rstrip('/')}/{name}"
        dest = models / name
        if dest.is_file():
            print(f"{dest}: already downloaded")
        else:
            download_file(url, dest, verify=lambda part, name=name: check_download(part, WEIGHT_FORMATS[name]))
        print(f"sha256 {sha256_file(dest)}  {dest}")
        if convert:
            out, loaded = convert_checkpoint(dest)
            print(f"wrote {out}: {loaded.spec.describe()}")
        paths.append(dest)
    return paths
