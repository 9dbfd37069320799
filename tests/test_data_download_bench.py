"""``evlp bench data`` at toy size: both readers run on the same images and the report is well formed."""

import argparse
import json

from evlp.bench.data import format_data_result, register_data, run_data_bench


def test_bench_data_times_shards_and_loose_files(capsys):
    result = run_data_bench(num_images=24, batch_size=4, batches=2, warmup=1, rounds=1)
    assert result["images"] == 24 and result["workers"] == 0
    assert result["shards_pairs_per_s"] > 0 and result["files_pairs_per_s"] > 0
    assert 10_000 < result["mean_image_bytes"] < 60_000  # photo-like JPEGs, not flat colours
    text = format_data_result(result)
    assert "shards (ImageTextShards)" in text and "loose files" in text and "per loader worker" in text

    parser = argparse.ArgumentParser()
    register_data(parser.add_subparsers(dest="bench_command"))
    args = parser.parse_args(["data", "--num-images", "12", "--batch-size", "4", "--batches", "1", "--warmup", "0",
                              "--rounds", "1", "--json"])
    assert args.handler(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["batch_size"] == 4 and printed["tokenizer"] == "quickstart vocabulary"
