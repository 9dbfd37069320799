"""evlp's crawler against img2dataset on the same URLs, same machine, same concurrency, same resize, in one run.

A threaded HTTP server on 127.0.0.1 serves ``--rows`` URLs with the failure mix of a real CC3M/CC12M crawl: photos
of web sizes (640x480 to 3000x2000 JPEGs), slow hosts, 404/403/410s, HTML pages served with status 200, requests
that never answer within the timeout, connections closed without an answer, and truncated JPEGs. Both crawlers get
the same index (img2dataset's with a header line), ``--threads`` requests in flight, the same timeout, no retries,
and store a 256-px shorter side (never enlarged) as JPEG quality 95 in WebDataset tars:

    evlp:        evlp download cc12m --index I --max-rows all --concurrency T --retries 0 --timeout S
                 (decoding threads: its default, one per CPU)
    img2dataset: img2dataset --processes_count P --thread_count T/P --resize_mode keep_ratio --image_size 256
                 --resize_only_if_bigger True --encode_quality 95 --retries 0 --timeout S --output_format webdataset
                 (P = 1, one process like evlp, and P = cores, img2dataset's recommended setting)

Each crawler runs as its own process (img2dataset from its own virtual environment: it pins other pandas and
webdataset versions than evlp) on a fresh output folder; wall time includes its start-up, which an untimed run on
10 rows measures first. The crawlers alternate over ``--repeats`` rounds (the order rotating), and the medians are
reported: the machine may be shared. pairs/s = pairs written / wall seconds. Failures are each crawler's own
counts, img2dataset's error messages mapped to evlp's reason names (``i2d_reason``; its "Image decoding error"
covers both evlp's ``not_an_image`` and ``decode_error``).

    .venv/bin/python benchmarks/crawl_vs_img2dataset.py --img2dataset /path/to/venv/bin/img2dataset
    .venv/bin/python benchmarks/crawl_vs_img2dataset.py --only evlp --rows 40     # evlp alone, a quick check
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
from PIL import Image

# (kind, share of the rows). Shares follow public CC crawls (docs/data.md, "link rot"): ~60-70 % of rows load,
# dead links are mostly 404/403/410, a few % are HTML error pages or undecodable bodies.
MIX = [("ok", 0.62), ("slow", 0.08), ("http_404", 0.10), ("http_403", 0.04), ("http_410", 0.01), ("html", 0.05),
       ("timeout", 0.03), ("closed", 0.03), ("truncated", 0.04)]
SIZES = [((640, 480), 0.30), ((1024, 768), 0.30), ((1600, 1200), 0.25), ((3000, 2000), 0.15)]
SLOW_SECONDS = (0.3, 1.5)  # a slow host answers after a delay drawn from this range
HTML = b"<!doctype html><html><head><title>Not found</title></head><body><p>This image was removed.</p></body></html>"


# -- the served data --------------------------------------------------------------------------------------------


def photo(width: int, height: int, rng: np.random.Generator) -> bytes:
    """A smooth colour field plus sensor-like noise, JPEG quality 90: compresses and decodes like a photo."""
    low = rng.integers(0, 256, size=(4, 5, 3), dtype=np.uint8)
    field = np.asarray(Image.fromarray(low).resize((width, height), Image.Resampling.BICUBIC), dtype=np.int16)
    pixels = (field + rng.normal(0, 8, size=field.shape).astype(np.int16)).clip(0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def plan(rows: int, seed: int = 0, distinct: int = 48) -> tuple[list[str], list[bytes]]:
    """The kind of each row (in ``MIX``'s proportions, shuffled) and ``distinct`` photos the rows cycle through."""
    rng = random.Random(seed)
    kinds = [kind for kind, share in MIX for _ in range(round(share * rows))]
    kinds = (kinds + ["ok"] * rows)[:rows]
    rng.shuffle(kinds)
    np_rng = np.random.default_rng(seed)
    sizes = rng.choices([s for s, _ in SIZES], weights=[w for _, w in SIZES], k=distinct)
    return kinds, [photo(w, h, np_rng) if rng.random() < 0.7 else photo(h, w, np_rng) for w, h in sizes]


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024  # the default backlog (5) would refuse connections under 64+ concurrent requests

    def __init__(self, kinds: list[str], photos: list[bytes], timeout: float):
        super().__init__(("127.0.0.1", 0), Handler)
        self.kinds, self.photos, self.hang = kinds, photos, timeout + 2.0
        self.url = f"http://127.0.0.1:{self.server_address[1]}"


class Handler(BaseHTTPRequestHandler):
    """``/r/<row>``: the row's kind decides the answer."""

    server: Server

    def do_GET(self):
        try:
            row = int(self.path.rsplit("/", 1)[-1])
            kind = self.server.kinds[row]
        except (ValueError, IndexError):
            self.send_error(400)
            return
        body = self.server.photos[row % len(self.server.photos)]
        if kind.startswith("http_"):
            self.send_error(int(kind[5:]))
            return
        if kind == "timeout":  # accepts, then says nothing until well past the crawler's timeout
            time.sleep(self.server.hang)
            self.close_connection = True
            return
        if kind == "closed":  # closes the connection without an answer
            self.close_connection = True
            self.request.shutdown(socket.SHUT_RDWR)
            return
        if kind == "slow":
            time.sleep(random.Random(row).uniform(*SLOW_SECONDS))
        content_type = "image/jpeg"
        if kind == "html":
            body, content_type = HTML, "text/html; charset=utf-8"
        elif kind == "truncated":
            body = body[: len(body) * 2 // 5]  # a complete response holding 40 % of a JPEG
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the crawler gave up on it

    def log_message(self, *args):
        pass


def write_indexes(directory: Path, server: Server, rows: list[int]) -> tuple[Path, Path]:
    """The same rows as CC12M's TSV (``url<TAB>caption``, no header: evlp) and with a header line (img2dataset)."""
    directory.mkdir(parents=True, exist_ok=True)
    lines = "".join(f"{server.url}/r/{i}\ta photo number {i} of the benchmark\n" for i in rows)
    plain, headed = directory / "cc12m.tsv", directory / "with_header.tsv"
    plain.write_text(lines)
    headed.write_text("url\tcaption\n" + lines)
    return plain, headed


# -- the crawlers -----------------------------------------------------------------------------------------------


def run_evlp(index: Path, out: Path, threads: int, timeout: float) -> dict:
    command = [sys.executable, "-m", "evlp.cli", "download", "cc12m", "--data-path", str(out), "--index", str(index),
               "--max-rows", "all", "--concurrency", str(threads), "--retries", "0", "--timeout", str(timeout),
               "--image-size", "256"]
    seconds = _run(command)
    totals = json.loads((out / "conceptual_captions_12m" / "shards" / "stats.json").read_text())
    return dict(seconds=seconds, pairs=totals["num_samples"], failed=dict(totals["failed"]))


def run_img2dataset(binary: str, index: Path, out: Path, threads: int, processes: int, timeout: float) -> dict:
    command = [binary, "--url_list", str(index), "--input_format", "tsv", "--url_col", "url", "--caption_col",
               "caption", "--output_format", "webdataset", "--output_folder", str(out), "--processes_count",
               str(processes), "--thread_count", str(max(1, threads // processes)), "--number_sample_per_shard",
               "1000", "--image_size", "256", "--resize_mode", "keep_ratio", "--resize_only_if_bigger", "True",
               "--encode_quality", "95", "--retries", "0", "--timeout", str(int(timeout)), "--enable_wandb", "False"]
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1")  # no version check over the network
    seconds = _run(command, env=env)
    pairs, failed, messages = 0, Counter(), Counter()
    for stats_file in sorted(out.glob("*_stats.json")):
        stats = json.loads(stats_file.read_text())
        pairs += stats["successes"]
        for message, n in stats["status_dict"].items():
            if message != "success":
                failed[i2d_reason(message)] += n
                messages[message] += n
    return dict(seconds=seconds, pairs=pairs, failed=dict(failed.most_common()), messages=dict(messages.most_common()))


def i2d_reason(message: str) -> str:
    """evlp's reason name for one of img2dataset's error messages (its ``status_dict`` keys)."""
    m = re.search(r"HTTP Error (\d{3})", message)
    if m:
        return f"http_{m.group(1)}"
    lowered = message.lower()
    if "timed out" in lowered or "timeout" in lowered:
        return "timeout"
    if any(s in lowered for s in ("closed connection", "connection reset", "connection refused", "incompleteread",
                                  "remote end", "connection aborted", "broken pipe")):
        return "connection"
    if "decod" in lowered:  # img2dataset does not tell an HTML page from a truncated JPEG: evlp's two reasons
        return "not_an_image/decode_error"
    return "other"


def _run(command: list[str], env: dict | None = None) -> float:
    start = time.perf_counter()
    done = subprocess.run(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{Path(command[0]).name} failed ({done.returncode}):\n{done.stdout[-3000:]}")
    return seconds


# -- the benchmark ----------------------------------------------------------------------------------------------


def benchmark(rows: int, threads: int, repeats: int, timeout: float, img2dataset: str | None, seed: int = 0) -> dict:
    kinds, photos = plan(rows, seed)
    server = Server(kinds, photos, timeout)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    cores = os.cpu_count() or 1
    crawlers = {"evlp": lambda index, headed, out: run_evlp(index, out, threads, timeout)}
    if img2dataset:
        for processes in sorted({1, cores}):
            crawlers[f"img2dataset {processes}x{threads // processes}"] = (
                lambda index, headed, out, p=processes: run_img2dataset(img2dataset, headed, out, threads, p, timeout))
    runs: dict[str, list[dict]] = {name: [] for name in crawlers}
    startup: dict[str, float] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="evlp-crawl-bench-") as tmp:
            tmp = Path(tmp)
            # Start-up cost (and warm caches): 10 rows that answer at once.
            small = write_indexes(tmp / "warm", server, [i for i, kind in enumerate(kinds) if kind == "ok"][:10])
            for name, crawl in crawlers.items():
                startup[name] = crawl(*small, tmp / "warm" / name.replace(" ", "_"))["seconds"]
            index, headed = write_indexes(tmp, server, list(range(rows)))
            order = list(crawlers)
            for r in range(repeats):
                for name in order[r % len(order):] + order[: r % len(order)]:
                    out = tmp / f"{name.replace(' ', '_')}-{r}"
                    result = crawlers[name](index, headed, out)
                    result["pairs_per_s"] = result["pairs"] / result["seconds"]
                    # the crawl itself: the time past the start-up measured above
                    result["crawl_pairs_per_s"] = result["pairs"] / max(result["seconds"] - startup[name], 1e-3)
                    runs[name].append(result)
                    print(f"round {r + 1}/{repeats} {name}: {result['pairs']} pairs in {result['seconds']:.1f} s "
                          f"= {result['pairs_per_s']:.1f} pairs/s ({result['crawl_pairs_per_s']:.1f} past start-up)",
                          file=sys.stderr)
    finally:
        server.shutdown()
        server.server_close()
    served = Counter(kinds)
    return dict(
        rows=rows, threads=threads, repeats=repeats, timeout=timeout, served=dict(served.most_common()),
        loadable=served["ok"] + served["slow"], mean_photo_kb=round(sum(map(len, photos)) / len(photos) / 1024, 1),
        startup_seconds=startup, runs=runs,
        median_pairs_per_s={name: statistics.median(r["pairs_per_s"] for r in rs) for name, rs in runs.items()},
        median_crawl_pairs_per_s={name: statistics.median(r["crawl_pairs_per_s"] for r in rs)
                                  for name, rs in runs.items()},
        machine=f"{platform.processor() or platform.machine()}, {cores} cores, load average "
                f"{os.getloadavg()[0]:.1f} at the end",
        date=time.strftime("%Y-%m-%d"),
    )


def report(result: dict) -> str:
    lines = [f"{result['rows']} rows ({result['loadable']} loadable; served: "
             + ", ".join(f"{k} {v}" for k, v in result["served"].items())
             + f"), {result['threads']} requests in flight, timeout {result['timeout']:g} s, no retries, "
               f"{result['repeats']} rounds; {result['machine']}, {result['date']}",
             "", "| crawler | pairs/s (median) | min-max | past start-up (median) | pairs | wall s (median) | "
                 "start-up s | failed (by reason) |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for name, runs in result["runs"].items():
        rates = [r["pairs_per_s"] for r in runs]
        failed = ", ".join(f"{k} {v}" for k, v in runs[-1]["failed"].items())
        lines.append(f"| {name} | {statistics.median(rates):.1f} | {min(rates):.1f}-{max(rates):.1f} | "
                     f"{result['median_crawl_pairs_per_s'][name]:.1f} | {runs[-1]['pairs']} | "
                     f"{statistics.median(r['seconds'] for r in runs):.1f} | {result['startup_seconds'][name]:.1f} | "
                     f"{failed} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--img2dataset", default=None, help="img2dataset executable (in its own virtual environment)")
    p.add_argument("--only", choices=["evlp"], default=None, help="run evlp's crawler alone (no img2dataset)")
    p.add_argument("--rows", type=int, default=2500, help="URLs served (default 2500)")
    p.add_argument("--threads", type=int, default=64, help="requests in flight, both crawlers (default 64)")
    p.add_argument("--repeats", type=int, default=3, help="rounds, crawlers alternating (default 3)")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds per request, both crawlers (default 3)")
    p.add_argument("--json", default=None, help="also write the full result (every run) to this file")
    args = p.parse_args(argv)
    if args.only is None and not args.img2dataset:
        p.error("--img2dataset PATH is needed (or --only evlp)")
    result = benchmark(args.rows, args.threads, args.repeats, args.timeout, None if args.only else args.img2dataset)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    print(report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
