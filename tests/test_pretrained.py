"""Upstream checkpoint loaders against the tiny reference fixtures (tests/fixtures/pretrained/README.md).

The fixtures are width-32 copies of the real files' layouts with outputs computed by the original EV-LP loaders; the
tolerance is the fixtures' suggested one, |got - expected| <= 2e-5 + 1e-5 |expected|, in float32.
"""

import argparse
import importlib.util
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from evlp.models.image import Data2Vec2ImageTower
from evlp.models.teacher import BEiTv2Teacher
from evlp.pretrained import detect_format, load_beitv2, load_data2vec2_image
from evlp.pretrained.commands import cmd_weights_check, register
from evlp.pretrained.files import read_weight_file
from evlp.pretrained.loaders import convert_checkpoint, converted_path, load_tower

FIXTURES = Path(__file__).parent / "fixtures" / "pretrained"
D2V = FIXTURES / "data2vec2_fairseq_tiny.pt"
BEIT = FIXTURES / "beitv2_unilm_tiny.pth"


def assert_close(got: torch.Tensor, expected: torch.Tensor) -> None:
    assert got.shape == expected.shape and got.dtype == torch.float32
    err = (got - expected).abs()
    assert (err <= 2e-5 + 1e-5 * expected.abs()).all(), f"max abs error {err.max().item():.3g}"


@pytest.fixture(scope="module")
def d2v_expected():
    return load_file(FIXTURES / "data2vec2_fairseq_tiny_expected.safetensors")


@pytest.fixture(scope="module")
def beit_expected():
    return load_file(FIXTURES / "beitv2_unilm_tiny_expected.safetensors")


def test_fixture_files_are_intact():
    import hashlib

    for stem in ("data2vec2_fairseq_tiny", "beitv2_unilm_tiny"):
        info = json.loads((FIXTURES / f"{stem}.json").read_text())
        for entry in info["files"].values():
            data = (FIXTURES / entry["name"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == entry["sha256"], entry["name"]


def test_fairseq_fixture_needs_the_restricted_unpickler():
    assert importlib.util.find_spec("fairseq") is None
    with pytest.raises(pickle.UnpicklingError, match="numpy.core.multiarray.scalar"):
        torch.load(D2V, weights_only=True)
    file = read_weight_file(D2V)
    assert file.format == "data2vec2-fairseq"
    assert "restricted unpickler" in file.how and "fairseq.logging.meters.AverageMeter" in file.how
    assert file.content["cfg"]["model"]["num_heads"] == 2  # plain config values survive


def test_beitv2_fixture_reads_weights_only():
    assert set(torch.load(BEIT, weights_only=True)) == {"model"}
    assert read_weight_file(BEIT).how == "torch.load(weights_only=True)"


@pytest.mark.parametrize("depth, name, blocks", [(None, "tokens_depth4", 4), (4, "tokens_depth4", 4),
                                                 (2, "tokens_depth2", 2)])
def test_data2vec2_matches_reference(d2v_expected, depth, name, blocks):
    tower = load_data2vec2_image(D2V, depth=depth).eval()
    assert isinstance(tower, Data2Vec2ImageTower) and len(tower.blocks) == blocks
    with torch.no_grad():
        assert_close(tower.forward_features(d2v_expected["input"]), d2v_expected[name])


def test_beitv2_matches_reference_with_and_without_norm(beit_expected):
    teacher = load_beitv2(BEIT)
    assert isinstance(teacher, BEiTv2Teacher) and len(teacher.blocks) == 3
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    x = beit_expected["input"]
    with torch.no_grad():
        tokens = teacher.forward_features(x)
        assert_close(tokens, beit_expected["tokens_no_norm"])
        assert_close(teacher.norm(tokens), beit_expected["tokens_with_norm"])
        assert_close(teacher(x), beit_expected["cls_no_norm"])  # the distillation target is token 0


def test_beitv2_truncation_keeps_the_first_blocks(beit_expected):
    teacher = load_beitv2(BEIT, depth=2)
    assert len(teacher.blocks) == 2
    with torch.no_grad():
        assert_close(teacher.forward_features(beit_expected["input"]), beit_expected["tokens_first2_no_norm"])


def test_loaded_values_are_the_checkpoint_values():
    """What the outputs cannot show (fixture README §6.4): the key part of the qkv bias, eps, GELU, positions."""
    state = read_weight_file(D2V).content["model"]
    tower = load_data2vec2_image(D2V)
    assert torch.equal(tower.blocks[3].attn.qkv.bias, state["blocks.3.attn.qkv.bias"])  # q, k and v parts
    assert torch.equal(tower.pos_embed, state["modality_encoders.IMAGE.fixed_positional_encoder.positions"])
    assert not tower.pos_embed.requires_grad
    assert torch.equal(tower.cls_token, state["modality_encoders.IMAGE.extra_tokens"])  # not the _ema copy
    assert tower.norm_pre.eps == 1e-6 and tower.blocks[0].norm1.eps == 1e-6
    assert tower.blocks[0].mlp.act.approximate == "none"

    teacher = load_beitv2(BEIT)
    beit = torch.load(BEIT, weights_only=True)["model"]
    assert torch.equal(teacher.rel_pos_bias.relative_position_index, beit["rel_pos_bias.relative_position_index"])
    assert torch.equal(teacher.blocks[1].attn.q_bias, beit["blocks.1.attn.q_bias"])
    assert torch.equal(teacher.blocks[1].attn.v_bias, beit["blocks.1.attn.v_bias"])
    assert torch.equal(teacher.blocks[2].gamma_2, beit["blocks.2.gamma_2"])
    assert teacher.blocks[0].norm1.eps == 1e-6 and teacher.blocks[0].mlp.act.approximate == "none"


def test_checkpoint_head_count_wins_over_the_argument():
    with pytest.warns(UserWarning, match="num_heads=8 ignored"):
        tower = load_data2vec2_image(D2V, num_heads=8)
    assert tower.blocks[0].attn.num_heads == 2
    assert load_beitv2(BEIT, num_heads=2).blocks[0].attn.num_heads == 2


def test_detect_format():
    assert detect_format(D2V) == "data2vec2-fairseq"
    assert detect_format(BEIT) == "beitv2-unilm"


@pytest.mark.parametrize("source, loader, expected_name, depth", [
    (D2V, load_data2vec2_image, "tokens_depth2", 2),
    (BEIT, load_beitv2, "tokens_first2_no_norm", 2),
])
def test_safetensors_round_trip(tmp_path, d2v_expected, beit_expected, source, loader, expected_name, depth):
    expected = d2v_expected if source == D2V else beit_expected
    upstream = tmp_path / source.name
    shutil.copy(source, upstream)
    out, loaded = convert_checkpoint(upstream)
    assert out == converted_path(upstream) == tmp_path / f"{source.name}.safetensors"
    with safe_open(out, "pt") as f:
        metadata = json.loads(f.metadata()["evlp"])
        assert set(f.keys()) == set(loaded.tower.state_dict())  # the tower alone: no decoder, EMA or MIM head
    assert metadata["depth"] == loaded.spec.depth and metadata["num_heads"] == 2
    assert metadata["source_bytes"] == source.stat().st_size
    assert detect_format(out) == "evlp-safetensors"

    assert load_tower(upstream, loaded.spec.kind).file.path == out  # the sibling is preferred
    for path in (upstream, out):
        tower = loader(path, depth=depth).eval()
        with torch.no_grad():
            assert_close(tower.forward_features(expected["input"]), expected[expected_name])
        for key, value in tower.state_dict().items():
            assert torch.equal(value, loaded.tower.state_dict()[key]), key


def test_weights_check_prints_what_it_found(capsys):
    assert cmd_weights_check(argparse.Namespace(path=str(D2V))) == 0
    out = capsys.readouterr().out
    assert "format:       data2vec2-fairseq" in out and "restricted unpickler" in out
    assert "width 32, depth 4, heads 2, img 224, patch 16" in out
    assert "parameters:   81,792 (Data2Vec2ImageTower)" in out
    assert "6 decoder" in out and "1 _ema" in out and "loads:        yes" in out

    assert cmd_weights_check(argparse.Namespace(path=str(BEIT))) == 0
    out = capsys.readouterr().out
    assert "format:       beitv2-unilm" in out and "width 32, depth 3, heads 2" in out
    assert f"parameters:   {sum(p.numel() for p in load_beitv2(BEIT).parameters()):,}" in out


def test_weights_check_reports_a_file_that_does_not_load(tmp_path, capsys):
    ckpt = torch.load(BEIT, weights_only=True)
    del ckpt["model"]["blocks.1.attn.proj.bias"]
    torch.save(ckpt, tmp_path / "broken.pth")
    assert cmd_weights_check(argparse.Namespace(path=str(tmp_path / "broken.pth"))) == 1
    out = capsys.readouterr().out
    assert "format:       beitv2-unilm" in out and "loads:        no:" in out and "blocks.1.attn.proj.bias" in out


def test_weights_commands_through_argparse(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="evlp")
    register(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "teacher.safetensors"
    args = parser.parse_args(["weights", "convert", str(BEIT), "--out", str(out)])
    assert args.handler(args) == 0 and out.is_file()
    assert "wrote" in capsys.readouterr().out
    args = parser.parse_args(["weights", "check", str(out)])
    assert args.handler(args) == 0
    assert "format:       evlp-safetensors" in capsys.readouterr().out
