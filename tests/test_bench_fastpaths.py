"""The fast paths of the training step give the same loss as the plain ones, on one tiny batch on CPU: SDPA vs
explicit attention in every tower, torch.compile vs eager, gradient checkpointing vs stored activations, bf16
autocast vs fp32. Also: BERT really runs SDPA, and the step makes no host-device synchronisation."""

import copy

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from evlp.bench.train import EvlpStep, synthetic_batch
from evlp.config import load_config
from evlp.train.module import PretrainModule

TINY = [
    "model.embed_dim=32", "model.num_heads=2", "model.depth=1",
    "model.image_tower.width=32", "model.image_tower.num_heads=2", "model.image_tower.img_size=32",
    "model.text_tower.width=32", "model.text_tower.num_heads=2", "model.text_tower.max_positions=16",
    "model.teacher.width=32", "model.teacher.num_heads=2", "model.teacher.depth=1", "model.teacher.img_size=32",
    "data.image_size=32", "data.max_text_len=12", "loss.memory_bank_size=64",
]
VOCAB = 30522  # a random text tower gets BERT's vocabulary


def tiny_module(**train) -> PretrainModule:
    """The tiny S-SMKE step in train mode with every dropout off, so that two code paths can be compared."""
    torch.manual_seed(0)
    module = PretrainModule(load_config("quickstart", TINY), load_weights=False).train()
    for m in module.modules():
        if isinstance(m, nn.Dropout):  # BERT's attention dropout reads its probability from these too
            m.p = 0.0
    return module


@pytest.fixture(scope="module")
def module() -> PretrainModule:
    return tiny_module()


@pytest.fixture(scope="module")
def batch() -> dict:
    return synthetic_batch(load_config("quickstart", TINY), 6, VOCAB, torch.device("cpu"))


def loss_of(module: PretrainModule, batch: dict) -> torch.Tensor:
    """The training loss (KD with the memory bank + both ITC levels), leaving the bank untouched."""
    module.kd_loss.eval()
    try:
        return module._losses(batch, train=True)["loss"]
    finally:
        module.kd_loss.train()


def test_shared_block_sdpa_matches_explicit_attention(module, batch):
    explicit = copy.deepcopy(module)
    explicit.student.shared.attn.fused = False
    torch.testing.assert_close(loss_of(module, batch), loss_of(explicit, batch), rtol=1e-5, atol=1e-5)


def test_timm_towers_fused_attention_matches_explicit(module, batch):
    explicit = copy.deepcopy(module)
    switched = 0
    for m in [*explicit.student.image_tower.modules(), *explicit.teacher.modules()]:
        if hasattr(m, "fused_attn"):
            m.fused_attn, switched = False, switched + 1
    assert switched == 2  # one image block, one teacher block
    torch.testing.assert_close(loss_of(module, batch), loss_of(explicit, batch), rtol=1e-5, atol=1e-5)


def test_every_attention_runs_sdpa_and_bert_matches_eager(module, batch, monkeypatch):
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def counting_sdpa(*args, **kwargs):
        calls.append(kwargs.get("attn_mask"))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting_sdpa)
    fused = loss_of(module, batch)
    # teacher 1 + image tower 1 + text tower 1 + the shared block on each modality 2
    assert len(calls) == 5
    monkeypatch.undo()

    eager = copy.deepcopy(module)
    assert eager.student.text_tower.bert.config._attn_implementation == "sdpa"
    eager.student.text_tower.bert.set_attn_implementation("eager")  # HF builds its own mask from the 2-D one
    torch.testing.assert_close(fused, loss_of(eager, batch), rtol=1e-5, atol=1e-5)


class HostSyncs(TorchFunctionMode):
    """Records every tensor -> Python conversion (each one waits for the GPU to finish the queued work)."""

    SYNCS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy", "cpu"}

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self.SYNCS:
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


def test_training_step_forward_and_backward_make_no_host_sync(batch):
    module = tiny_module()
    with HostSyncs() as syncs:
        for _ in range(2):  # the second step sees a non-empty memory bank
            out = module._losses(batch, train=True)
            module.nonfinite |= ~torch.isfinite(out["loss"].detach())
            out["loss"].backward()
    # (AdamW is left out: on CPU it reads its step counter with .item(); on CUDA the fused kernel does not.)
    assert syncs.calls == []


def test_compiled_step_matches_eager_with_frozen_teacher():
    # aot_eager runs Dynamo's capture and AOTAutograd, where compile-only failures live (graph breaks, the frozen
    # no-grad teacher, buffer mutation), without inductor's code generation: that takes ~3.5 minutes for this tiny
    # model on a 2-core CPU (5 s with inductor's cache warm), too slow for the suite. benchmarks/gpu_check.sh runs
    # inductor on the GPU.
    eager, compiled = tiny_module(), tiny_module()
    compiled.student.compile(backend="aot_eager", fullgraph=True)  # fullgraph: no graph break anywhere
    compiled.teacher.compile(backend="aot_eager", fullgraph=True)
    batch = synthetic_batch(load_config("quickstart", TINY), 6, VOCAB, torch.device("cpu"))
    optimizers = [torch.optim.AdamW(m.student.parameters(), lr=1e-3) for m in (eager, compiled)]
    for _ in range(2):  # a second step after an update and a memory-bank push
        losses = []
        for m, opt in zip((eager, compiled), optimizers):
            loss = m._losses(batch, train=True)["loss"]
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss)
        torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(eager.kd_loss.memory_bank, compiled.kd_loss.memory_bank)
    assert all(not p.requires_grad for p in compiled.teacher.parameters()) and not compiled.teacher.training


def test_grad_checkpointing_recomputes_and_keeps_loss_and_grads(module, batch):
    checkpointed = copy.deepcopy(module)
    checkpointed.student.set_grad_checkpointing()
    forwards = []
    # A Linear inside each checkpointed layer (HF re-runs a layer's forward(), not its hooks; recompute may stop
    # early, after the last tensor backward needs, so a pre-hook is what sees it).
    student = checkpointed.student
    for linear in (student.image_tower.blocks[0].mlp.fc1, student.text_tower.bert.encoder.layer[0].intermediate.dense):
        linear.register_forward_pre_hook(lambda *_: forwards.append(1))
    results = []
    for m in (module, checkpointed):
        m.zero_grad()
        loss = loss_of(m, batch)
        loss.backward()
        results.append((loss, [p.grad for p in m.student.parameters() if p.requires_grad]))
    assert len(forwards) == 4  # both layers ran again in backward
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-6)


def test_bf16_autocast_matches_fp32_and_runs_the_teacher_in_bf16(module, batch):
    fp32 = loss_of(module, batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = loss_of(module, batch)
        fc1 = module.teacher.blocks[0].mlp.fc1
        assert fc1(torch.randn(2, fc1.in_features)).dtype == torch.bfloat16  # the frozen teacher's matmuls too
    assert bf16.dtype == torch.float32  # the loss logits are computed in fp32 even under autocast
    torch.testing.assert_close(bf16, fp32, rtol=1e-2, atol=1e-2)  # bf16 keeps ~3 significant digits


def test_bench_step_trains(batch):
    cfg = load_config("quickstart", TINY)
    step = EvlpStep(cfg, torch.device("cpu"), None, batch_size=6)
    before = step.module.student.head.weight.detach().clone()
    step.step(batch)
    assert not torch.equal(before, step.module.student.head.weight)
    assert int(step.module.kd_loss.bank_filled) == 6 and not bool(step.module.nonfinite)
