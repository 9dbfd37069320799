"""The analytic FLOPs counter: a hand count on a tiny config, the real recipe's 116.2 GFLOPs per pair (anchors §3.1),
open_clip's own ViT-B/16 profile figure, and the table of GPU peaks."""

import pytest
import torch

from evlp.config import load_config
from evlp.flops import flops_per_pair, peak_flops_for

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
    assert f.student_train == 3 * f.student_forward
    assert f.total == f.student_train + f.teacher


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
    open_clip = pytest.importorskip("open_clip")
    from evlp.bench.train import open_clip_flops

    with torch.device("meta"):
        model = open_clip.CLIP(512, open_clip.CLIPVisionCfg(layers=12, width=768, patch_size=16, image_size=224),
                               open_clip.CLIPTextCfg(context_length=77, width=512, heads=8, layers=12))
    f = open_clip_flops(model, text_len=77)
    # open_clip docs/model_profile.csv, ViT-B-16: image_gflops 35.13, gflops 41.09 (forward, both towers)
    assert f.student["image_tower"] / 1e9 == pytest.approx(35.13, abs=0.005)
    assert f.student_forward / 1e9 == pytest.approx(41.09, abs=0.01)


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
