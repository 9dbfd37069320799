"""The human side of a run folder: a results table on stdout, ``report.md`` and ``curves.png``."""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from pathlib import Path

from omegaconf import DictConfig

from evlp.eval.captions import RECALL_KEYS, UNIQUE_KEYS

# Off the quickstart, retrieval also has its mean and the unique-caption subset (evlp.eval.captions).
TABLE_KEYS = [*RECALL_KEYS, "mean_recall", *UNIQUE_KEYS, "unique_mean_recall"]


def results_table(results: dict) -> str:
    """Markdown table: one row per metric, the model beside a random model."""
    chance = results.get("chance", {})
    rows = ["| metric | model | random model |", "|---|---:|---:|"]
    for key in TABLE_KEYS:
        if results.get("retrieval", {}).get(key) is not None:
            c = chance.get("retrieval", {}).get(key)
            rows.append(f"| {key} | {results['retrieval'][key]:.2f} | {'' if c is None else f'{c:.2f}'} |")
    zs = results.get("zeroshot")
    if zs:
        for name, task in zs["tasks"].items():
            prompts = f", {task['templates']} prompts" if "templates" in task else ""
            rows.append(f"| zero-shot {name} top-1 ({task['classes']} classes{prompts}) | {task['top1']:.2f} | "
                        f"{100 / task['classes']:.2f} |")
        rows.append(f"| zero-shot mean top-1 | {zs['top1']:.2f} | {chance.get('zeroshot', {}).get('top1', 0):.2f} |")
    return "\n".join(rows)


def read_metrics(path: Path) -> dict[str, list[tuple[int, float]]]:
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    if path.exists():
        with path.open() as f:
            for row in csv.DictReader(f):
                series[row["name"]].append((int(row["step"]), float(row["value"])))
    return series


PRETRAINING_PANELS = [
    ("loss", ["train/loss", "train/kd_loss", "train/itc_loss", "val/loss"]),
    ("contrastive accuracy", ["train/x_itc_acc", "train/kd_acc", "val/x_itc_acc"]),
    # The benchmark callbacks' metrics (train/eval_callbacks.py), whichever of them ran.
    ("retrieval (val, %)", [f"val/{dataset}_retrieval_{name}" for dataset in ("quickstart", "coco", "flickr30k")
                            for name in ("tr_r1", "ir_r1", "mean_recall")]),
    ("zero-shot top-1 (val, %)", ["val/imagenet_zeroshot_top1", "val/quickstart_zeroshot_top1",
                                  *(f"val/quickstart_zeroshot_{task}_top1"
                                    for task in ("shape", "colour", "size", "count", "position"))]),
    ("learning rate", ["lr"]),
    ("pairs/s", ["perf/pairs_per_s"]),
]


def plot_curves(metrics_csv: Path, out: Path, panels: list[tuple[str, list[str]]] = PRETRAINING_PANELS) -> bool:
    """One panel per ``(title, metric names)``; panels whose metrics were never logged are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = read_metrics(metrics_csv)
    # A name also stands for its sub-series: "lr" covers LearningRateMonitor's per-group "lr/decay", "lr/no_decay".
    panels = [(title, [s for n in names for s in sorted(series) if s == n or s.startswith(n + "/")])
              for title, names in panels]
    panels = [p for p in panels if p[1]]
    if not panels:
        return False
    rows = math.ceil(len(panels) / 4)  # at most 4 panels a row, rows filled evenly
    cols = math.ceil(len(panels) / rows)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (title, names) in zip(axes.flat, panels):
        for name in names:
            steps, values = zip(*series[name])
            ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=name)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True


def _best_line(results: dict) -> str:
    best = results.get("best_checkpoint") or {}
    if not best.get("checkpoint") or not Path(best["checkpoint"]).is_file():
        return ""
    return (f" Lowest {best['monitor']} {best['value']:.4f} at step {best['step']}: `{best['checkpoint']}` (the "
            f"evaluation below is of the last weights).")


def write_report(cfg: DictConfig, run_dir: Path, results: dict) -> str:
    table = results_table(results)
    has_curves = plot_curves(run_dir / "metrics.csv", run_dir / "curves.png")
    protocol = results.get("protocol", {})
    lines = [
        f"# {cfg.run_name}",
        "",
        f"Steps: {results.get('steps')}; " + (f"last checkpoint: `{results['checkpoint']}`." if results.get(
            "checkpoint") and Path(results["checkpoint"]).is_file() else "no checkpoint kept.") + _best_line(results),
        "",
        table,
        "",
        "Protocol: " + "; ".join(f"{k}: {v}" for k, v in protocol.items()),
    ]
    if has_curves:
        lines += ["", "![training curves](curves.png)"]
    if results.get("examples"):
        lines += ["", f"![text queries and their top images]({results['examples']})"]
    (run_dir / "report.md").write_text("\n".join(lines) + "\n")
    return table
