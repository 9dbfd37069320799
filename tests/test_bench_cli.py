"""`evlp bench train` end to end on a tiny config on CPU (in-process, JSON and text), `evlp bench eval`,
`evlp bench data` (three readers, or the shard reader alone) and `evlp bench max-batch` at toy size, and
benchmarks/gpu_check.sh in its CPU flow-check mode."""

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from webdataset.tariterators import tarfile_samples

from evlp.bench.commands import register
from evlp.bench.data import format_data_result, run_data_bench, write_synthetic_shards
from evlp.bench.report import format_max_batch, markdown_table
from evlp.bench.train import EvlpStep, largest_batch, matching_open_clip
from evlp.config import load_config
from evlp.errors import EvlpError
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


def test_bench_data_times_the_shard_reader_alone(capsys):
    parser = argparse.ArgumentParser(prog="evlp")
    register(parser.add_subparsers(dest="command", required=True))
    parsed = parser.parse_args(["bench", "data", "--num-images", "16", "--batch-size", "4", "--batches", "2",
                                "--warmup", "1", "--rounds", "1", "--readers", "shards", "--json"])
    assert parsed.handler(parsed) == 0
    result = json.loads(capsys.readouterr().out)
    assert list(result["readers"]) == ["shards"] and result["shards_pairs_per_s"] > 0
    assert "files_pairs_per_s" not in result and result["ratios"] == {}
    assert result["per_worker"] == {"shards": result["shards_pairs_per_s"]}
    text = format_data_result(result)
    assert "evlp shards (ImageTextShards)" in text and "loose files" not in text and "ratio" not in text
    with pytest.raises(EvlpError, match="--readers shards,photos"):
        run_data_bench(readers=("shards", "photos"))


def test_synthetic_shards_are_the_same_whatever_the_number_of_writers(tmp_path):
    def samples(folder):
        return [{k: v for k, v in s.items() if k != "__url__"} for s in tarfile_samples(
            [dict(url=str(p)) for p in sorted(folder.glob("*.tar"))])]

    one = write_synthetic_shards(tmp_path / "one", 6, shard_size=3)
    two = write_synthetic_shards(tmp_path / "two", 6, shard_size=3, workers=2)
    assert len(samples(one)) == 6 and samples(one) == samples(two)
    assert (one / "stats.json").read_text() == (two / "stats.json").read_text()


def test_largest_batch_doubles_then_bisects_to_the_multiple():
    later = time.monotonic() + 60
    result = largest_batch(lambda b: 1e6 * b if b <= 1000 else None, start=256, limit=1 << 20, multiple=32,
                           deadline=later)
    assert (result["largest_fit"], result["smallest_failed"], result["complete"]) == (992, 1024, True)
    assert [p["batch_size"] for p in result["probes"]] == [256, 512, 1024, 768, 896, 960, 992]
    assert result["probes"][0] == {"batch_size": 256, "fits": True, "peak_mem_gb": 0.256}
    assert result["probes"][2] == {"batch_size": 1024, "fits": False, "peak_mem_gb": None}
    # the limit is an answer; a start that does not fit bisects downwards; nothing starts after the deadline
    assert largest_batch(lambda b: 1.0, 256, 600, 32, later)["largest_fit"] == 600
    low = largest_batch(lambda b: 1.0 if b <= 100 else None, 256, 1 << 20, 32, later)
    assert (low["largest_fit"], low["smallest_failed"], low["complete"]) == (96, 128, True)
    late = largest_batch(lambda b: 1.0, 256, 1 << 20, 32, time.monotonic())
    assert (late["largest_fit"], late["probes"], late["complete"]) == (None, [], False)


def test_bench_max_batch_steps_until_out_of_memory(capsys, monkeypatch):
    """On the device, a step that runs out of memory raises torch.cuda.OutOfMemoryError: stand in for it on CPU."""
    step = EvlpStep.step

    def step_with_memory_of_10_pairs(self, batch):
        if batch["image"].shape[0] > 10:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        step(self, batch)

    monkeypatch.setattr(EvlpStep, "step", step_with_memory_of_10_pairs)
    parser = argparse.ArgumentParser(prog="evlp")
    register(parser.add_subparsers(dest="command", required=True))
    args = ["bench", "max-batch", "--config", "quickstart", *TINY, "--start", "4", "--limit", "64", "--multiple",
            "2", "--steps", "1", "--device", "cpu"]
    parsed = parser.parse_args([*args, "--json"])
    assert parsed.handler(parsed) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["largest_fit"], result["smallest_failed"], result["complete"]) == (10, 12, True)
    assert [(p["batch_size"], p["fits"]) for p in result["probes"]] == [(4, True), (8, True), (16, False),
                                                                        (12, False), (10, True)]
    assert format_max_batch(result).splitlines()[1] == "largest batch that fits: 10 (12 did not)"
    parsed = parser.parse_args([a for a in args if a not in ("--limit", "64")])
    with pytest.raises(EvlpError, match="on CPU needs --limit"):
        parsed.handler(parsed)


def test_gpu_check_refuses_a_missing_wheel_folder_in_one_line(tmp_path):
    run = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--wheels", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.startswith(f"gpu_check: no wheels in {tmp_path}: run benchmarks/gpu_wheels.sh")


def test_gpu_check_reads_a_parts_json_after_what_libraries_printed_and_fails_a_part_without_one(monkeypatch):
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", gpu_check)  # dataclasses look their module up there
    spec.loader.exec_module(gpu_check)
    printed = gpu_check.Outcome(["python"], "ok", 1.0, stdout='a notice\n{\n  "pairs_per_s": 2.5\n}\ntrailer\n')
    assert gpu_check.result_of(printed) == {"pairs_per_s": 2.5} and printed.status == "ok"
    garbled = gpu_check.Outcome(["python"], "ok", 1.0, stdout="Segmentation fault\n")
    assert gpu_check.result_of(garbled) is None and garbled.status == "failed"
    assert "gpu_check: no JSON result in its output" in garbled.stderr


def test_gpu_check_flow_on_cpu(tmp_path):
    """Every part of the GPU check at toy size, with this interpreter (the GPU machine's comes with --wheels)."""
    env = {**os.environ, "OUT": str(tmp_path)}
    run = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--python", sys.executable,
                          "--device", "cpu", "--tiny"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    report = (tmp_path / "gpu_check.md").read_text()
    assert report == run.stdout
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert {name: part["status"] for name, part in result["parts"].items()} == {
        name: "ok" for name in ("versions", "bench-eager", "train: write the shards", "train", "data (2 workers)",
                                "max-batch", "profile", "bench-compiled")}
    assert result["versions"]["evlp_from"].startswith(str(ROOT / "src"))  # this checkout's code ran
    assert all(p["in_range"] for p in result["versions"]["packages"])
    assert "evlp bench train --config quickstart" in report and f"torch {torch.__version__}" in report
    rows = [line for line in report.splitlines() if line.startswith("| quickstart |")]
    assert [row.split(" | ")[3:5] for row in rows] == [
        ["eager", "evlp"], ["eager", "open_clip"], ["compiled", "evlp"], ["compiled", "open_clip"]]
    train = result["train"]
    assert train["steps"] == 6 and train["windows"] == 3 and train["steady_windows"] == 2
    assert train["pairs_per_s_median"] > 0 and train["checkpoints_kept"] and train["mfu_median"] is None
    assert "6 steps; 2 of 3 logged windows" in report
    assert result["data"][0]["workers"] == 2 and result["data"][0]["shards_pairs_per_s"] > 0
    assert "| 2 | " in report.split("#### (c)")[1]
    assert result["max-batch"]["largest_fit"] == 16 and "Largest batch that fits: **16**" in report
    top = result["profile"]["top"]
    assert result["profile"]["time"] == "self_cpu_time_total" and len(top) == 12 and top[0]["share"] > 0
    assert f"| `{top[0]['name']}` |" in report.split("#### Where the eager step's time goes")[1]
    assert (tmp_path / "gpu_check.log").stat().st_size > 0
