"""`evlp bench train` end to end on a tiny config on CPU (in-process, JSON and text), `evlp bench eval` and
`evlp bench data` (three readers) at toy size, and benchmarks/gpu_check.sh in its CPU flow-check mode."""

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from evlp.bench.commands import register
from evlp.bench.report import markdown_table
from evlp.bench.train import matching_open_clip
from evlp.config import load_config
from evlp.models.build import build_student
from tests.needs import need_module
from tests.test_bench_fastpaths import TINY
from tests.test_flops import counted, counted_open_clip

ROOT = Path(__file__).resolve().parents[1]
FIGURES = {"pairs_per_s", "step_ms", "gflops_per_pair", "achieved_tflops", "mfu", "peak_mem_gb"}


def bench(capsys, *args) -> str:
    parser = argparse.ArgumentParser(prog="evlp")
    register(parser.add_subparsers(dest="command", required=True))
    parsed = parser.parse_args(["bench", "train", "--config", "quickstart", *TINY, "--batch-size", "4",
                                "--steps", "2", "--warmup", "1", "--device", "cpu", *args])
    assert parsed.handler(parsed) == 0
    return capsys.readouterr().out


def test_bench_train_json_with_open_clip(capsys):
    need_module("open_clip")
    result = json.loads(bench(capsys, "--vs", "open_clip", "--json"))
    assert FIGURES <= result.keys() and FIGURES <= result["open_clip"].keys()
    assert result["device"] == "cpu" and result["mfu"] is None and result["open_clip"]["mfu"] is None
    assert result["batch_size"] == 4 and result["precision"] == "32-true" and result["compile"] is False
    assert result["pairs_per_s"] > 0 and result["peak_mem_gb"] > 0

    # The work per pair, against what torch's FLOP counter counts on the same models (tests/test_flops.py).
    cfg = load_config("quickstart", TINY)
    c = counted(cfg)
    g = result["gflops_per_pair"]
    assert g["student_forward"] * 1e9 == pytest.approx(c["forward"])
    assert g["teacher"] * 1e9 == pytest.approx(c["teacher"])
    evlp_flops = c["train"] + c["image_input_gradient"] + c["teacher"]  # the 3x convention counts the images' gradient
    assert g["total"] * 1e9 == pytest.approx(evlp_flops)
    with torch.device("meta"):
        student = build_student(cfg.model, kd_dim=cfg.model.teacher.width, load_weights=False)
        open_clip_model = matching_open_clip(student, cfg.data.max_text_len, cfg.data.image_size)
    other = result["open_clip"]
    # the same convention for open_clip (no teacher): forward + backward = 3 x the forward torch counts
    open_clip_flops = 3 * counted_open_clip(open_clip_model, cfg.data.max_text_len, cfg.data.image_size, "meta")
    assert other["gflops_per_pair"]["teacher"] == 0 and other["gflops_per_pair"]["total"] * 1e9 == pytest.approx(
        open_clip_flops)
    # achieved FLOP/s = pairs/s x FLOPs per pair, for each model and in their ratio
    assert result["achieved_tflops"] * 1e12 == pytest.approx(result["pairs_per_s"] * evlp_flops)
    assert other["flops_ratio"] == pytest.approx(result["pairs_per_s"] * evlp_flops
                                                 / (other["pairs_per_s"] * open_clip_flops))
    table = markdown_table([result])
    assert table.count("\n") == 3 and "| evlp |" in table and "| open_clip |" in table


def test_bench_train_text_report(capsys):
    out = bench(capsys)
    assert "student shared_block" in out and "GFLOP/s" in out and "\nevlp " in out and "open_clip" not in out


def test_bench_eval_times_the_ranking_and_the_score_matrix_alone(capsys):
    parser = argparse.ArgumentParser(prog="evlp")
    register(parser.add_subparsers(dest="command", required=True))
    small = ["--images", "50", "--captions", "251", "--dim", "8", "--runs", "2", "--chunk-size", "16",
             "--device", "cpu"]
    for args in [small + ["--json"], small]:
        parsed = parser.parse_args(["bench", "eval", *args])
        assert parsed.handler(parsed) == 0
    result, text = capsys.readouterr().out.split("}\n", 1)
    result = json.loads(result + "}")
    assert result["images"] == 50 and result["captions"] == 251 and result["runs"] == 2 and result["device"] == "cpu"
    assert 0 < result["min_s"] <= result["median_s"] <= result["max_s"]
    assert 0 < result["matmul_min_s"] <= result["matmul_median_s"] <= result["matmul_max_s"]
    with FlopCounterMode(display=False) as counter:  # the score matrix of 50 images x 251 captions, 8-d
        torch.randn(251, 8) @ torch.randn(50, 8).T
    assert result["gflop"] * 1e9 == pytest.approx(counter.get_total_flops())
    assert "retrieval ranking, 50 images x 251 captions, 8-d" in text and "the score matrix alone" in text


def test_bench_data_times_the_stock_torchvision_reader_next_to_evlp(capsys):
    parser = argparse.ArgumentParser(prog="evlp")
    register(parser.add_subparsers(dest="command", required=True))
    toy = ["--num-images", "16", "--batch-size", "4", "--batches", "2", "--warmup", "1", "--rounds", "2"]
    for args in [toy + ["--json"], toy + ["--normalize-on-cpu"]]:
        parsed = parser.parse_args(["bench", "data", *args])
        assert parsed.handler(parsed) == 0
    result, text = capsys.readouterr().out.split("}\n", 1)
    result = json.loads(result + "}")
    assert result["readers"]["stock"] == "ImageFolder + stock torchvision"
    assert result["image_dtype"] == "uint8" and result["stock_image_dtype"] == "float32"
    for reader in ("shards", "files", "stock"):
        assert len(result["rounds"][reader]) == 2 and all(rate > 0 for rate in result["rounds"][reader])
        assert result[f"{reader}_pairs_per_s"] > 0 and result["per_worker"][reader] > 0
    # the reported rates and ratios, from the raw per-round rates: medians and the range of round-by-round ratios
    rounds, ratios = result["rounds"], result["ratios"]
    for reader in ("shards", "files", "stock"):
        assert result[f"{reader}_pairs_per_s"] == pytest.approx(statistics.median(rounds[reader]))
    assert ratios["shards_over_stock"] == pytest.approx(statistics.median(rounds["shards"])
                                                        / statistics.median(rounds["stock"]))
    per_round = [a / b for a, b in zip(rounds["shards"], rounds["stock"])]
    assert ratios["per_round_shards_over_stock"] == pytest.approx([min(per_round), max(per_round)])
    assert "evlp shards (ImageTextShards)" in text and "loose files, evlp transform" in text
    assert "ImageFolder + stock torchvision" in text and "normalised on the CPU (always" in text
    assert "float32, normalised on the CPU" in text.split("loose files, evlp transform")[1].split("\n")[0]


def test_gpu_check_flow_on_cpu(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path)}
    run = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--device", "cpu", "--tiny"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    report = (tmp_path / "gpu_check.md").read_text()
    assert report == run.stdout
    assert "torch " in report and "evlp bench train --config quickstart" in report
    rows = [line for line in report.splitlines() if line.startswith("| quickstart |")]
    assert [row.split(" | ")[3:5] for row in rows] == [
        ["eager", "evlp"], ["eager", "open_clip"], ["compiled", "evlp"], ["compiled", "open_clip"]]
