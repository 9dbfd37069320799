"""Formatting of ``evlp bench train`` results: the terminal report and Markdown for docs/benchmarks.md.

Pure functions of the result dict (no torch import), so ``python -m evlp.bench.report a.json b.json`` turns saved
``--json`` results into one Markdown table instantly.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _models(r: dict) -> list[tuple[str, dict]]:
    return [("evlp", r)] + ([("open_clip", r["open_clip"])] if "open_clip" in r else [])


def _mfu(m: dict) -> str:
    return f"{100 * m['mfu']:.1f}%" if m["mfu"] is not None else "-"


def _mode(r: dict) -> str:
    return ("compiled" if r["compile"] else "eager") + (" + grad ckpt" if r["grad_checkpointing"] else "")


def format_result(r: dict) -> str:
    """Work per pair by part, then one line per model, then the ratio of achieved FLOP/s."""
    cpu = r["device"] == "cpu"
    lines = [
        f"evlp bench train: config {r['config']}, batch {r['batch_size']}, {r['device']}, {r['precision']}, "
        f"{_mode(r)}, median of {r['steps']} steps after {r['warmup']} warm-up, torch {r['torch']}",
        "",
        "GFLOPs per pair (analytic, matmuls; student fwd+bwd = 3 x fwd, teacher fwd only)",
    ]
    g = r["gflops_per_pair"]
    for name in ("image_tower", "text_tower", "projections", "shared_block", "kd_head"):
        lines.append(f"  student {name:<20} {g[name]:>10.4f}")
    for name, label in (("student_forward", "student forward"), ("student_train", "student fwd+bwd"),
                        ("teacher", "teacher forward"), ("total", "total")):
        lines.append(f"  {label:<28} {g[name]:>10.4f}")
    rate, mem = ("GFLOP/s", "max RSS GB") if cpu else ("TFLOP/s", "peak mem GB")
    lines += ["", f"{'':<10} {'pairs/s':>10} {'step ms':>9} {'GFLOPs/pair':>12} {rate:>9} {'MFU':>6} {mem:>11}"]
    for name, m in _models(r):
        achieved = m["achieved_tflops"] * (1e3 if cpu else 1)
        gflops = m["gflops_per_pair"]["total"]
        lines.append(f"{name:<10} {m['pairs_per_s']:>10.1f} {m['step_ms']:>9.1f} {gflops:>12.3f} {achieved:>9.1f} "
                     f"{_mfu(m):>6} {m['peak_mem_gb']:>11.2f}")
    if "open_clip" in r:
        lines += ["", f"achieved FLOP/s, evlp / open_clip: {r['open_clip']['flops_ratio']:.2f}x"]
        if cpu:
            lines.append("(on CPU the memory figure is the whole process's, both models together)")
    return "\n".join(lines)


def format_max_batch(r: dict) -> str:
    """``evlp bench max-batch``: the answer, then every probe in order."""
    memory = f" of {r['memory_gb']:.1f} GB" if r["memory_gb"] else ""
    mem = "peak mem GB" if r["device"] != "cpu" else "max RSS GB (process)"
    if r["largest_fit"] is None:
        answer = (f"no batch of {r['multiple']} or more fits" if r["complete"]
                  else "no probe fitted before the time limit")
    else:
        answer = f"largest batch that fits: {r['largest_fit']}"
        if r["smallest_failed"] is not None:
            answer += f" ({r['smallest_failed']} did not)"
        if r["largest_fit"] == r["limit"]:
            answer += " = --limit"
        if not r["complete"]:
            answer += (f"; stopped at the time limit ({r['time_limit_s']:.0f} s) before the search narrowed to a "
                       f"multiple of {r['multiple']}")
    lines = [
        f"evlp bench max-batch: config {r['config']}, {r['device']}{memory}, {r['precision']}, {_mode(r)}, "
        f"{r['steps_per_probe']} steps per probe, torch {r['torch']}",
        answer,
        f"{'batch':>8} {'fits':>5} {mem:>12}",
        *(f"{p['batch_size']:>8} {'yes' if p['fits'] else 'no':>5} "
          f"{p['peak_mem_gb'] if p['peak_mem_gb'] is not None else float('nan'):>12.2f}" for p in r["probes"]),
    ]
    return "\n".join(lines)


def markdown_table(results: list[dict]) -> str:
    """One row per model per result; achieved FLOP/s in GFLOP/s on CPU, TFLOP/s on GPU."""
    cpu = all(r["device"] == "cpu" for r in results)
    rate, mem = ("GFLOP/s", "max RSS GB (process)") if cpu else ("TFLOP/s", "peak mem GB")
    lines = [f"| config | batch | precision | mode | model | pairs/s | step ms | GFLOPs/pair | {rate} | MFU | {mem} "
             "| FLOP/s vs open_clip |",
             "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        for name, m in _models(r):
            achieved = m["achieved_tflops"] * (1e3 if cpu else 1)
            ratio = f"{r['open_clip']['flops_ratio']:.2f}x" if name == "evlp" and "open_clip" in r else ""
            lines.append(f"| {r['config']} | {r['batch_size']} | {r['precision']} | {_mode(r)} | {name} "
                         f"| {m['pairs_per_s']:.1f} | {m['step_ms']:.1f} | {m['gflops_per_pair']['total']:.3f} "
                         f"| {achieved:.1f} | {_mfu(m)} | {m['peak_mem_gb']:.2f} | {ratio} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_table([json.loads(Path(p).read_text()) for p in sys.argv[1:]]))
