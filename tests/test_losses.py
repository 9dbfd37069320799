"""Tests of evlp.losses: hand-computed CLIP/KD values, the memory bank, and 2-process gloo == 1 process."""

from __future__ import annotations

import io
import math
import multiprocessing
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from evlp.losses import ContrastiveDistillationLoss, ContrastiveLoss, gather_no_grad, gather_with_grad

KD_SCALE = 1 / 0.07
LOSS_KEYS = {"loss", "image_loss", "text_loss", "image_acc", "text_acc"}


def unit(rows) -> torch.Tensor:
    return F.normalize(torch.as_tensor(rows, dtype=torch.float32), dim=-1)


def random_unit(n: int, d: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


def np_ce(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean cross-entropy, computed independently of torch."""
    m = logits.max(axis=1, keepdims=True)
    logsumexp = m[:, 0] + np.log(np.exp(logits - m).sum(axis=1))
    return float(np.mean(logsumexp - logits[np.arange(len(labels)), labels]))


def np_acc(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(logits.argmax(axis=1) == labels))


def assert_value(actual: torch.Tensor, expected: float, tol: float = 1e-6) -> None:
    assert actual.dim() == 0 and actual.dtype == torch.float32
    assert actual.item() == pytest.approx(expected, rel=tol, abs=tol)


# ----------------------------------------------------------------------------------------------------------------------
# ContrastiveLoss (one process)


def test_contrastive_2x2_closed_form():
    # Image i is the basis vector e_i; the text vectors are e_0, e_1 rotated by 53.13 degrees (cos 0.6, sin 0.8).
    image = unit([[1.0, 0.0], [0.0, 1.0]])
    text = unit([[0.6, 0.8], [-0.8, 0.6]])
    s = 2.0
    out = ContrastiveLoss()(image, text, torch.tensor(s))
    assert set(out) == LOSS_KEYS
    # logits_per_image = s * [[0.6, -0.8], [0.8, 0.6]]: row 0 is right by 1.4 s, row 1 wrong by 0.2 s.
    # logits_per_text  = s * [[0.6, 0.8], [-0.8, 0.6]]: row 0 wrong by 0.2 s, row 1 right by 1.4 s.
    expected = (math.log1p(math.exp(-1.4 * s)) + math.log1p(math.exp(0.2 * s))) / 2
    assert_value(out["image_loss"], expected)
    assert_value(out["text_loss"], expected)
    assert_value(out["loss"], expected)
    assert out["image_acc"].item() == 0.5 and out["text_acc"].item() == 0.5


def test_contrastive_3x3_matches_numpy():
    image = unit([[1.0, 0.2, -0.3], [0.1, 1.0, 0.4], [-0.5, 0.3, 0.8]])
    text = unit([[0.9, -0.1, 0.2], [0.7, 0.6, 0.1], [0.2, -0.4, 1.0]])
    s = 5.0
    out = ContrastiveLoss()(image, text, torch.tensor(s))

    i, t, y = image.numpy().astype(np.float64), text.numpy().astype(np.float64), np.arange(3)
    i2t, t2i = s * i @ t.T, s * t @ i.T
    assert_value(out["image_loss"], np_ce(i2t, y))
    assert_value(out["text_loss"], np_ce(t2i, y))
    assert_value(out["loss"], (np_ce(i2t, y) + np_ce(t2i, y)) / 2)
    assert out["image_acc"].item() == pytest.approx(np_acc(i2t, y))
    assert out["text_acc"].item() == pytest.approx(np_acc(t2i, y))
    assert out["image_loss"].item() != pytest.approx(out["text_loss"].item())  # the two directions differ here
    assert not out["image_acc"].requires_grad and not out["text_acc"].requires_grad


def test_perfect_alignment_gives_zero_loss_and_full_accuracy():
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(0)))  # orthonormal rows
    clip = ContrastiveLoss()(q, q, torch.tensor(100.0))
    kd = ContrastiveDistillationLoss(6, memory_bank_size=0)(q, q, q, 100.0)
    for out in (clip, kd):
        assert out["loss"].item() < 1e-30
        assert out["image_acc"].item() == 1.0 and out["text_acc"].item() == 1.0


def test_gathers_are_identity_without_distributed():
    x = torch.randn(3, 4, requires_grad=True)
    assert gather_with_grad(x) is x
    constant = gather_no_grad(x)
    assert not constant.requires_grad and torch.equal(constant, x.detach())


# ----------------------------------------------------------------------------------------------------------------------
# ContrastiveDistillationLoss (one process)


def expected_kd(image, text, teacher, candidates_after_batch, s=KD_SCALE) -> dict[str, float]:
    """KD loss by numpy: candidates = current teacher batch followed by ``candidates_after_batch`` (bank rows)."""
    keys = np.concatenate([teacher.numpy(), candidates_after_batch.numpy()]).astype(np.float64)
    y = np.arange(len(image))
    i2i, t2i = s * image.numpy().astype(np.float64) @ keys.T, s * text.numpy().astype(np.float64) @ keys.T
    return {
        "image_loss": np_ce(i2i, y),
        "text_loss": np_ce(t2i, y),
        "loss": (np_ce(i2i, y) + np_ce(t2i, y)) / 2,
        "image_acc": np_acc(i2i, y),
        "text_acc": np_acc(t2i, y),
    }


def assert_kd(out: dict, expected: dict) -> None:
    assert set(out) == LOSS_KEYS
    for key, value in expected.items():
        assert_value(out[key], value, tol=1e-5)


def test_kd_3x3_without_bank_matches_numpy():
    image = unit([[1.0, 0.2, -0.3], [0.1, 1.0, 0.4], [-0.5, 0.3, 0.8]])
    text = unit([[0.9, -0.1, 0.2], [0.7, 0.6, 0.1], [0.2, -0.4, 1.0]])
    teacher = unit([[0.8, 0.1, 0.1], [0.3, 0.9, -0.2], [0.0, 0.1, 1.0]])
    out = ContrastiveDistillationLoss(3, memory_bank_size=8)(image, text, teacher, KD_SCALE, use_memory_bank=False)
    assert_kd(out, expected_kd(image, text, teacher, torch.empty(0, 3)))


def push(loss: ContrastiveDistillationLoss, teacher: torch.Tensor) -> None:
    """One training forward whose only lasting effect is pushing ``teacher`` into the bank."""
    loss.train()
    student = random_unit(len(teacher), teacher.shape[1], seed=99)
    loss(student, student, teacher, KD_SCALE)


def reference_bank(history: list[torch.Tensor], size: int, dim: int) -> torch.Tensor:
    """The bank a one-row-at-a-time FIFO ring buffer would hold after writing every row of ``history`` in order."""
    bank = torch.zeros(size, dim)
    for t, row in enumerate(torch.cat(history)):
        bank[t % size] = row
    return bank


@pytest.mark.parametrize(
    "size, push_sizes",
    [
        (5, [2, 2, 2, 3]),  # wraps around, 2 does not divide 5
        (6, [6, 6, 1]),  # exactly full, then overwritten
        (4, [1, 6, 3]),  # a push larger than the bank, mid-ring
        (3, [10]),  # a push larger than the bank, into an empty bank
    ],
)
def test_bank_is_a_fifo_ring(size, push_sizes):
    dim = 4
    loss = ContrastiveDistillationLoss(dim, memory_bank_size=size)
    history, total = [], 0
    for step, n in enumerate(push_sizes):
        teacher = random_unit(n, dim, seed=step)
        push(loss, teacher)
        history.append(teacher)
        total += n
        assert torch.equal(loss.memory_bank, reference_bank(history, size, dim))
        assert loss.bank_pointer.item() == total % size
        assert loss.bank_filled.item() == min(total, size)
        assert loss.bank_pointer.dtype == loss.bank_filled.dtype == torch.int64
        assert loss.memory_bank.dtype == torch.float32


def test_bank_rows_are_candidates_only_once_written():
    dim, size, batch = 4, 8, 2
    loss = ContrastiveDistillationLoss(dim, memory_bank_size=size)
    image, text, teacher = random_unit(batch, dim, 10), random_unit(batch, dim, 11), random_unit(batch, dim, 12)
    history: list[torch.Tensor] = []

    # Empty bank: in-batch only; the current batch is pushed after the loss, so it is not its own negative.
    loss.train()
    assert_kd(loss(image, text, teacher, KD_SCALE), expected_kd(image, text, teacher, torch.empty(0, dim)))
    history.append(teacher)
    assert loss.bank_filled.item() == batch

    # Partly filled (2 + 3 = 5 of 8 rows): exactly the 5 written rows join; the 3 zero rows would add e^0 terms.
    pushed = random_unit(3, dim, 13)
    push(loss, pushed)
    history.append(pushed)
    loss.eval()
    out = loss(image, text, teacher, KD_SCALE)
    assert_kd(out, expected_kd(image, text, teacher, torch.cat(history)))
    assert out["loss"].item() != pytest.approx(expected_kd(image, text, teacher, loss.memory_bank)["loss"])

    # Over-full (5 + 7 = 12 > 8): the newest 8 rows.
    pushed = random_unit(7, dim, 14)
    push(loss, pushed)
    history.append(pushed)
    loss.eval()
    assert_kd(loss(image, text, teacher, KD_SCALE), expected_kd(image, text, teacher, torch.cat(history)[-size:]))


def test_gradients_match_the_direct_formulas():
    # The 2-process test compares against this module in one process, so check one-process gradients independently.
    image, text = random_unit(4, 5, 0).requires_grad_(), random_unit(4, 5, 1).requires_grad_()
    scale = torch.tensor(7.0, requires_grad=True)
    teacher, bank, y = random_unit(4, 5, 2), random_unit(3, 5, 3), torch.arange(4)

    def assert_same_gradients(loss, direct):
        leaves = (image, text, scale)
        for got, want in zip(torch.autograd.grad(loss, leaves), torch.autograd.grad(direct, leaves)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)

    assert_same_gradients(
        ContrastiveLoss()(image, text, scale)["loss"],
        (F.cross_entropy(scale * image @ text.T, y) + F.cross_entropy(scale * text @ image.T, y)) / 2,
    )

    kd = ContrastiveDistillationLoss(5, memory_bank_size=6)
    push(kd, bank)  # 3 of 6 rows written
    kd_loss = kd(image, text, teacher, scale)["loss"]  # a training forward: pushes in place before our backward
    assert kd.bank_filled.item() == 6
    keys = torch.cat([teacher, bank])
    assert_same_gradients(
        kd_loss, (F.cross_entropy(scale * image @ keys.T, y) + F.cross_entropy(scale * text @ keys.T, y)) / 2
    )


def test_bank_untouched_without_use_or_in_eval():
    loss = ContrastiveDistillationLoss(4, memory_bank_size=6)
    push(loss, random_unit(4, 4, 0))
    before = {k: v.clone() for k, v in loss.state_dict().items()}
    image, text, teacher = random_unit(3, 4, 1), random_unit(3, 4, 2), random_unit(3, 4, 3)

    loss.train()
    out = loss(image, text, teacher, KD_SCALE, use_memory_bank=False)
    assert_kd(out, expected_kd(image, text, teacher, torch.empty(0, 4)))
    loss.eval()
    loss(image, text, teacher, KD_SCALE)  # uses the bank, eval mode does not update it
    for key, value in loss.state_dict().items():
        assert torch.equal(value, before[key]), key

    loss(image, text, teacher, KD_SCALE, update_memory_bank=True)  # an explicit request still pushes
    assert loss.bank_filled.item() == 6 and loss.bank_pointer.item() == 1


def test_state_dict_round_trip_resumes_exactly():
    dim, size = 4, 7
    loss = ContrastiveDistillationLoss(dim, memory_bank_size=size)
    for step in range(3):
        push(loss, random_unit(3, dim, step))  # 9 rows into 7: wrapped, pointer 2
    assert set(loss.state_dict()) == {"memory_bank", "bank_pointer", "bank_filled"}

    buffer = io.BytesIO()
    torch.save(loss.state_dict(), buffer)
    buffer.seek(0)
    resumed = ContrastiveDistillationLoss(dim, memory_bank_size=size)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    for key, value in loss.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key

    image, text, teacher = random_unit(3, dim, 10), random_unit(3, dim, 11), random_unit(3, dim, 12)
    for module in (loss, resumed):
        module.train()
    a, b = loss(image, text, teacher, KD_SCALE), resumed(image, text, teacher, KD_SCALE)
    for key in LOSS_KEYS:
        assert torch.equal(a[key], b[key]), key
    for key, value in loss.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key


def test_size_zero_disables_the_bank():
    loss = ContrastiveDistillationLoss(4, memory_bank_size=0)
    assert loss.memory_bank.shape == (0, 4)
    image, text, teacher = random_unit(3, 4, 1), random_unit(3, 4, 2), random_unit(3, 4, 3)
    loss.train()
    for _ in range(2):
        assert_kd(loss(image, text, teacher, KD_SCALE), expected_kd(image, text, teacher, torch.empty(0, 4)))
    assert loss.bank_filled.item() == 0 and loss.bank_pointer.item() == 0
    with pytest.raises(ValueError, match="memory_bank_size"):
        ContrastiveDistillationLoss(4, memory_bank_size=-1)


def test_shape_mismatch_is_a_clear_error():
    loss = ContrastiveDistillationLoss(4, memory_bank_size=0)
    with pytest.raises(ValueError, match="same"):
        loss(random_unit(3, 4, 0), random_unit(2, 4, 1), random_unit(3, 4, 2), KD_SCALE)
    with pytest.raises(ValueError, match="built for 4"):
        loss(random_unit(3, 5, 0), random_unit(3, 5, 1), random_unit(3, 5, 2), KD_SCALE)


def test_half_precision_features_give_float32_logits_and_bank():
    dim = 8
    image, text, teacher = (random_unit(4, dim, seed).bfloat16() for seed in (1, 2, 3))
    kd = ContrastiveDistillationLoss(dim, memory_bank_size=16)
    push(kd, random_unit(5, dim, 4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        clip_out = ContrastiveLoss()(image, text, torch.tensor(100.0))
        kd_out = kd(image, text, teacher, KD_SCALE)
    # Same values as float32 maths on the (bf16-rounded) inputs: nothing was computed in bf16.
    clip_ref = ContrastiveLoss()(image.float(), text.float(), torch.tensor(100.0))
    kd_ref = expected_kd(image.float(), text.float(), teacher.float(), kd.memory_bank[:5])
    for key in LOSS_KEYS:
        assert clip_out[key].dtype == torch.float32
        torch.testing.assert_close(clip_out[key], clip_ref[key], rtol=1e-6, atol=1e-6)
        assert_value(kd_out[key], kd_ref[key], tol=1e-5)
    assert kd.memory_bank.dtype == torch.float32
    assert torch.equal(kd.memory_bank[5:9], teacher.float())  # pushed, exactly representable in float32


# ----------------------------------------------------------------------------------------------------------------------
# Two gloo processes == one process on the concatenated batch

WORLD, LOCAL_BATCH, STEPS, DIM = 2, 3, 4, 8
BANK_SIZES = {"kd": 10, "kd_small": 4}  # global batch 6: 10 wraps mid-push, 4 is smaller than one push


class Tower(nn.Module):
    """A tiny student: one linear map per modality and a learnable log logit scale, as in S-SMKE's ITC."""

    def __init__(self):
        super().__init__()
        self.image = nn.Linear(6, DIM)
        self.text = nn.Linear(5, DIM)
        self.log_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(self, x_image, x_text):
        return F.normalize(self.image(x_image), dim=-1), F.normalize(self.text(x_text), dim=-1), self.log_scale.exp()


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    n = WORLD * LOCAL_BATCH
    return torch.randn(n, 6, generator=g), torch.randn(n, 5, generator=g), F.normalize(torch.randn(n, DIM, generator=g))


def make_student() -> Tower:
    torch.manual_seed(0)
    return Tower()


def train_step(model: nn.Module, losses: dict[str, nn.Module], x_image, x_text, teacher) -> dict:
    """ITC + two banked KD losses + the in-batch KD; per-loss feature gradients, then one backward of the sum."""
    image, text, scale = model(x_image, x_text)
    outs = {
        "itc": losses["itc"](image, text, scale),
        "kd": losses["kd"](image, text, teacher, KD_SCALE),
        "kd_small": losses["kd_small"](image, text, teacher, KD_SCALE),
        "val": losses["kd"](image, text, teacher, KD_SCALE, use_memory_bank=False),
    }
    feature_grads = {
        name: torch.autograd.grad(out["loss"], (image, text), retain_graph=True) for name, out in outs.items()
    }
    model.zero_grad()
    sum(out["loss"] for out in outs.values()).backward()
    if dist.is_initialized():
        # What DDP's reducer does: all-reduce the sum, divide by W. (DDP itself is not built: it imports
        # torch._dynamo, seconds of CPU per process, and adds nothing to what is tested here.)
        for p in model.parameters():
            dist.all_reduce(p.grad)
            p.grad /= WORLD
    return {
        "losses": {name: {k: v.detach() for k, v in out.items()} for name, out in outs.items()},
        "feature_grads": feature_grads,
        "param_grads": {name: p.grad.clone() for name, p in model.named_parameters()},
        "banks": {name: {k: v.clone() for k, v in losses[name].state_dict().items()} for name in BANK_SIZES},
    }


def make_losses() -> dict[str, nn.Module]:
    losses = {"itc": ContrastiveLoss()}
    losses.update({name: ContrastiveDistillationLoss(DIM, memory_bank_size=size) for name, size in BANK_SIZES.items()})
    return losses


def distributed_worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        model = make_student()  # same seed on every rank, as DDP's initial broadcast would ensure
        losses = make_losses()
        rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        results = [train_step(model, losses, *(x[rows] for x in global_batch(step))) for step in range(STEPS)]
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


def test_two_gloo_ranks_equal_one_process(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=distributed_worker, args=(rank, port, str(tmp_path))) for rank in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    for p in procs:
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in procs] == [0] * WORLD
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]

    model, losses = make_student(), make_losses()
    single = [train_step(model, losses, *global_batch(step)) for step in range(STEPS)]

    for step in range(STEPS):
        ref, per_rank = single[step], [r[step] for r in ranks]
        for name, ref_out in ref["losses"].items():
            # Each rank's loss (and accuracy) is a mean over its B rows: their mean is the mean over all B*W rows.
            for key in LOSS_KEYS:
                close(sum(r["losses"][name][key] for r in per_rank) / WORLD, ref_out[key])
            # A rank's feature gradient is that of the *sum* of the rank losses (ITC: the all_gather backward adds
            # the other ranks' terms; KD: other ranks' losses do not depend on these rows), i.e. WORLD x the
            # single-process gradient of the mean, restricted to this rank's rows.
            for rank, r in enumerate(per_rank):
                rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
                for got, want in zip(r["feature_grads"][name], ref["feature_grads"][name]):
                    close(got, WORLD * want[rows])
        # ...so the DDP average of the parameter gradients is the single-process gradient, on every rank.
        for r in per_rank:
            for name, grad in ref["param_grads"].items():
                close(r["param_grads"][name], grad)
        # Every rank writes the same gathered teacher vectors: identical banks, equal to the single-process bank.
        for name in BANK_SIZES:
            for r in per_rank:
                for key, value in ref["banks"][name].items():
                    assert torch.equal(r["banks"][name][key], value), (step, name, key)

    # The bank was in use: full, and its extra negatives raise the loss above the in-batch one.
    assert single[-1]["banks"]["kd"]["bank_filled"].item() == BANK_SIZES["kd"]
    assert single[-1]["losses"]["kd"]["loss"] > single[-1]["losses"]["val"]["loss"]
