"""The GPU check behind benchmarks/gpu_check.sh (which installs the carried wheels first; see benchmarks/README.md).

    python benchmarks/gpu_check.py run [--device cuda|cpu] [--tiny] [--budget S] [--parts a,b] [--out DIR]
    python benchmarks/gpu_check.py source-hash                # what gpu_wheels.sh records next to the evlp wheel
    python benchmarks/gpu_check.py versions | prepare-data ... | profile ...  # steps of the parts

`run` measures, each part in its own process with its own time limit (a part that fails or overruns is reported
with the end of its output, and the others still run), in this order:

    versions        python, torch, CUDA, the card, every package evlp requires with its version and range
    bench-eager     (a) `evlp bench train` on training/s_smke, batch 256, bf16-mixed, against open_clip
    train           (b) `evlp train` of the full-size student (random weights) on synthetic JPEG shards written
                        here, a few hundred steps: the steady pairs/s, MFU and data share the training log computes
    data            (c) the shard reader alone (`evlp bench data --readers shards`) with 8 and 16 workers
    max-batch       (d) `evlp bench max-batch`: the largest batch that fits, and the peak memory of each probe
    profile         torch.profiler over a few eager steps at batch 256: the operators with the most device time
    bench-compiled  (a) as bench-eager with trainer.compile=true (last: inductor's compilation takes longest)

`--budget` bounds the whole: a part gets the smaller of its own limit and what is left, and one that cannot start
with a useful amount of time left is reported as skipped. After every part, the Markdown section (also printed at
the end) and the JSON are rewritten to gpu_check.md and gpu_check.json in --out (default: $OUT), with every part's
output in gpu_check.log, so a run stopped from outside still leaves what it finished. Exit status 1 when a part
failed or was skipped.

`--device cpu --tiny` runs the same flow at toy size on a CPU: the flow check of the test suite and of the dry run.
This file imports only the standard library at the top, so `source-hash` runs with any Python 3.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

SCRIPT = str(Path(__file__).resolve())
ROOT = Path(SCRIPT).parents[1]
BERT_VOCAB_SIZE = 30522  # bert-base-uncased's: the full-size text tower gets BERT's embedding table
PARTS = ("versions", "bench-eager", "train", "data", "max-batch", "profile", "bench-compiled")


def source_hash(root: Path = ROOT) -> str:
    """sha256 over the paths and bytes of every file under src/evlp (caches left out): the same tree, the same hash."""
    digest = hashlib.sha256()
    base = root / "src"
    for path in sorted(p for p in (base / "evlp").rglob("*") if p.is_file()):
        if "__pycache__" in path.parts or path.suffix == ".pyc":
            continue
        digest.update(path.relative_to(base).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# What each part runs, full size (GPU) and tiny (the CPU flow check)


@dataclass
class Sizes:
    """Everything that differs between the GPU check and its tiny CPU flow check."""

    config: str
    overrides: list[str]  # the model, on top of --config (empty: the config's own)
    bench: list[str]  # evlp bench train's run arguments
    compile_backend: str
    images: int  # synthetic JPEG pairs written for the training run
    shard_size: int
    writers: int  # processes writing them
    train: list[str]  # evlp train overrides beyond the data and the random weights
    vocab_size: int | None  # pad the WordPiece vocabulary to this many entries
    data_runs: list[list[str]]  # one `evlp bench data` per entry
    max_batch: list[str]
    profile: list[str]  # gpu_check.py profile's --steps and --warmup
    limits: dict = field(default_factory=dict)  # seconds per part


FULL = Sizes(
    config="training/s_smke",
    overrides=[],
    bench=["--batch-size", "256", "--steps", "20", "--warmup", "5"],
    compile_backend="inductor",
    # One epoch of 250 steps of 256: no epoch boundary (and its loader restart) inside the timed run.
    images=64000, shard_size=1000, writers=16,
    train=["trainer.max_steps=250", "trainer.log_every_n_steps=25", "trainer.checkpoint_every_n_steps=100"],
    vocab_size=BERT_VOCAB_SIZE,
    # Batches of 64: per-pair work dominates, and the one-thread ceilings the bench also times stay short.
    data_runs=[["--workers", str(w), "--batch-size", "64", "--warmup", str(2 * w), "--batches", "64",
                "--num-images", "6144", "--rounds", "2"] for w in (8, 16)],
    max_batch=["--start", "256", "--multiple", "32"],
    profile=["--steps", "3", "--warmup", "3"],
    limits={"versions": 60, "bench-eager": 100, "prepare": 90, "train": 170, "data": 90, "max-batch": 80,
            "profile": 70, "bench-compiled": 200},
)
TINY_MODEL = ["model.depth=1", "model.teacher.depth=1", "loss.memory_bank_size=256"]
TINY = Sizes(
    config="quickstart",
    overrides=TINY_MODEL,
    bench=["--batch-size", "8", "--steps", "2", "--warmup", "1"],
    # aot_eager: Dynamo capture + AOTAutograd without code generation (inductor takes minutes on a small CPU).
    compile_backend="aot_eager",
    images=96, shard_size=32, writers=2,
    train=["trainer.max_steps=6", "trainer.log_every_n_steps=2", "trainer.checkpoint_every_n_steps=3",
           "data.batch_size=8", "data.num_workers=2", "data.shuffle_buffer=16",
           # the quickstart's own evaluation callbacks read the quickstart's held-out split, not these shards
           "eval.zeroshot_callback=null", "eval.retrieval_callback=null", *TINY_MODEL],
    vocab_size=None,
    data_runs=[["--workers", "2", "--batch-size", "8", "--warmup", "2", "--batches", "4", "--num-images", "48",
                "--rounds", "1"]],
    max_batch=["--start", "4", "--limit", "16", "--multiple", "4", "--steps", "1"],
    profile=["--steps", "1", "--warmup", "1"],
    limits={part: 150 for part in ("versions", "bench-eager", "prepare", "train", "data", "max-batch", "profile",
                                   "bench-compiled")},
)
MIN_USEFUL_S = 20  # a part that cannot have this much is skipped rather than started


# ---------------------------------------------------------------------------------------------------------------
# Running a part


@dataclass
class Outcome:
    command: list[str]
    status: str  # ok | failed | timed out | skipped
    seconds: float
    stdout: str = ""
    stderr: str = ""
    returncode: int | None = None


class Runner:
    """Runs commands with time limits inside one overall deadline, and keeps their output for the log."""

    def __init__(self, python: str, deadline: float, log: Path | None):
        self.python, self.deadline, self.log = python, deadline, log
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                    "TOKENIZERS_PARALLELISM": "false"}

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def __call__(self, name: str, args: list[str], limit: float, cwd: Path | None = None) -> Outcome:
        command = [self.python, *args]
        limit = min(limit, self.left())
        if limit < MIN_USEFUL_S:
            print(f"== {name}: skipped, {max(self.left(), 0):.0f} s of the budget left", file=sys.stderr)
            return Outcome(command, "skipped", 0.0)
        print(f"== {name} (limit {limit:.0f} s): {' '.join(command)}", file=sys.stderr, flush=True)
        start = time.monotonic()
        # A session of its own, so a timeout also ends the loader workers it started.
        with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
            process = subprocess.Popen(command, stdout=out, stderr=err, cwd=cwd or ROOT, env=self.env,
                                       start_new_session=True)
            try:
                returncode = process.wait(timeout=limit)
                status = "ok" if returncode == 0 else "failed"
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                returncode, status = process.wait(), "timed out"
            out.seek(0), err.seek(0)
            outcome = Outcome(command, status, time.monotonic() - start, out.read(), err.read(), returncode)
        print(f"== {name}: {status} in {outcome.seconds:.0f} s", file=sys.stderr, flush=True)
        if status != "ok":
            print(tail(outcome.stderr or outcome.stdout, 15), file=sys.stderr, flush=True)
        if self.log is not None:
            with self.log.open("a") as f:
                f.write(f"==== {name}: {' '.join(command)}\n==== {status} in {outcome.seconds:.1f} s "
                        f"(exit {returncode})\n---- stdout\n{outcome.stdout[-200_000:]}\n"
                        f"---- stderr\n{outcome.stderr[-200_000:]}\n")
        return outcome


def tail(text: str, lines: int) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def result_of(outcome: Outcome) -> dict | None:
    """The JSON object a part printed (after anything a library printed before it), or None if it did not finish;
    a part whose output holds none is marked failed."""
    if outcome.status != "ok":
        return None
    start = 0 if outcome.stdout.startswith("{") else outcome.stdout.find("\n{") + 1
    try:
        return json.JSONDecoder().raw_decode(outcome.stdout[start:])[0]
    except ValueError as e:
        return failed(outcome, f"no JSON result in its output ({e})")


def failed(outcome: Outcome, why: str) -> None:
    outcome.status = "failed"
    outcome.stderr += f"\ngpu_check: {why}"
    print(f"== {why}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------------------------
# The parts


def versions() -> dict:
    """What the parts run on: python, torch, the card, and every package evlp requires (with its version, evlp's
    range and where it was found), plus open_clip_torch, which the check itself needs."""
    import importlib.metadata as md

    import torch
    from packaging.requirements import Requirement

    import evlp

    cuda = torch.cuda.is_available()
    env = {"python": platform.python_version(), "executable": sys.executable, "evlp_from": evlp.__file__,
           "torch": torch.__version__, "cuda": torch.version.cuda, "cuda_available": cuda,
           "card": torch.cuda.get_device_name(0) if cuda else "cpu", "cpus": os.cpu_count(), "packages": []}
    wanted = [Requirement(r) for r in md.requires("evlp") or [] if "extra" not in r]
    wanted.append(Requirement("open_clip_torch"))  # evlp bench train --vs open_clip
    for req in wanted:
        try:
            dist = md.distribution(req.name)
        except md.PackageNotFoundError:
            dist = None
        version = dist.version if dist else None
        env["packages"].append({
            "name": req.name, "range": str(req.specifier), "version": version,
            "in_range": version is not None and req.specifier.contains(version, prereleases=True),
            "location": str(dist.locate_file("")) if dist else None,
        })
    return env


def part_versions(run: Runner, sizes: Sizes) -> tuple[Outcome, dict | None]:
    outcome = run("versions", [SCRIPT, "versions"], sizes.limits["versions"])
    return outcome, result_of(outcome)


def bench_command(sizes: Sizes, device: str, compiled: bool) -> list[str]:
    overrides = [*sizes.overrides, *(["trainer.precision=bf16-mixed"] if device == "cuda" else []),
                 *(["trainer.compile=true"] if compiled else [])]
    return ["-m", "evlp.bench", "train", "--config", sizes.config, *overrides, *sizes.bench, "--device", device,
            "--vs", "open_clip", "--compile-backend", sizes.compile_backend, "--json"]


def part_bench(run: Runner, sizes: Sizes, device: str, compiled: bool) -> tuple[Outcome, dict | None]:
    name = "bench-compiled" if compiled else "bench-eager"
    outcome = run(name, bench_command(sizes, device, compiled), sizes.limits[name])
    return outcome, result_of(outcome)


def prepare_data(root: Path, images: int, shard_size: int, writers: int, vocab_size: int | None) -> None:
    """Synthetic 256-px JPEG shards (``evlp bench data``'s) in root/shards and a WordPiece vocabulary in root/vocab,
    padded with unused entries to ``vocab_size``, as BERT's own has them: a text embedding of BERT's size."""
    from evlp.bench.data import write_synthetic_shards
    from evlp.data.synthetic import write_vocab

    write_synthetic_shards(root / "shards", images, shard_size=shard_size, workers=writers)
    vocab = write_vocab(root / "vocab") / "vocab.txt"
    words = vocab.read_text().splitlines()
    if vocab_size and vocab_size > len(words):
        vocab.write_text("\n".join(words + [f"[unused{i}]" for i in range(vocab_size - len(words))]) + "\n")


def train_overrides(sizes: Sizes, device: str, work: Path) -> list[str]:
    data = work / "data"
    return [
        f"base_dir={work}", "run_name=gpu_check",
        # random weights, the config's architecture; the tokenizer and the shards written by `prepare`
        "model.image_tower.path=null", "model.text_tower.path=null", "model.teacher.path=null",
        f"model.text_tower.tokenizer={data / 'vocab'}", f"data.train=[{data / 'shards'}]", "data.val=[]",
        *(["trainer.accelerator=cpu"] if device == "cpu" else []),
        "trainer.progress_bar=false", *sizes.train,
    ]


def prepare(run: Runner, sizes: Sizes, work: Path, name: str, images: int, vocab_size: int | None) -> Outcome:
    return run(name, [SCRIPT, "prepare-data", str(work / "data"), "--images", str(images), "--shard-size",
                      str(sizes.shard_size), "--writers", str(sizes.writers),
                      *(["--vocab-size", str(vocab_size)] if vocab_size else [])], sizes.limits["prepare"])


def part_train(run: Runner, sizes: Sizes, device: str, work: Path) -> tuple[dict[str, Outcome], dict | None]:
    outcomes = {"train: write the shards": prepare(run, sizes, work, "train: write the shards", sizes.images,
                                                   sizes.vocab_size)}
    if outcomes["train: write the shards"].status != "ok":
        return outcomes, None
    train = run("train", ["-m", "evlp.cli", "train", "--config", sizes.config, *train_overrides(sizes, device, work)],
                sizes.limits["train"])
    outcomes["train"] = train
    if train.status != "ok":
        return outcomes, None
    try:
        return outcomes, train_figures(work, outcomes["train: write the shards"].seconds)
    except (OSError, ValueError, KeyError) as e:
        return outcomes, failed(train, f"cannot read the training log: {type(e).__name__}: {e}")


def train_figures(work: Path, prepare_s: float) -> dict:
    """The training log's throughput windows (metrics.csv), the first left out as warm-up."""
    rows = list(csv.DictReader((work / "logs" / "gpu_check" / "metrics.csv").open()))
    series = {}
    for row in rows:
        series.setdefault(row["name"], []).append((int(row["step"]), float(row["value"])))
    windows = series.get("perf/pairs_per_s", [])
    steady = slice(1, None) if len(windows) > 1 else slice(None)
    rates = [v for _, v in windows[steady]]
    checkpoints = sorted((work / "models" / "gpu_check").glob("*.ckpt"))
    figures = {
        "windows": len(windows), "steady_windows": len(rates), "window_steps": [s for s, _ in windows],
        "pairs_per_s_windows": [v for _, v in windows],
        "pairs_per_s_median": statistics.median(rates) if rates else None,
        # every steady window has the same number of pairs: their overall rate is the harmonic mean
        "pairs_per_s_overall": len(rates) / sum(1 / r for r in rates) if rates else None,
        "data_share_median": _median(series.get("perf/data_share", [])[steady]),
        "mfu_median": _median(series.get("perf/mfu", [])[steady]),
        "checkpoints_kept": [p.name for p in checkpoints],
        "checkpoint_gb": sum(p.stat().st_size for p in checkpoints) / 1e9 / max(len(checkpoints), 1),
        "prepare_s": prepare_s,
    }
    results = work / "logs" / "gpu_check" / "results.json"
    figures["steps"] = json.loads(results.read_text()).get("steps") if results.exists() else None
    return figures


def _median(points: list[tuple[int, float]]) -> float | None:
    return statistics.median(v for _, v in points) if points else None


def part_data(run: Runner, sizes: Sizes, work: Path) -> tuple[dict[str, Outcome], list[dict]]:
    outcomes, results = {}, []
    if not (work / "data" / "shards").is_dir():  # the train part writes them; without it, only what the bench reads
        images = max(int(args[args.index("--num-images") + 1]) for args in sizes.data_runs)
        outcomes["data: write the shards"] = prepare(run, sizes, work, "data: write the shards", images, None)
    for args in sizes.data_runs:
        name = f"data ({args[args.index('--workers') + 1]} workers)"
        outcomes[name] = run(name, ["-m", "evlp.bench", "data", "--shards", str(work / "data" / "shards"),
                                    "--readers", "shards", *args, "--json"],
                             sizes.limits["data"] / len(sizes.data_runs))
        result = result_of(outcomes[name])
        if result:
            results.append(result)
    return outcomes, results


def part_max_batch(run: Runner, sizes: Sizes, device: str) -> tuple[Outcome, dict | None]:
    limit = min(sizes.limits["max-batch"], run.left())
    overrides = [*sizes.overrides, *(["trainer.precision=bf16-mixed"] if device == "cuda" else [])]
    # The search stops starting probes in time for the process to end within its limit (model building included).
    outcome = run("max-batch", ["-m", "evlp.bench", "max-batch", "--config", sizes.config, *overrides, *sizes.max_batch,
                                "--time-limit", str(max(limit - 35, 5)), "--device", device, "--json"], limit)
    return outcome, result_of(outcome)


def profile(config: str, overrides: list[str], batch_size: int, device: str, steps: int = 3, warmup: int = 3,
            top: int = 12) -> dict:
    """Where the eager step's time goes: torch.profiler over ``steps`` steps after ``warmup``, the operators with the
    most self time on the device (on the CPU without one), per step."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from evlp.bench.train import autocast_dtype, build_evlp_step, resolve_device
    from evlp.config import load_config

    cfg = load_config(config, overrides)
    device = resolve_device(device)
    cuda = device.type == "cuda"
    evlp, batch = build_evlp_step(cfg, device, autocast_dtype(cfg.trainer.precision, device), batch_size, "inductor")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(warmup):
        evlp.step(batch)
    sync()
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    with torch_profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            evlp.step(batch)
        sync()
        wall = (time.perf_counter() - start) / steps
    key = "self_device_time_total" if cuda else "self_cpu_time_total"  # microseconds
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)
    busy = sum(getattr(e, key) for e in events)
    return {
        "device": torch.cuda.get_device_name(device) if cuda else "cpu", "batch_size": batch_size, "steps": steps,
        "wall_ms_per_step": 1e3 * wall, "busy_ms_per_step": busy / 1e3 / steps, "time": key,
        "top": [{"name": e.key, "ms_per_step": getattr(e, key) / 1e3 / steps, "share": getattr(e, key) / busy,
                 "calls_per_step": e.count / steps} for e in events[:top]],
    }


def part_profile(run: Runner, sizes: Sizes, device: str) -> tuple[Outcome, dict | None]:
    overrides = [*sizes.overrides, *(["trainer.precision=bf16-mixed"] if device == "cuda" else [])]
    batch = sizes.bench[sizes.bench.index("--batch-size") + 1]
    outcome = run("profile", [SCRIPT, "profile", "--config", sizes.config, *overrides, "--batch-size", batch,
                              *sizes.profile, "--device", device], sizes.limits["profile"])
    return outcome, result_of(outcome)


# ---------------------------------------------------------------------------------------------------------------
# The report


def markdown(report: dict, run: Runner, bench_results: list[Path]) -> str:
    """The section for docs/benchmarks.md: versions, then one subsection per part that ran (or failed)."""
    env, parts = report["versions"], report["parts"]
    lines = [f"### {env['card'] if env else 'unknown device'}, {report['date']}", ""]
    if env:
        lines += [f"Python {env['python']}, torch {env['torch']} (CUDA {env['cuda'] or '-'}), {env['cpus']} CPUs; "
                  f"evlp from `{env['evlp_from']}`.",
                  "", "| package | version | evlp's range | where |", "|---|---|---|---|"]
        lines += [f"| {p['name']} | {p['version'] or 'missing'} | {p['range'] or 'any'}"
                  f"{'' if p['in_range'] else ' (**outside**)'} | {p['location'] or ''} |" for p in env["packages"]]
    lines += _part_status(parts, "versions")
    times = ", ".join(f"{name} {p['seconds']:.0f} s" for name, p in parts.items())
    lines += ["", f"Produced by `{report['invocation']}` in {report['seconds']:.0f} s ({times})."]
    sections = [
        ("(a) The training step against open_clip (`evlp bench train`)", ("bench-eager", "bench-compiled"),
         lambda: _bench_lines(parts, run, bench_results)),
        ("(b) `evlp train` on synthetic JPEG shards, random weights", ("train: write the shards", "train"),
         lambda: _train_lines(parts, report.get("train"))),
        ("(c) The shard reader alone (`evlp bench data --readers shards`)",
         tuple(name for name in parts if name.startswith("data")), lambda: _data_lines(report)),
        ("(d) Memory: the largest batch that fits (`evlp bench max-batch`)", ("max-batch",),
         lambda: _max_batch_lines(report.get("max-batch"))),
        ("Where the eager step's time goes (torch.profiler)", ("profile",),
         lambda: _profile_lines(report.get("profile"))),
    ]
    for title, names, body in sections:
        if any(name in parts for name in names):
            lines += ["", f"#### {title}", "", *body(), *_part_status(parts, *names)]
    return "\n".join(lines) + "\n"


def _command(parts: dict, name: str, verb: str) -> str:
    """A part's command as a user types it: `evlp bench train ...`, `evlp train ...`."""
    command = parts[name]["command"]
    if verb not in command:
        return "(no command)"
    return " ".join(["evlp", *(["bench"] if command[1] == "evlp.bench" else []), *command[command.index(verb):]])


def _bench_lines(parts: dict, run: Runner, bench_results: list[Path]) -> list[str]:
    lines = [f"    {_command(parts, name, 'train')}" for name in ("bench-eager", "bench-compiled") if name in parts]
    if bench_results:
        table = subprocess.run([run.python, "-m", "evlp.bench.report", *map(str, bench_results)], cwd=ROOT,
                               env=run.env, capture_output=True, text=True)
        lines += ["", table.stdout.rstrip() if table.returncode == 0 else f"(report failed: {tail(table.stderr, 3)})"]
    return lines


def _train_lines(parts: dict, train: dict | None) -> list[str]:
    lines = [f"    {_command(parts, 'train', 'train')}"] if "train" in parts else []
    if train and train["pairs_per_s_median"] is not None:
        steady = train["pairs_per_s_windows"][1:] or train["pairs_per_s_windows"]
        mfu = f"{100 * train['mfu_median']:.1f} %" if train["mfu_median"] is not None else "- (CPU or unknown card)"
        lines += ["", f"{train['steps']} steps; {train['steady_windows']} of {train['windows']} logged windows after "
                      f"the first (warm-up): pairs/s median {train['pairs_per_s_median']:.1f} (windows "
                      f"{min(steady):.1f}-{max(steady):.1f}), overall {train['pairs_per_s_overall']:.1f} with the "
                      f"checkpoint writes; MFU median {mfu}; waiting for data (perf/data_share) median "
                      f"{100 * (train['data_share_median'] or 0):.1f} % of the step. Checkpoints "
                      f"{train['checkpoint_gb']:.2f} GB each; {train['prepare_s']:.0f} s to write the shards."]
    return lines


def _data_lines(report: dict) -> list[str]:
    data, train = report.get("data") or [], report.get("train")
    if not data:
        return []
    lines = ["| workers | pairs/s | per worker | JPEG decode, one thread | decode + transform, one thread |",
             "|---:|---:|---:|---:|---:|"]
    lines += [f"| {d['workers']} | {d['shards_pairs_per_s']:.0f} | {d['per_worker']['shards']:.0f} "
              f"| {d['decode_only_pairs_per_s']:.0f} | {d['decode_transform_pairs_per_s']:.0f} |" for d in data]
    if train and train["pairs_per_s_median"]:
        lines += ["", f"The training step of (b) consumed {train['pairs_per_s_median']:.0f} pairs/s."]
    return lines


def _max_batch_lines(mb: dict | None) -> list[str]:
    if not mb:
        return []
    probes = ", ".join(f"{p['batch_size']}: {p['peak_mem_gb']:.1f} GB" if p["fits"] else f"{p['batch_size']}: no"
                       for p in mb["probes"])
    answer = mb["largest_fit"] if mb["largest_fit"] is not None else "none"
    return [f"Largest batch that fits: **{answer}**"
            + (f" ({mb['smallest_failed']} did not)" if mb["smallest_failed"] else "")
            + ("" if mb["complete"] else " -- stopped at the time limit before the search finished")
            + f"; peak memory per probe ({mb['steps_per_probe']} steps each, eager): {probes}."]


def _profile_lines(prof: dict | None) -> list[str]:
    if not prof:
        return []
    what = "GPU kernels" if prof["time"] == "self_device_time_total" else "CPU operators"
    lines = [f"Batch {prof['batch_size']}, {prof['steps']} profiled steps: {prof['wall_ms_per_step']:.1f} ms per step "
             f"on the clock (with the profiler's overhead), {prof['busy_ms_per_step']:.1f} ms of self time of {what}; "
             "the operators with the most:", "",
             "| operator | ms per step | share | calls per step |", "|---|---:|---:|---:|"]
    lines += [f"| `{t['name']}` | {t['ms_per_step']:.2f} | {100 * t['share']:.1f} % | {t['calls_per_step']:.0f} |"
              for t in prof["top"]]
    return lines


def _part_status(parts: dict, *names: str) -> list[str]:
    lines = []
    for name in names:
        p = parts.get(name)
        if p is None or p["status"] == "ok":
            continue
        lines += ["", f"**{name}: {p['status']}** after {p['seconds']:.0f} s" + (":" if p["tail"] else ".")]
        if p["tail"]:
            lines += ["", *("    " + line for line in p["tail"].splitlines())]
    return lines


def run_check(args) -> int:
    sizes = TINY if args.tiny else FULL
    parts_wanted = args.parts.split(",") if args.parts else list(PARTS)
    unknown = [p for p in parts_wanted if p not in PARTS]
    if unknown:
        print(f"gpu_check: unknown part(s) {', '.join(unknown)}; expected some of {', '.join(PARTS)}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu_check.log").write_text("")
    started = time.monotonic()
    run = Runner(sys.executable, started + args.budget, out / "gpu_check.log" if out else None)
    report = {"date": time.strftime("%Y-%m-%d", time.gmtime()), "invocation": args.invocation, "device": args.device,
              "tiny": args.tiny, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "budget_s": args.budget,
              "versions": None, "parts": {}}
    bench_results: list[Path] = []

    def record(name: str, outcome: Outcome) -> None:
        report["parts"][name] = {"status": outcome.status, "seconds": round(outcome.seconds, 1),
                                 "command": outcome.command[1:], "returncode": outcome.returncode,
                                 "tail": tail(outcome.stderr or outcome.stdout, 15) if outcome.status != "ok" else ""}

    def write() -> str:
        report["seconds"] = time.monotonic() - started
        text = markdown(report, run, bench_results)
        if out:
            (out / "gpu_check.md").write_text(text)
            (out / "gpu_check.json").write_text(json.dumps(report, indent=2))
        return text

    def run_part(part: str) -> None:
        if part == "versions":
            outcome, report["versions"] = part_versions(run, sizes)
            record(part, outcome)
        elif part in ("bench-eager", "bench-compiled"):
            outcome, result = part_bench(run, sizes, args.device, part == "bench-compiled")
            record(part, outcome)
            if result:
                report[part] = result
                path = work / f"{part}.json"
                path.write_text(json.dumps(result))
                bench_results.append(path)
        elif part == "train":
            outcomes, report["train"] = part_train(run, sizes, args.device, work)
            for name, outcome in outcomes.items():
                record(name, outcome)
        elif part == "data":
            outcomes, report["data"] = part_data(run, sizes, work)
            for name, outcome in outcomes.items():
                record(name, outcome)
        elif part == "max-batch":
            outcome, report["max-batch"] = part_max_batch(run, sizes, args.device)
            record(part, outcome)
        elif part == "profile":
            outcome, report["profile"] = part_profile(run, sizes, args.device)
            record(part, outcome)

    with tempfile.TemporaryDirectory(prefix="evlp-gpu-check-") as tmp:
        work = Path(tmp)
        for part in PARTS:
            if part not in parts_wanted:
                continue
            try:
                run_part(part)
            except Exception as e:  # a bug in reading one part's result must not cost the parts after it
                entry = report["parts"].setdefault(part, {"seconds": 0.0, "command": [], "returncode": None})
                entry.update(status="failed", tail=f"gpu_check: {type(e).__name__}: {e}")
            write()
        text = write()
    print(text, end="")
    unfinished = [name for name, p in report["parts"].items() if p["status"] != "ok"]
    if unfinished:
        print(f"gpu_check: {', '.join(unfinished)} did not finish (see the report)", file=sys.stderr)
    return 1 if unfinished else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpu_check.py")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("source-hash", help="print the hash of src/evlp that gpu_wheels.sh records")
    commands.add_parser("versions", help="print the versions the parts run on (JSON)")
    p = commands.add_parser("profile", help="print where the eager step's time goes (JSON)")
    p.add_argument("--config", required=True)
    p.add_argument("overrides", nargs="*")
    p.add_argument("--batch-size", type=int, required=True)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", choices=["cuda", "cpu"], required=True)
    p = commands.add_parser("prepare-data", help="write the training part's shards and vocabulary")
    p.add_argument("root", type=Path)
    p.add_argument("--images", type=int, required=True)
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--writers", type=int, default=1)
    p.add_argument("--vocab-size", type=int, default=None)
    p = commands.add_parser("run", help="run the check")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--tiny", action="store_true", help="toy sizes: the flow check on a CPU")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds for the whole check (default 420; 540 with --tiny)")
    p.add_argument("--parts", default=None, help=f"comma-separated subset of {','.join(PARTS)} (default: all)")
    p.add_argument("--out", default=os.environ.get("OUT") or None, help="folder for the report (default: $OUT)")
    p.add_argument("--invocation", default="benchmarks/gpu_check.py run", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.command == "source-hash":
        print(source_hash())
        return 0
    if args.command == "versions":
        print(json.dumps(versions()))
        return 0
    if args.command == "profile":
        result = profile(args.config, args.overrides, args.batch_size, args.device, args.steps, args.warmup)
        print(json.dumps(result))
        return 0
    if args.command == "prepare-data":
        prepare_data(args.root, args.images, args.shard_size, args.writers, args.vocab_size)
        return 0
    if args.budget is None:
        args.budget = 540.0 if args.tiny else 420.0
    return run_check(args)


if __name__ == "__main__":
    sys.exit(main())
