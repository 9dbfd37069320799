"""benchmarks/crawl_vs_img2dataset.py at toy size: the served failure mix reaches evlp's crawler as the reasons it
should count, and img2dataset's messages map to the same reasons (img2dataset itself runs in its own environment,
so its side is run by hand: docs/benchmarks.md)."""

import importlib.util
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "crawl_vs_img2dataset.py"


def load_script():
    spec = importlib.util.spec_from_file_location("crawl_vs_img2dataset", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_evlp_side_counts_exactly_the_failures_served(tmp_path):
    out = tmp_path / "result.json"
    subprocess.run([sys.executable, str(SCRIPT), "--only", "evlp", "--rows", "60", "--repeats", "1", "--threads", "16",
                    "--json", str(out)], check=True, capture_output=True)
    result = json.loads(out.read_text())
    served = Counter(result["served"])
    assert sum(served.values()) == 60 and served["ok"] > 30 and len(served) == 9  # every kind of the mix
    run = result["runs"]["evlp"][0]
    assert run["pairs"] == served["ok"] + served["slow"] == result["loadable"]
    expected = {"http_404": served["http_404"], "http_403": served["http_403"], "http_410": served["http_410"],
                "not_an_image": served["html"], "decode_error": served["truncated"], "timeout": served["timeout"],
                "connection": served["closed"]}
    assert run["failed"] == {k: v for k, v in expected.items() if v}
    assert run["pairs_per_s"] > 0 and result["startup_seconds"]["evlp"] > 0


def test_img2dataset_messages_map_to_evlp_reasons():
    reason = load_script().i2d_reason
    # the messages img2dataset 1.47.0 wrote in the benchmark's _stats.json files
    assert reason("HTTP Error 404: Not Found") == "http_404" and reason("HTTP Error 410: Gone") == "http_410"
    assert reason("timed out") == "timeout" and reason("<urlopen error timed out>") == "timeout"
    assert reason("Remote end closed connection without response") == "connection"
    assert reason("Image decoding error") == "not_an_image/decode_error"
    assert reason("something new") == "other"
