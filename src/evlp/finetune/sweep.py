"""``evlp sweep {glue,retrieval,vision}``: every fine-tuning task of a family in turn, one summary table.

The original's ``sweep_glue.sh``, ``sweep_retrieval.sh`` and ``sweep_vision.sh`` as one command: the same overrides go
to every task, a failed task is reported in the table and the sweep goes on, and the table is written as Markdown
and JSON to ``<log_dir>/sweep_<family>/summary.{md,json}`` in the seed README's layout.
"""

from __future__ import annotations

import json
import logging
import traceback
from pathlib import Path

from evlp.config import load_config
from evlp.errors import EvlpError

log = logging.getLogger("evlp")

# (config, extra overrides, run-name suffix), in the original scripts' order.
SWEEPS = {
    "glue": [(f"fine_tuning/{t}", [], "") for t in ("cola", "mnli", "mrpc", "qnli", "qqp", "rte", "sst", "stsb",
                                                      "wnli")],
    "retrieval": [("fine_tuning/retrieval_coco", [], ""), ("fine_tuning/retrieval_flickr30k", [], "")],
    "vision": [(f"fine_tuning/{d}", [f"model.linear_classifier={linear}"], "_linear" if linear else "")
               for d in ("imagenet", "cifar100", "cifar10") for linear in (True, False)],
}


def run_sweep(family: str, overrides: list[str]) -> tuple[list[dict], Path]:
    """Run every task of ``family``; returns one row per run and the summary folder."""
    from evlp.finetune.runner import run_finetune

    if family not in SWEEPS:
        raise EvlpError(f"unknown sweep {family!r}; expected one of {', '.join(SWEEPS)}")
    plan = []
    for name, extra, suffix in SWEEPS[family]:  # every config must load before the first task trains
        cfg = load_config(name, [*overrides, *extra])
        cfg.run_name = f"{cfg.run_name}{suffix}"
        plan.append((name, extra, cfg))
    out = Path(plan[0][2].log_dir) / f"sweep_{family}"
    rows = []
    for name, extra, cfg in plan:
        row = {"config": name, "overrides": extra, "run_name": cfg.run_name, "task": cfg.task}
        try:
            results = run_finetune(cfg)
            # run_name again: the run was renamed if an earlier sweep's run holds the name
            row.update(status="ok", run_name=cfg.run_name, headline=results["headline"],
                       parameters=results["parameters"],
                       resolution=results["protocol"].get("resolution"),
                       results=str(Path(cfg.log_dir) / cfg.run_name / "results.json"))
        except (EvlpError, Exception) as e:  # noqa: BLE001 - one failed task must not stop the sweep
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            row.update(status="failed", error=f"{type(e).__name__}: {first}")
            log.error("sweep %s: %s failed: %s", family, name, row["error"])
            if not isinstance(e, EvlpError):
                log.debug("%s", traceback.format_exc())
        rows.append(row)
        write_summary(family, rows, out)
    return rows, out


def _number(value) -> str:
    return "" if value is None else f"{value:.2f}"


def _millions(count) -> str:
    return "" if count is None else f"{count / 1e6:.1f}M"


def summary_markdown(family: str, rows: list[dict]) -> str:
    failed = [r for r in rows if r["status"] != "ok"]
    ok = [r for r in rows if r["status"] == "ok"]
    if family == "glue":
        lines = ["| Task | Metric | Score | #params |", "|:--|:--:|--:|--:|"]
        for r in ok:
            (metric, value), = r["headline"].items()
            lines.append(f"| {r['task'].upper()} | {metric} | {_number(value)} | {_millions(r['parameters'])} |")
    elif family == "vision":
        lines = ["| Dataset | Resolution | finetune acc@1 | lin eval acc@1 | #params |", "|:--|:--:|--:|--:|--:|"]
        by_task: dict[str, dict] = {}
        for r in ok:
            entry = by_task.setdefault(r["task"], {"resolution": r["resolution"], "parameters": r["parameters"]})
            linear = "model.linear_classifier=True" in r["overrides"]
            entry["linear" if linear else "finetune"] = r["headline"]["acc@1"]
            if not linear:
                entry["parameters"] = r["parameters"]
        for task, e in by_task.items():
            res = f"{e['resolution']}x{e['resolution']}" if e["resolution"] else ""
            lines.append(f"| {task} | {res} | {_number(e.get('finetune'))} | {_number(e.get('linear'))} | "
                         f"{_millions(e['parameters'])} |")
    else:
        lines = ["| Dataset | Resolution | IR@1 | TR@1 | #params |", "|:--|:--:|--:|--:|--:|"]
        for r in ok:
            res = f"{r['resolution']}x{r['resolution']}" if r["resolution"] else ""
            lines.append(f"| {r['task'].removeprefix('retrieval_')} | {res} | {_number(r['headline'].get('IR@1'))} | "
                         f"{_number(r['headline'].get('TR@1'))} | {_millions(r['parameters'])} |")
    if failed:
        lines += ["", "Failed:", ""] + [f"- {r['config']} {' '.join(r['overrides'])}: {r['error']}" for r in failed]
    return "\n".join(lines)


def write_summary(family: str, rows: list[dict], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps({"family": family, "runs": rows}, indent=2))
    (out / "summary.md").write_text(f"# evlp sweep {family}\n\n{summary_markdown(family, rows)}\n")
