"""``evlp export``, ``evlp index``, ``evlp search`` and ``evlp serve``: using a trained model from the command line.

    evlp export runs/quickstart/models/quickstart/model-375-1.2345-train.ckpt --out my-model
    evlp export CKPT --out my-model --push-to-hub me/my-model       # also upload it to the Hugging Face Hub
    evlp index ~/Photos --model my-model                            # -> ./evlp-index.safetensors
    evlp search "a dog on a beach" --top 10
    evlp serve --index evlp-index.safetensors                       # a search page on http://127.0.0.1:8000

Each handler returns an exit code; user errors are ``EvlpError`` lines (``evlp.cli`` prints them).
"""

from __future__ import annotations

import argparse

from evlp.errors import EvlpError


def _device(name: str | None) -> str:
    import torch

    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise EvlpError(f"--device {name}: no CUDA device is available; use --device cpu")
    return name


def cmd_export(args) -> int:
    from evlp.export import export_model, push_to_hub

    out = export_model(args.checkpoint, args.out)
    print(f"exported to {out}")
    if args.push_to_hub:
        url = push_to_hub(out, args.push_to_hub, endpoint=args.hub_endpoint, private=args.private)
        print(f"uploaded to {url}")
    return 0


def _model_for_index(args, index_path):
    """``--model``, else the model an existing index was built with."""
    from evlp.api import load_model
    from evlp.search import ImageIndex

    model = args.model
    if model is None:
        if not index_path.exists():
            raise EvlpError(f"--model is required: no index {index_path} yet to take the model from")
        model = ImageIndex.load(index_path).model["path"]
    return load_model(model, _device(args.device))


def cmd_index(args) -> int:
    from pathlib import Path

    from evlp.search import build_index

    out = Path(args.out)
    loaded = _model_for_index(args, out)
    stats = build_index(args.images_dir, loaded, out, batch_size=args.batch_size, workers=args.workers,
                        progress=not args.no_progress)
    print(f"{out}: {stats.total} images ({stats.embedded} embedded, {stats.reused} unchanged, {stats.removed} "
          f"removed, {stats.unreadable} unreadable skipped)")
    return 0


def cmd_search(args) -> int:
    from pathlib import Path

    from evlp.search import ImageIndex, search_text

    index = ImageIndex.load(args.index)
    loaded = _model_for_index(args, Path(args.index))
    hits = search_text(index, loaded, [args.query], top=args.top)[0]
    for rank, (path, score) in enumerate(hits, 1):
        print(f"{rank:>3}  {score:.4f}  {index.root / path}")
    return 0


def cmd_serve(args) -> int:
    from evlp.serve import serve

    serve(args.index, model=args.model, device=_device(args.device), host=args.host, port=args.port,
          allow_hosts=args.allow_host)
    return 0


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {number}")
    return number


def register(subparsers) -> None:
    """Add ``export``, ``index``, ``search`` and ``serve`` to the ``evlp`` command's subparsers."""
    from evlp.search import DEFAULT_INDEX

    export = subparsers.add_parser("export", help="write a checkpoint's student as safetensors + config + tokenizer "
                                   "+ model card (optionally push it to the Hugging Face Hub)")
    export.add_argument("checkpoint", help="training checkpoint (.ckpt), a run's checkpoint folder (models/<run_name>: "
                        "its newest checkpoint) or an earlier export folder")
    export.add_argument("--out", required=True, help="folder to write (must be new, empty or an earlier export)")
    export.add_argument("--push-to-hub", metavar="REPO", default=None, help="also upload to this Hub model repo "
                        "(e.g. me/my-model; token from `hf auth login` or HF_TOKEN)")
    export.add_argument("--hub-endpoint", default=None, help="Hub URL (default: HF_ENDPOINT or huggingface.co)")
    export.add_argument("--private", action="store_true", help="create the Hub repo as private")
    export.set_defaults(handler=cmd_export)

    model_help = ("export folder, training checkpoint or a run's checkpoint folder (its newest checkpoint) (default: "
                  "the model the index was built with)")
    index = subparsers.add_parser("index", help="embed a folder of images (recursively) for `evlp search`; reruns "
                                  "only embed new and changed files")
    index.add_argument("images_dir", help="folder of images (jpg, png, webp, gif, bmp, tif)")
    index.add_argument("--model", default=None, help=model_help)
    index.add_argument("--out", default=DEFAULT_INDEX, help=f"index file (default: {DEFAULT_INDEX})")
    index.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    index.add_argument("--batch-size", type=_positive, default=64)
    index.add_argument("--workers", type=int, default=4, help="image decoding processes, 0 = none (default: 4)")
    index.add_argument("--no-progress", action="store_true", help="no progress bar")
    index.set_defaults(handler=cmd_index)

    search = subparsers.add_parser("search", help="the images of an index that best match a text")
    search.add_argument("query", help='what to look for, e.g. "a dog on a beach"')
    search.add_argument("--index", default=DEFAULT_INDEX, help=f"index file (default: {DEFAULT_INDEX})")
    search.add_argument("--model", default=None, help=model_help)
    search.add_argument("--top", type=_positive, default=10, help="how many matches to print (default: 10)")
    search.add_argument("--device", default=None, help="cpu, cuda ... (default: cuda if available)")
    search.set_defaults(handler=cmd_search)

    serve = subparsers.add_parser("serve", help="a local web page: text search over an index and zero-shot labels "
                                  "for an uploaded image (pip install evlp[serve])")
    serve.add_argument("--index", default=DEFAULT_INDEX, help=f"index file (default: {DEFAULT_INDEX})")
    serve.add_argument("--model", default=None, help=model_help)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine "
                       "only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                       help="a Host name the page also answers to (repeatable); by default only localhost, "
                            "127.0.0.1, [::1] and the --host address, which blocks DNS-rebinding pages")
    serve.add_argument("--device", default=None, help="cpu, cuda ... (default: cuda if available)")
    serve.set_defaults(handler=cmd_serve)
