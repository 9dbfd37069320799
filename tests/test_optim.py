"""Parameter groups, the lr scaling rule and the warm-up + cosine schedule."""

import math

import pytest
import torch

from evlp.train.optim import param_groups, scaled_lr, warmup_cosine
from tests.test_models import tiny_student


def test_no_decay_for_biases_norms_scales_cls_positions_and_embeddings():
    student = tiny_student()
    decay, no_decay = param_groups(student, 0.01)
    names = {id(p): n for n, p in student.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    exempt = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert "shared.fc1.weight" in decayed and "shared.attn.qkv.weight" in decayed and "head.weight" in decayed
    assert "image_tower.blocks.0.attn.qkv.weight" in decayed
    for name in ["shared.fc1.bias", "shared.norm1.weight", "shared.ls1", "shared.attn.q_bias", "logit_scales",
                 "tte_scale", "token_type_embeddings.weight", "image_tower.cls_token",
                 "text_tower.bert.embeddings.word_embeddings.weight"]:
        assert name in exempt, name
    assert "image_tower.pos_embed" not in decayed | exempt  # frozen: not optimised at all
    assert len(decayed) + len(exempt) == sum(p.requires_grad for p in student.parameters())


def test_linear_scaling_rule():
    assert scaled_lr(1e-4, 512) == pytest.approx(2e-4)  # the thesis run: 2 GPUs x 256
    assert scaled_lr(1e-4, 256) == pytest.approx(1e-4)


def test_warmup_then_cosine_to_zero_and_no_rise_after_the_end():
    f = warmup_cosine(100, 0.1)
    assert f(0) == 0 and f(5) == pytest.approx(0.5) and f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(100) == pytest.approx(0.0, abs=1e-12) and f(150) == pytest.approx(0.0, abs=1e-12)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, f)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:11] == pytest.approx([i / 10 for i in range(11)])
