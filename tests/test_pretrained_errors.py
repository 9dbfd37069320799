"""Everything a weight file can get wrong gives one clear line, and no file can run code while it is read."""

import collections
import io
import os
import pickle
import sys
from pathlib import Path

import pytest
import torch

from evlp.errors import EvlpError
from evlp.pretrained import detect_format, load_beitv2, load_data2vec2_image
from evlp.pretrained.files import read_weight_file
from evlp.pretrained.loaders import convert_checkpoint
from evlp.pretrained.safe_pickle import Placeholder, RestrictedUnpickler

FIXTURES = Path(__file__).parent / "fixtures" / "pretrained"
D2V = FIXTURES / "data2vec2_fairseq_tiny.pt"
BEIT = FIXTURES / "beitv2_unilm_tiny.pth"


def one_line_error(call, *args, **kwargs) -> str:
    with pytest.raises(EvlpError) as info:
        call(*args, **kwargs)
    message = str(info.value)
    assert message and "\n" not in message
    return message


@pytest.fixture(scope="module")
def d2v():
    """The fairseq fixture as plain data (cfg and weights), which torch.save can write back without fairseq."""
    ckpt = read_weight_file(D2V).content
    return {"cfg": ckpt["cfg"], "model": ckpt["model"]}


def edited(tmp_path, ckpt, edit, name):
    state = dict(ckpt["model"])
    edit(state)
    path = tmp_path / name
    torch.save(dict(ckpt, model=state), path)
    return path


D2V_EDITS = {
    "extra key": (lambda s: s.__setitem__("blocks.0.attn.extra", torch.zeros(3)),
                  ["unexpected: blocks.0.attn.extra (3,)"]),
    "missing key": (lambda s: s.pop("blocks.1.mlp.fc1.bias"), ["missing: blocks.1.mlp.fc1.bias (128,)"]),
    "missing renamed key": (lambda s: s.pop("modality_encoders.IMAGE.context_encoder.norm.bias"),
                            ["missing", "modality_encoders.IMAGE.context_encoder.norm.bias"]),
    "wrong shape": (lambda s: s.__setitem__("blocks.2.mlp.fc2.weight", torch.zeros(32, 64)),
                    ["shape mismatch", "blocks.2.mlp.fc2.weight (32, 64) in the file vs (32, 128)"]),
    "not a tensor": (lambda s: s.__setitem__("blocks.0.norm1.weight", [1.0]), ["blocks.0.norm1.weight", "list"]),
    "architecture tensor missing": (lambda s: s.pop("modality_encoders.IMAGE.fixed_positional_encoder.positions"),
                                    ["modality_encoders.IMAGE.fixed_positional_encoder.positions", "missing"]),
}
BEIT_EDITS = {
    "extra key": (lambda s: s.__setitem__("head.weight", torch.zeros(10, 32)), ["unexpected: head.weight (10, 32)"]),
    "missing key": (lambda s: s.pop("blocks.2.gamma_2"), ["missing: blocks.2.gamma_2 (32,)"]),
    "wrong shape": (lambda s: s.__setitem__("norm.weight", torch.zeros(16)),
                    ["shape mismatch", "norm.weight (16,) in the file vs (32,)"]),
    "wrong index": (lambda s: s.__setitem__("rel_pos_bias.relative_position_index",
                                            s["rel_pos_bias.relative_position_index"].t().contiguous()),
                    ["relative_position_index differs"]),
}


@pytest.mark.parametrize("case", D2V_EDITS)
def test_data2vec2_strict_accounting(tmp_path, d2v, case):
    edit, fragments = D2V_EDITS[case]
    message = one_line_error(load_data2vec2_image, edited(tmp_path, d2v, edit, "edited.pt"))
    assert all(f in message for f in fragments), message


@pytest.mark.parametrize("case", BEIT_EDITS)
def test_beitv2_strict_accounting(tmp_path, case):
    edit, fragments = BEIT_EDITS[case]
    message = one_line_error(load_beitv2, edited(tmp_path, torch.load(BEIT, weights_only=True), edit, "edited.pth"))
    assert all(f in message for f in fragments), message


def test_wrong_kind_of_checkpoint():
    message = one_line_error(load_data2vec2_image, BEIT)
    assert "unilm BEiTv2 checkpoint" in message and "Data2Vec2 image checkpoint" in message and "load_beitv2" in message
    message = one_line_error(load_beitv2, D2V)
    assert "fairseq Data2Vec2 image checkpoint" in message and "BEiTv2 checkpoint" in message


def test_wrong_kind_of_converted_file(tmp_path):
    out, _ = convert_checkpoint(D2V, tmp_path / "image.safetensors")
    assert "BEiTv2 checkpoint" in one_line_error(load_beitv2, out)


@pytest.mark.parametrize("source", [D2V, BEIT])
def test_truncated_download(tmp_path, source):
    path = tmp_path / source.name
    path.write_bytes(source.read_bytes()[: source.stat().st_size // 2])
    message = one_line_error(load_data2vec2_image if source == D2V else load_beitv2, path)
    assert "truncated" in message and "download it again" in message


def test_truncated_safetensors(tmp_path):
    out, _ = convert_checkpoint(BEIT, tmp_path / "teacher.safetensors")
    out.write_bytes(out.read_bytes()[:50_000])
    assert "truncated or corrupt safetensors" in one_line_error(load_beitv2, out)


@pytest.mark.parametrize("content, fragment", [
    (b"", "is empty (0 bytes)"),
    (b"\n<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head><body>Not Found</body></html>\n",
     "is an HTML page"),
    (b'{"error": "rate limited"}', "neither a PyTorch checkpoint nor a safetensors file"),
])
def test_not_a_checkpoint(tmp_path, content, fragment):
    path = tmp_path / "base_imagenet.pt"
    path.write_bytes(content)
    assert fragment in one_line_error(load_data2vec2_image, path)
    assert fragment in one_line_error(detect_format, path)


def test_other_user_errors(tmp_path):
    assert "no such file" in one_line_error(load_beitv2, tmp_path / "nothing.pth")
    assert "depth 5 asked for, but the checkpoint has 4 blocks" in one_line_error(load_data2vec2_image, D2V, depth=5)
    assert "depth 0" in one_line_error(load_beitv2, BEIT, depth=0)
    torch.save({"state_dict": {"w": torch.zeros(2)}}, tmp_path / "other.pt")
    assert "unknown checkpoint layout (a dict with keys [state_dict])" in one_line_error(
        load_data2vec2_image, tmp_path / "other.pt")
    out, _ = convert_checkpoint(BEIT, tmp_path / "t.safetensors")
    assert "already a converted" in one_line_error(convert_checkpoint, out)


def test_stale_converted_sibling_is_refused(tmp_path):
    upstream = tmp_path / "beitv2_base_patch16_224_pt1k.pth"
    upstream.write_bytes(BEIT.read_bytes())
    convert_checkpoint(upstream)
    ckpt = torch.load(upstream, weights_only=True)
    ckpt["model"]["padding"] = torch.zeros(1000)  # a different file now sits at the upstream path
    torch.save(ckpt, upstream)
    assert "delete it or run `evlp weights convert" in one_line_error(load_beitv2, upstream)


class RunsCommand:
    """Pickles as a call to os.system: what a malicious checkpoint would contain."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_restricted_unpickler_never_calls_what_the_pickle_names(tmp_path):
    witness = tmp_path / "pwned"
    payload = pickle.dumps(RunsCommand(f"echo pwned > {witness}"))
    pickle.loads(payload)  # positive control: plain pickle runs the command
    assert witness.exists()
    witness.unlink()

    result = RestrictedUnpickler(io.BytesIO(payload)).load()
    assert isinstance(result, Placeholder) and result.args == (f"echo pwned > {witness}",)
    assert not witness.exists()


def test_malicious_checkpoint_loads_without_running_its_payload(tmp_path, d2v):
    witness = tmp_path / "pwned"
    path = tmp_path / "base_imagenet.pt"
    torch.save(dict(d2v, extra_state={"hook": RunsCommand(f"echo pwned > {witness}")}), path)
    file = read_weight_file(path)
    assert "placeholders for posix.system" in file.how or "placeholders for os.system" in file.how
    assert len(load_data2vec2_image(path).blocks) == 4
    assert not witness.exists()

    torch.save({"model": RunsCommand(f"echo pwned > {witness}")}, path)
    assert "unknown checkpoint layout" in one_line_error(load_data2vec2_image, path)
    assert not witness.exists()


def test_restricted_unpickler_imports_nothing():
    assert "this" not in sys.modules  # importing `this` prints the Zen of Python: a visible side effect
    replaced = set()
    result = RestrictedUnpickler(io.BytesIO(b"cthis\nrot13\n)R."), replaced=replaced).load()  # this.rot13()
    assert isinstance(result, Placeholder) and "this" not in sys.modules and replaced == {"this.rot13"}


class Meters(list):
    """A list subclass defined outside the allow-list: pickled as its class plus APPENDS."""


def test_placeholders_absorb_container_opcodes():
    data = {"counts": collections.defaultdict(int, {"steps": 3}), "meters": Meters([1.5, 2.5])}
    result = RestrictedUnpickler(io.BytesIO(pickle.dumps(data))).load()
    assert result["counts"].items == [("steps", 3)] and result["meters"].items == [1.5, 2.5]
