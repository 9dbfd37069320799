"""The analytic FLOPs counter: a hand count on a tiny config, torch's own FLOP counter on a real forward and backward
(tiny config on CPU, the real recipe on the meta device), the real recipe's 116.2 GFLOPs per pair (anchors §3.1),
open_clip's own ViT-B/16 profile figure, and the table of GPU peaks."""

from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from evlp.config import load_config
from evlp.flops import flops_per_pair, pair_flops, patch_embed_flops, peak_flops_for
from evlp.models.build import build_student, build_teacher
from tests.needs import need_module

# image 32 px / patch 8 -> 16 patches + CLS = 17 tokens; text 12 tokens; every width 32 (MLP 128) unless set below.
TINY = [
    "model.embed_dim=32", "model.num_heads=2", "model.depth=1",
    "model.image_tower.width=48", "model.image_tower.num_heads=2", "model.image_tower.img_size=32",
    "model.image_tower.patch_size=8",
    "model.text_tower.width=32", "model.text_tower.num_heads=2", "model.text_tower.max_positions=16",
    "model.teacher.width=32", "model.teacher.num_heads=2", "model.teacher.depth=2", "model.teacher.img_size=32",
    "model.teacher.patch_size=8", "data.image_size=32", "data.max_text_len=12",
]


def test_tiny_config_matches_a_hand_count():
    f = flops_per_pair(load_config("quickstart", TINY))

    def block(n, d):  # QKV 3d² + proj d² + MLP 2 x 4d² MACs per token, x2 for FLOPs; QK^T and AV: 2 x n²d MACs
        return 2 * n * (3 * d * d + d * d + 2 * 4 * d * d) + 2 * 2 * n * n * d

    patches = 2 * 16 * (3 * 8 * 8) * 48  # 16 patches, each a (3·8·8) x 48 matmul
    assert f.student["image_tower"] == patches + block(17, 48)
    assert f.student["text_tower"] == block(12, 32)
    assert f.student["projections"] == 2 * 17 * 48 * 32  # image 48 -> shared 32 on every token; text needs none
    assert f.student["shared_block"] == block(17, 32) + block(12, 32)
    assert f.student["kd_head"] == 2 * (2 * 32 * 32)  # on the image CLS and on the text CLS
    assert f.teacher == 2 * 16 * (3 * 8 * 8) * 32 + 2 * block(17, 32)


def explicit_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """Scaled dot-product attention as two matmuls: FlopCounterMode does not count the fused CPU kernels."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = (q * scale) @ k.transpose(-2, -1)
    if attn_mask is not None:
        logits = logits.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else logits + attn_mask
    return logits.softmax(dim=-1) @ v


@contextmanager
def counting():
    """torch.utils.flop_counter over whatever runs inside, with every attention on its explicit matmuls."""
    fused, F.scaled_dot_product_attention = F.scaled_dot_product_attention, explicit_attention
    try:
        with FlopCounterMode(display=False) as counter:
            yield counter
    finally:
        F.scaled_dot_product_attention = fused


def counted(cfg, device: str = "cpu", batch: int = 2) -> dict[str, float]:
    """FLOPs per pair torch counts for the config's student (forward; forward + backward of every output) and
    teacher (forward), built at random on ``device`` (meta: shapes only), plus the analytic count of the same models."""
    with torch.device(device):
        teacher = build_teacher(cfg.model.teacher, load_weights=False)
        student = build_student(cfg.model, kd_dim=teacher.width, load_weights=False)
    length, size = cfg.data.max_text_len, cfg.data.image_size
    images = torch.randn(batch, 3, size, size, device=device)
    ids = torch.randint(1, 100, (batch, length), device=device)
    padding = torch.zeros(batch, length, dtype=torch.bool, device=device)
    with counting() as forward:
        student(images, ids, padding)
    with counting() as train:
        outputs = student(images, ids, padding)
        sum(o.sum() for branch in outputs for o in branch.values()).backward()
    with counting() as frozen, torch.no_grad():
        teacher(images)
    patch_embed = student.image_tower.patch_embed
    return {"forward": forward.get_total_flops() / batch, "train": train.get_total_flops() / batch,
            "teacher": frozen.get_total_flops() / batch,
            # no gradient is computed for the images: the patch embedding's backward is its weight gradient only
            "image_input_gradient": patch_embed_flops(patch_embed.proj, patch_embed.num_patches),
            "analytic": pair_flops(student, teacher, length)}


@pytest.mark.parametrize("name,overrides,device", [("quickstart", TINY, "cpu"), ("training/s_smke", [], "meta")])
def test_analytic_flops_equal_torchs_flop_counter(name, overrides, device):
    c = counted(load_config(name, overrides), device)
    f = c["analytic"]
    assert c["forward"] == f.student_forward
    assert c["teacher"] == f.teacher
    # backward = 2 x forward for every matmul but the first, whose input (the images) needs no gradient
    assert c["train"] == f.student_train - c["image_input_gradient"]
    assert f.total == c["train"] + c["image_input_gradient"] + c["teacher"]


def test_s_smke_recipe_is_116_gflops_per_pair():
    g = flops_per_pair(load_config("training/s_smke")).gflops()  # built on the meta device: instant
    assert g["image_tower"] == pytest.approx(17.68, abs=0.005)
    assert g["text_tower"] == pytest.approx(5.51, abs=0.005)
    assert g["shared_block"] == pytest.approx(3.83, abs=0.005)
    assert g["projections"] == 0  # all widths are 768
    assert g["student_forward"] == pytest.approx(27.02, abs=0.005)
    assert g["student_train"] == pytest.approx(81.06, abs=0.01)
    assert g["teacher"] == pytest.approx(35.13, abs=0.005)
    assert g["total"] == pytest.approx(116.2, abs=0.05)


def test_open_clip_vit_b_16_matches_its_published_profile():
    open_clip = need_module("open_clip")
    from evlp.bench.train import open_clip_flops

    with torch.device("meta"):
        model = open_clip.CLIP(512, open_clip.CLIPVisionCfg(layers=12, width=768, patch_size=16, image_size=224),
                               open_clip.CLIPTextCfg(context_length=77, width=512, heads=8, layers=12))
    f = open_clip_flops(model, text_len=77)
    # open_clip docs/model_profile.csv, ViT-B-16: image_gflops 35.13, gflops 41.09 (forward, both towers)
    assert f.student["image_tower"] / 1e9 == pytest.approx(35.13, abs=0.005)
    assert f.student_forward / 1e9 == pytest.approx(41.09, abs=0.01)
    assert counted_open_clip(model, 77, 224, "meta") == f.student_forward


def counted_open_clip(model, text_len: int, image_size: int, device: str = "cpu") -> float:
    """FLOPs per pair torch counts for an open_clip CLIP's forward (both towers and their projections)."""
    model.train()  # nn.MultiheadAttention's inference fast path is one fused kernel, not counted
    images = torch.randn(2, 3, image_size, image_size, device=device)
    with counting() as counter:
        model(images, torch.randint(1, 100, (2, text_len), device=device))
    return counter.get_total_flops() / 2


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989.4e12),
    ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H200", 989.4e12),
    ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA GeForce RTX 4090", 165.2e12),
    ("NVIDIA L4", 121e12),
    ("NVIDIA L40S", None),  # not "L4"
    ("Tesla T4", None),
])
def test_peak_flops_by_device_name(name, peak):
    assert peak_flops_for(name) == peak
