"""Evaluation results as JSON and Markdown with their protocol beside every number, and example grids (PNG).

A result is one dict, written as is to ``<name>.json`` and rendered to ``<name>.md``:

    {"task": "retrieval" | "zeroshot", "title": ..., "metrics": {name: value}, "chance": {name: value},
     "definitions": {name: what the number counts}, "protocol": {field: value}, "notes": [...]}
"""

from __future__ import annotations

import json
import textwrap
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image

from evlp.eval.datasets import ImageNetVal, RetrievalSplit


def write_result(result: dict, out_dir: Path, name: str) -> tuple[Path, Path]:
    """Write ``<out_dir>/<name>.json`` and ``<out_dir>/<name>.md``; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{name}.json", out_dir / f"{name}.md"
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    md_path.write_text(markdown(result))
    return json_path, md_path


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.2f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value)) or "none"
    return str(value)


def metrics_table(result: dict) -> str:
    """The Markdown table of the numbers: value, chance level and, on the same row, what the number counts."""
    rows = ["| metric | value | chance | definition |", "|---|---:|---:|---|"]
    for name, value in result["metrics"].items():
        chance = result["chance"].get(name)
        rows.append(f"| {name} | {value:.2f} | {'' if chance is None else f'{chance:.2f}'} | "
                    f"{result['definitions'][name]} |")
    return "\n".join(rows)


def markdown(result: dict) -> str:
    lines = [f"# {result['title']}", "", metrics_table(result), "", "## Protocol", ""]
    lines += [f"- **{key}**: {_fmt(value)}" for key, value in result["protocol"].items()]
    lines += ["", "## Notes", ""] + [f"- {note}" for note in result["notes"]]
    return "\n".join(lines) + "\n"


def summary_line(result: dict) -> str:
    """One line naming the data, the model and the protocol, printed under the table by the CLI."""
    p = result["protocol"]
    return (f"{p['dataset']} {p['split']}, {p['resolution']} px, checkpoint {Path(p['checkpoint']).name} "
            f"(sha256 {p['checkpoint_sha256'][:12]}), evlp {p['evlp_version']}, {p['date']}")


# ---------------------------------------------------------------------------------------------------------------
# Example grids


def _thumbnail(path: Path, size: int = 160) -> Image.Image:
    with Image.open(path) as image:
        image = image.convert("RGB")
        image.thumbnail((size, size))
        return image


def _frame(ax, ok: bool) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_edgecolor("tab:green" if ok else "lightgray")
        spine.set_linewidth(4 if ok else 1)


def spread(count: int, total: int) -> list[int]:
    """``count`` indices spread evenly over ``range(total)`` (all of them if there are fewer): the same every run."""
    if count >= total:
        return list(range(total))
    return [round(i * (total - 1) / (count - 1)) for i in range(count)] if count > 1 else [0]


def save_retrieval_examples(split: RetrievalSplit, image_embeddings: torch.Tensor, text_embeddings: torch.Tensor,
                            path: Path, queries: int = 3, k: int = 5) -> Path:
    """PNG: for a few captions, their top-k images (the right one framed green); for a few images, their top-k
    captions (right ones ticked)."""
    from matplotlib.figure import Figure

    k = min(k, len(split.image_paths), len(split.captions))
    text_queries = spread(queries, len(split.captions))
    image_queries = spread(queries, len(split.image_paths))
    fig = Figure(figsize=(2.2 * (k + 1), 2.4 * (len(text_queries) + len(image_queries))))
    grid = fig.add_gridspec(len(text_queries) + len(image_queries), k + 1)
    for row, q in enumerate(text_queries):
        ax = fig.add_subplot(grid[row, 0])
        ax.axis("off")
        ax.text(0, 0.5, textwrap.fill(split.captions[q], 28), va="center", fontsize=8)
        top = (text_embeddings[q] @ image_embeddings.T).topk(k).indices.tolist()
        for col, i in enumerate(top, start=1):
            ax = fig.add_subplot(grid[row, col])
            ax.imshow(_thumbnail(split.image_paths[i]))
            _frame(ax, i == split.caption_image[q])
            ax.set_title(f"#{col}", fontsize=8)
    for offset, i in enumerate(image_queries):
        row = len(text_queries) + offset
        ax = fig.add_subplot(grid[row, 0])
        ax.imshow(_thumbnail(split.image_paths[i]))
        _frame(ax, False)
        ax = fig.add_subplot(grid[row, 1:])
        ax.axis("off")
        top = (image_embeddings[i] @ text_embeddings.T).topk(k).indices.tolist()
        listing = [f"{'✓' if split.caption_image[j] == i else '  '} #{n} {textwrap.shorten(split.captions[j], 90)}"
                   for n, j in enumerate(top, start=1)]
        ax.text(0, 0.5, "\n".join(listing), va="center", fontsize=8, family="monospace")
    fig.suptitle(f"{split.dataset} {split.split}: top-{k} images per caption (rows 1-{len(text_queries)}), "
                 f"top-{k} captions per image (below)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def save_text_query_examples(captions: list[str], positives: list[list[int]], text_embeddings: torch.Tensor,
                             image_embeddings: torch.Tensor, load_images: Callable[[list[int]], list[Image.Image]],
                             path: Path, queries: list[int], k: int = 5, title: str = "") -> Path:
    """PNG: for each caption index in ``queries``, its text and its top-k images (images that are its positives,
    ``positives[caption]``, framed green). ``load_images(rows)`` returns the images of those rows of
    ``image_embeddings``, which are only read for the images shown."""
    from matplotlib.figure import Figure

    k = min(k, len(image_embeddings))
    tops = [(text_embeddings[q] @ image_embeddings.T).topk(k).indices.tolist() for q in queries]
    shown = sorted({i for top in tops for i in top})
    image_of = dict(zip(shown, load_images(shown)))
    fig = Figure(figsize=(2.2 * (k + 1), 2.4 * len(queries)))
    grid = fig.add_gridspec(len(queries), k + 1)
    for row, (q, top) in enumerate(zip(queries, tops)):
        ax = fig.add_subplot(grid[row, 0])
        ax.axis("off")
        ax.text(0, 0.5, textwrap.fill(captions[q], 28), va="center", fontsize=8)
        for col, i in enumerate(top, start=1):
            ax = fig.add_subplot(grid[row, col])
            thumbnail = image_of[i].convert("RGB")
            thumbnail.thumbnail((160, 160))
            ax.imshow(thumbnail)
            _frame(ax, i in positives[q])
            ax.set_title(f"#{col}", fontsize=8)
    fig.suptitle(title or f"top-{k} images per caption (its own framed green)", fontsize=10)
    with warnings.catch_warnings():  # captions in scripts the default font lacks: boxes, not a warning per glyph
        warnings.filterwarnings("ignore", message=r".*[Gg]lyph.*missing.*")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    return path


def save_zeroshot_examples(data: ImageNetVal, image_embeddings: torch.Tensor, classifier: torch.Tensor,
                           classnames: list[str], path: Path, queries: int = 6, k: int = 5) -> Path:
    """PNG: a few images with their top-k classes (the label ticked)."""
    from matplotlib.figure import Figure

    chosen = spread(queries, len(data.paths))
    fig = Figure(figsize=(9, 2.2 * len(chosen)))
    grid = fig.add_gridspec(len(chosen), 3)
    for row, i in enumerate(chosen):
        top = (image_embeddings[i] @ classifier.cpu()).topk(min(k, classifier.shape[1])).indices.tolist()
        ax = fig.add_subplot(grid[row, 0])
        ax.imshow(_thumbnail(data.paths[i]))
        _frame(ax, top[0] == data.labels[i])
        ax = fig.add_subplot(grid[row, 1:])
        ax.axis("off")
        listing = [f"{'✓' if c == data.labels[i] else '  '} #{n} {classnames[c]}" for n, c in enumerate(top, 1)]
        listing.append(f"   label: {classnames[data.labels[i]]}")
        ax.text(0, 0.5, "\n".join(listing), va="center", fontsize=9, family="monospace")
    fig.suptitle(f"ImageNet val: top-{k} zero-shot classes", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path
