"""Shapes and behaviour of every module of the student and the teacher, at tiny sizes."""

import math

import pytest
import torch

from evlp.models.image import Data2Vec2ImageTower, sincos_2d_positions
from evlp.models.s_smke import SSMKE
from evlp.models.shared import SharedBlock
from evlp.models.teacher import BEiTv2Teacher
from evlp.models.text import BertTextTower, bert_config


def tiny_text(width=32, depth=2):
    return BertTextTower(bert_config(vocab_size=50, hidden_size=width, num_attention_heads=2,
                                     intermediate_size=4 * width, max_position_embeddings=16,
                                     num_hidden_layers=depth))


def tiny_student(image_width=32, text_width=32, embed_dim=32, kd_dim=32):
    image = Data2Vec2ImageTower(img_size=32, patch_size=8, embed_dim=image_width, depth=2, num_heads=2)
    return SSMKE(image, tiny_text(text_width), embed_dim=embed_dim, num_heads=2, kd_dim=kd_dim)


def batch(b=3, length=8):
    torch.manual_seed(0)
    ids = torch.randint(1, 50, (b, length))
    pad = torch.zeros(b, length, dtype=torch.bool)
    pad[0, 5:] = True
    return torch.randn(b, 3, 32, 32), ids, pad


def test_image_tower_tokens_and_fixed_positions():
    tower = Data2Vec2ImageTower(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
    out = tower.forward_features(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 1 + 16, 32)
    assert not tower.pos_embed.requires_grad
    assert torch.equal(tower.pos_embed[0], sincos_2d_positions(4, 32))


def test_sincos_positions_encode_column_first():
    table = sincos_2d_positions(4, 8)  # quarter = 2: [sin(col), cos(col), sin(row), cos(row)]
    patch = 1 * 4 + 3  # row 1, column 3
    assert torch.allclose(table[patch, 0], torch.tensor(math.sin(3.0)))
    assert torch.allclose(table[patch, 4], torch.tensor(math.sin(1.0)))


def test_text_tower_truncates_and_masks():
    tower = BertTextTower(bert_config(vocab_size=50, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                                      num_hidden_layers=4), depth=2)
    assert tower.depth == 2 and tower.bert.pooler is None
    _, ids, pad = batch()
    assert tower.forward_features(ids, pad).shape == (3, 8, 32)


def test_teacher_stays_in_eval_and_frozen():
    teacher = BEiTv2Teacher(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
    teacher.train()
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert teacher(torch.randn(2, 3, 32, 32)).shape == (2, 32)
    assert teacher.forward_features(torch.randn(2, 3, 32, 32)).shape == (2, 17, 32)


def test_shared_block_returns_fc1_and_output():
    block = SharedBlock(32, 2)
    interm, out = block(torch.randn(2, 5, 32))
    assert interm.shape == (2, 5, 128) and out.shape == (2, 5, 32)
    assert block.attn.qkv.bias is None  # q/v biases only, the key bias is a constant zero


def test_fused_and_explicit_attention_agree():
    torch.manual_seed(0)
    block = SharedBlock(32, 2)
    x = torch.randn(2, 6, 32)
    pad = torch.tensor([[False] * 6, [False] * 3 + [True] * 3])
    fused = block(x, pad)
    block.attn.fused = False
    explicit = block(x, pad)
    for a, b in zip(fused, explicit):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_padding_does_not_change_the_text_embedding():
    student = tiny_student().eval()
    ids = torch.randint(1, 50, (1, 5))
    pad = torch.zeros(1, 5, dtype=torch.bool)
    longer = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], dim=1)
    longer_pad = torch.cat([pad, torch.ones(1, 3, dtype=torch.bool)], dim=1)
    torch.testing.assert_close(student.encode_text(ids, pad), student.encode_text(longer, longer_pad))


def test_student_outputs_and_open_clip_api():
    student = tiny_student()
    images, ids, pad = batch()
    img, txt = student(images, ids, pad)
    for out in (img, txt):
        assert out["x"].shape == (3, 32) and out["x_interm"].shape == (3, 128) and out["kd"].shape == (3, 32)
        torch.testing.assert_close(out["x"].norm(dim=-1), torch.ones(3))
    assert student.encode_image(images).shape == (3, 32)
    assert student.encode_text(ids, pad).shape == (3, 32)


@pytest.mark.parametrize("image_width,text_width,kd_dim", [(32, 32, 32), (48, 24, 16)])
def test_projections_only_where_widths_differ(image_width, text_width, kd_dim):
    student = tiny_student(image_width, text_width, 32, kd_dim)
    assert isinstance(student.image_proj, torch.nn.Identity) == (image_width == 32)
    assert isinstance(student.text_proj, torch.nn.Identity) == (text_width == 32)
    images, ids, pad = batch()
    assert student.forward_image(images)["kd"].shape == (3, kd_dim)


def test_new_layers_use_truncated_init_and_towers_are_untouched():
    torch.manual_seed(0)
    image = Data2Vec2ImageTower(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
    before = {k: v.clone() for k, v in image.state_dict().items()}
    student = SSMKE(image, tiny_text(), embed_dim=32, num_heads=2)
    assert student.shared.fc1.weight.abs().max() <= 0.02
    assert torch.all(student.shared.fc1.bias == 0)
    for k, v in student.image_tower.state_dict().items():
        assert torch.equal(v, before[k])
    assert torch.allclose(student.tte_scale, torch.full((32,), 1e-5))
    assert torch.allclose(student.shared.ls1, torch.full((32,), 0.2))
    assert torch.allclose(student.logit_scales, torch.full((2,), math.log(1 / 0.07)))


def test_logit_scales_are_clamped_to_100():
    student = tiny_student()
    with torch.no_grad():
        student.logit_scales.fill_(10.0)
    student.clamp_logit_scales(100.0)
    assert torch.allclose(student.logit_scales.exp(), torch.full((2,), 100.0))


def test_text_tower_dropout_is_set_by_the_config_everywhere_in_the_tower():
    from omegaconf import OmegaConf

    from evlp.config import TextTowerConfig
    from evlp.errors import EvlpError
    from evlp.models.build import build_text_tower

    def tower(**values):
        cfg = OmegaConf.merge(OmegaConf.structured(TextTowerConfig),
                              dict(width=32, num_heads=2, depth=2, max_positions=16, **values))
        return build_text_tower(cfg, load_weights=False)

    dropouts = [m.p for m in tower().modules() if isinstance(m, torch.nn.Dropout)]
    assert len(dropouts) == 1 + 3 * 2 and set(dropouts) == {0.1}  # BERT's own: embeddings, 3 per layer
    off = tower(dropout=0.0).train()
    assert {m.p for m in off.modules() if isinstance(m, torch.nn.Dropout)} == {0.0}
    _, ids, pad = batch()
    torch.testing.assert_close(off.forward_features(ids, pad), off.eval().forward_features(ids, pad))
    with pytest.raises(EvlpError, match="model.text_tower.dropout=1.5"):
        tower(dropout=1.5)
