"""The whole S-SMKE training step against an independent computation, in float64, to 1e-6.

The reference below is written in plain torch from the original's description (the student of §3.2 with the
Data2Vec2 image tower of §4.1 and the BERT text tower of §4.3, the shared block of §3.1, the BEiTv2 teacher of §4.2,
the losses of §5, with evlp's documented deliberate differences: distillation candidates are the *gathered* batch,
unwritten memory-bank rows are masked). It calls nothing of evlp for the math: it only reads evlp's weights by name.
It is compared to what ``PretrainModule._losses`` computes, caught with forward hooks, at every intermediate the
original defines: the tower outputs, the tokens after the token-type embedding and its LayerScale, the shared block's
fc1 activation (pre-GELU) and output, ``head(fc_norm(CLS))``, the normalised ``x`` / ``x_interm``, the teacher's CLS,
both ITC losses, the distillation loss against a partly filled bank (with junk in its unwritten rows), the total
``KD + (ITC_fc1 + ITC_out) / 2``, the gradient of every student parameter, the bank after the push, and the clamp
of the ITC scales. ``test_two_processes_equal_the_reference`` runs the step in 2 real gloo processes on halves of
the batch and compares each rank's losses, the averaged gradients (what DDP applies) and the bank to the reference.

Mutations tried (``test_each_mutation_is_caught`` applies each to evlp's source, runs the check, and requires the
named assertion to fail; the 2-process one is ``test_local_distillation_candidates_are_caught``):

==========================================================  ===============================================
mutation of evlp                                            caught by the assertion on
==========================================================  ===============================================
drop the ITC term on the fc1 CLS                            ``itc_loss`` (½(ITC_fc1 + ITC_out))
drop the ITC term on the output CLS                         ``itc_loss`` (½(ITC_fc1 + ITC_out))
one token type for both modalities (image gets TEXT's)      ``image tokens after the token type``
detach the student's KD vectors instead of the teacher's    ``gradient of student.fc_norm.bias``
detach the text side of the ITC keys                        ``gradient of student.shared.attn.proj.bias``
forget the fc_norm before the KD head                       ``image kd = head(fc_norm(CLS))``
unwritten bank rows used as negatives (mask removed)        ``KD image->teacher loss``
GELU applied before taking the fc1 CLS                      ``image fc1 activation (pre-GELU)``
local instead of global batch as distillation candidates    ``rank 0 KD loss`` (2 processes)
==========================================================  ===============================================
"""

from __future__ import annotations

import inspect
import math
import os
import re
import textwrap
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from omegaconf import OmegaConf

from evlp.config import RunConfig
from evlp.losses import ContrastiveDistillationLoss, ContrastiveLoss
from evlp.models.s_smke import SSMKE
from evlp.models.shared import SharedBlock
from evlp.train.module import PretrainModule


D, HEADS, TEACHER_D, TEACHER_HEADS, DEPTH, TEACHER_DEPTH = 32, 2, 24, 2, 2, 2
IMG, PATCH, TEXT_LEN = 32, 8, 8
N = 8  # pairs in the (global) batch
BANK, PREFILLED = 16, 12  # the push of 8 wraps around the end of the bank
LOGIT_SCALES = (5.0, 2.5)  # the fc1 level starts above ln(100) = 4.605: the clamp must act
KD_SCALE = 1 / 0.07
TOL = dict(rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# evlp's side: a tiny module in float64 with every weight random (no trivial init that could hide a term)


def config():
    values = {
        "model": {
            "embed_dim": D, "num_heads": HEADS, "depth": DEPTH, "mlp_ratio": 4.0, "dropout": 0.0,
            "image_tower": {"kind": "data2vec2", "depth": DEPTH, "width": D, "num_heads": HEADS, "img_size": IMG,
                            "patch_size": PATCH},
            "text_tower": {"kind": "bert", "depth": DEPTH, "width": D, "num_heads": HEADS, "max_positions": 16},
            "teacher": {"kind": "beitv2", "depth": TEACHER_DEPTH, "width": TEACHER_D, "num_heads": TEACHER_HEADS,
                        "img_size": IMG, "patch_size": PATCH},
        },
        "loss": {"memory_bank_size": BANK, "kd_temperature": 0.07, "init_temperature": 0.07,
                 "max_logit_scale": 100.0},
        "data": {"max_text_len": TEXT_LEN, "image_size": IMG},
    }
    return OmegaConf.merge(OmegaConf.structured(RunConfig), values)


def build_module(seed: int = 0) -> PretrainModule:
    torch.manual_seed(seed)
    module = PretrainModule(config(), load_weights=False).double().train()
    for m in module.modules():
        if isinstance(m, torch.nn.Dropout):  # BERT's hidden and attention dropout (0.1): off, to compare
            m.p = 0.0
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "pos_embed" in name:
                continue  # the fixed sin-cos table
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) / math.sqrt(p[0].numel()))
            elif "norm" in name.lower() and name.endswith("weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
            else:  # biases, q/v biases, LayerScales, the token-type scale: all far from their init
                p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        module.student.logit_scales.copy_(torch.tensor(LOGIT_SCALES))
        bank = module.kd_loss
        filled = torch.randn(PREFILLED, TEACHER_D, generator=g, dtype=torch.float64)
        filled = filled / filled.norm(dim=-1, keepdim=True)
        bank.memory_bank.copy_(torch.randn(BANK, TEACHER_D, generator=g, dtype=torch.float64))  # junk rows ...
        bank.memory_bank[:PREFILLED] = filled  # ... below the written ones
        bank.bank_pointer.fill_(PREFILLED)
        bank.bank_filled.fill_(PREFILLED)
    return module


def make_batch() -> dict:
    g = torch.Generator().manual_seed(7)
    lengths = [8, 5, 3, 8, 6, 2, 7, 4]  # [CLS] ... [SEP], padded to TEXT_LEN
    ids = torch.randint(1000, 30000, (N, TEXT_LEN), generator=g)
    padding = torch.arange(TEXT_LEN)[None, :] >= torch.tensor(lengths)[:, None]
    ids[padding] = 0
    return {"image": torch.randn(N, 3, IMG, IMG, generator=g, dtype=torch.float64), "text": ids,
            "padding_mask": padding}


class Recorder:
    """Forward hooks on the modules ``_losses`` calls: what each of them returned, in call order."""

    def __init__(self, module: PretrainModule):
        self.calls: dict[str, list] = {"shared_in": [], "shared_out": [], "student": [], "teacher": [], "itc": [],
                                       "kd": []}
        hooks = [
            module.student.shared.register_forward_pre_hook(lambda m, args: self.calls["shared_in"].append(args[0])),
            module.student.shared.register_forward_hook(lambda m, a, out: self.calls["shared_out"].append(out)),
            module.student.register_forward_hook(lambda m, a, out: self.calls["student"].append(out)),
            module.teacher.register_forward_hook(lambda m, a, out: self.calls["teacher"].append(out)),
            module.itc_loss.register_forward_hook(lambda m, a, out: self.calls["itc"].append(out)),
            module.kd_loss.register_forward_hook(lambda m, a, out: self.calls["kd"].append(out)),
        ]
        self.hooks = hooks

    def remove(self):
        for h in self.hooks:
            h.remove()


def run_evlp(module: PretrainModule, batch: dict) -> dict:
    """One training step's forward and backward; every intermediate, the returned losses, grads and the bank."""
    student = module.student
    recorder = Recorder(module)
    try:
        out = module._losses(batch, train=True)
        out["loss"].backward()
    finally:
        recorder.remove()
    c = recorder.calls
    (img, txt), = c["student"]
    return {
        "image tower": student.image_tower.forward_features(batch["image"]).detach(),
        "text tower": student.text_tower.forward_features(batch["text"], batch["padding_mask"]).detach(),
        "shared_in": c["shared_in"], "shared_out": c["shared_out"], "img": img, "txt": txt,
        "teacher": c["teacher"][0], "itc": c["itc"], "kd": c["kd"][0], "out": out,
        # a parameter the loss no longer reaches has no .grad: a zero gradient, compared like any other
        "grads": {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p)
                  for n, p in student.named_parameters() if p.requires_grad},
        "logit_scales": student.logit_scales.detach().clone(),
        "bank": (module.kd_loss.memory_bank.clone(), int(module.kd_loss.bank_pointer), int(module.kd_loss.bank_filled)),
    }


# ---------------------------------------------------------------------------------------------------------------
# The reference: plain torch, from the description of the original


def layer_norm(x, w, b, eps):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * w + b


def gelu(x):  # exact (erf) GELU: timm's nn.GELU and BERT's "gelu"
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def attention(x, wq, bq, wk, bk, wv, bv, wo, bo, heads, key_padding=None, bias=None):
    B, T, width = x.shape
    hd = width // heads

    def split(t):  # (B, T, D) -> (B, H, T, hd)
        return t.reshape(B, T, heads, hd).transpose(1, 2)

    q, k, v = split(x @ wq.T + bq), split(x @ wk.T + bk), split(x @ wv.T + bv)
    logits = (q * hd ** -0.5) @ k.transpose(-1, -2)  # (B, H, T, T)
    if bias is not None:
        logits = logits + bias
    if key_padding is not None:
        logits = logits.masked_fill(key_padding[:, None, None, :], float("-inf"))
    return (torch.softmax(logits, dim=-1) @ v).transpose(1, 2).reshape(B, T, width) @ wo.T + bo


def thirds(w):
    n = w.shape[0] // 3
    return w[:n], w[n:2 * n], w[2 * n:]


def patchify(images, patch):
    """(B, C, H, W) -> (B, N, C*p*p), patches in row-major order, each flattened as (C, p, p)."""
    B, C, H, W = images.shape
    gh, gw = H // patch, W // patch
    return images.reshape(B, C, gh, patch, gw, patch).permute(0, 2, 4, 1, 3, 5).reshape(B, gh * gw, C * patch * patch)


def ref_image_tower(W, images):
    """Data2Vec2 (§4.1): biased patch projection, fixed positions on patches only, CLS prepended after, pre-block
    LayerNorm, post-LN blocks ``x = LN1(x + attn(x)); x = LN2(x + mlp(x))``, no final norm."""
    p = "student.image_tower."
    width = W[p + "patch_embed.proj.weight"].shape[0]
    x = patchify(images, PATCH) @ W[p + "patch_embed.proj.weight"].reshape(width, -1).T + W[p + "patch_embed.proj.bias"]
    x = x + W[p + "pos_embed"]
    x = torch.cat([W[p + "cls_token"].expand(len(x), 1, width), x], dim=1)
    x = layer_norm(x, W[p + "norm_pre.weight"], W[p + "norm_pre.bias"], 1e-6)
    for i in range(DEPTH):
        b = f"{p}blocks.{i}."
        wq, wk, wv = thirds(W[b + "attn.qkv.weight"])
        bq, bk, bv = thirds(W[b + "attn.qkv.bias"])
        a = attention(x, wq, bq, wk, bk, wv, bv, W[b + "attn.proj.weight"], W[b + "attn.proj.bias"], HEADS)
        x = layer_norm(x + a, W[b + "norm1.weight"], W[b + "norm1.bias"], 1e-6)
        m = gelu(x @ W[b + "mlp.fc1.weight"].T + W[b + "mlp.fc1.bias"]) @ W[b + "mlp.fc2.weight"].T \
            + W[b + "mlp.fc2.bias"]
        x = layer_norm(x + m, W[b + "norm2.weight"], W[b + "norm2.bias"], 1e-6)
    return x


def ref_text_tower(W, ids, padding):
    """BERT (§4.3): word + position + segment-0 embeddings, LayerNorm(1e-12), post-LN layers, pads masked as keys."""
    p = "student.text_tower.bert."
    e = p + "embeddings."
    x = W[e + "word_embeddings.weight"][ids] + W[e + "position_embeddings.weight"][: ids.shape[1]] \
        + W[e + "token_type_embeddings.weight"][0]
    x = layer_norm(x, W[e + "LayerNorm.weight"], W[e + "LayerNorm.bias"], 1e-12)
    for i in range(DEPTH):
        b = f"{p}encoder.layer.{i}."
        s = b + "attention.self."
        a = attention(x, W[s + "query.weight"], W[s + "query.bias"], W[s + "key.weight"], W[s + "key.bias"],
                      W[s + "value.weight"], W[s + "value.bias"], W[b + "attention.output.dense.weight"],
                      W[b + "attention.output.dense.bias"], HEADS, key_padding=padding)
        x = layer_norm(x + a, W[b + "attention.output.LayerNorm.weight"], W[b + "attention.output.LayerNorm.bias"],
                       1e-12)
        h = gelu(x @ W[b + "intermediate.dense.weight"].T + W[b + "intermediate.dense.bias"])
        x = layer_norm(x + h @ W[b + "output.dense.weight"].T + W[b + "output.dense.bias"],
                       W[b + "output.LayerNorm.weight"], W[b + "output.LayerNorm.bias"], 1e-12)
    return x


def ref_shared(W, x, padding):
    """The shared pre-LN block (§3.1): q/v biases only, LayerScale on both branches; returns (fc1 pre-GELU, out)."""
    p = "student.shared."
    wq, wk, wv = thirds(W[p + "attn.qkv.weight"])
    zero = torch.zeros_like(W[p + "attn.q_bias"])
    h = layer_norm(x, W[p + "norm1.weight"], W[p + "norm1.bias"], 1e-6)
    x = x + W[p + "ls1"] * attention(h, wq, W[p + "attn.q_bias"], wk, zero, wv, W[p + "attn.v_bias"],
                                     W[p + "attn.proj.weight"], W[p + "attn.proj.bias"], HEADS, key_padding=padding)
    fc1 = layer_norm(x, W[p + "norm2.weight"], W[p + "norm2.bias"], 1e-6) @ W[p + "fc1.weight"].T + W[p + "fc1.bias"]
    x = x + W[p + "ls2"] * (gelu(fc1) @ W[p + "fc2.weight"].T + W[p + "fc2.bias"])
    return fc1, x


def ref_student_branch(W, tokens, token_type, padding):
    """§3.2 encode_*: tokens + tte_scale * E[type] -> shared block -> CLS -> (x, x_interm, head(fc_norm(CLS)))."""
    tokens = tokens + W["student.tte_scale"] * W["student.token_type_embeddings.weight"][token_type]
    fc1, out = ref_shared(W, tokens, padding)
    cls = out[:, 0]
    kd = layer_norm(cls, W["student.fc_norm.weight"], W["student.fc_norm.bias"], 1e-6) @ W["student.head.weight"].T \
        + W["student.head.bias"]
    return {"tokens": tokens, "fc1": fc1, "out": out, "kd": kd, "x": cls / cls.norm(dim=-1, keepdim=True),
            "x_interm": fc1[:, 0] / fc1[:, 0].norm(dim=-1, keepdim=True)}


def relative_position_index(grid: int) -> torch.Tensor:
    """BEiT's shared relative position index (§4.2): patch pairs (dh + g-1)(2g-1) + (dw + g-1) with d = query - key;
    row 0 (CLS -> patch) = M, column 0 (patch -> CLS) = M+1, [0, 0] = M+2, M = (2g-1)^2."""
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    rows, cols = rows.flatten(), cols.flatten()
    dh, dw = rows[:, None] - rows[None, :], cols[:, None] - cols[None, :]
    m = (2 * grid - 1) ** 2
    index = torch.empty(grid * grid + 1, grid * grid + 1, dtype=torch.long)
    index[1:, 1:] = (dh + grid - 1) * (2 * grid - 1) + (dw + grid - 1)
    index[0, :] = m
    index[:, 0] = m + 1
    index[0, 0] = m + 2
    return index


def ref_teacher(W, images):
    """BEiTv2 (§4.2): biased patch projection, CLS, no absolute positions, one relative position bias shared by all
    pre-LN blocks with LayerScale (gamma_1/2) and q/v biases; the CLS of the last block, no final norm."""
    p = "teacher."
    x = patchify(images, PATCH) @ W[p + "patch_embed.proj.weight"].reshape(TEACHER_D, -1).T \
        + W[p + "patch_embed.proj.bias"]
    x = torch.cat([W[p + "cls_token"].expand(len(x), 1, TEACHER_D), x], dim=1)
    bias = W[p + "rel_pos_bias.relative_position_bias_table"][relative_position_index(IMG // PATCH)]  # (T, T, H)
    bias = bias.permute(2, 0, 1)
    for i in range(TEACHER_DEPTH):
        b = f"{p}blocks.{i}."
        wq, wk, wv = thirds(W[b + "attn.qkv.weight"])
        zero = torch.zeros_like(W[b + "attn.q_bias"])
        h = layer_norm(x, W[b + "norm1.weight"], W[b + "norm1.bias"], 1e-6)
        x = x + W[b + "gamma_1"] * attention(h, wq, W[b + "attn.q_bias"], wk, zero, wv, W[b + "attn.v_bias"],
                                             W[b + "attn.proj.weight"], W[b + "attn.proj.bias"], TEACHER_HEADS,
                                             bias=bias)
        h = layer_norm(x, W[b + "norm2.weight"], W[b + "norm2.bias"], 1e-6)
        x = x + W[b + "gamma_2"] * (gelu(h @ W[b + "mlp.fc1.weight"].T + W[b + "mlp.fc1.bias"])
                                    @ W[b + "mlp.fc2.weight"].T + W[b + "mlp.fc2.bias"])
    return x[:, 0]


def cross_entropy_rows(logits, labels):
    return torch.logsumexp(logits, dim=1) - logits[torch.arange(len(labels)), labels]


def unit(x):
    return x / x.norm(dim=-1, keepdim=True)


def reference(weights: dict, bank: torch.Tensor, filled: int, pointer: int, batch: dict) -> dict:
    """Everything the original defines for one training step on the whole batch, with per-row losses so that any
    split of the rows over ranks can be checked too."""
    W = {k: v.detach().clone().requires_grad_(k.startswith("student.") and v.requires_grad)
         for k, v in weights.items()}
    with torch.no_grad():  # the original clamps the parameter in place, then exponentiates (gradient flows)
        W["student.logit_scales"].clamp_(0, math.log(100))
    images, ids, padding = batch["image"], batch["text"], batch["padding_mask"]
    image_tower, text_tower = ref_image_tower(W, images), ref_text_tower(W, ids, padding)
    img = ref_student_branch(W, image_tower, 1, None)
    txt = ref_student_branch(W, text_tower, 0, padding)
    teacher = ref_teacher(W, images)

    labels = torch.arange(len(images))
    z = unit(teacher).detach()
    candidates = torch.cat([z, bank[:filled]])  # the global batch, then the written bank rows
    kd_image = cross_entropy_rows(KD_SCALE * unit(img["kd"]) @ candidates.T, labels)
    kd_text = cross_entropy_rows(KD_SCALE * unit(txt["kd"]) @ candidates.T, labels)
    scales = W["student.logit_scales"].exp()
    itc = {}
    for level, key, scale in (("fc1", "x_interm", scales[0]), ("out", "x", scales[1])):
        logits = scale * img[key] @ txt[key].T
        itc[level] = (cross_entropy_rows(logits, labels), cross_entropy_rows(logits.T, labels))
    kd = (kd_image.mean() + kd_text.mean()) / 2
    itc_fc1, itc_out = ((i2t.mean() + t2i.mean()) / 2 for i2t, t2i in (itc["fc1"], itc["out"]))
    itc_loss = (itc_fc1 + itc_out) / 2
    total = kd + itc_loss
    total.backward()

    after = bank.clone()
    for j, row in enumerate(z):  # FIFO, one row at a time
        after[(pointer + j) % len(bank)] = row
    return {
        "image tower": image_tower.detach(), "text tower": text_tower.detach(), "img": img, "txt": txt,
        "teacher": teacher.detach(), "kd_rows": (kd_image.detach(), kd_text.detach()),
        "itc_rows": {k: (a.detach(), b.detach()) for k, (a, b) in itc.items()},
        "kd": kd.detach(), "itc_loss": itc_loss.detach(), "total": total.detach(),
        "grads": {k[len("student."):]: v.grad for k, v in W.items() if v.grad is not None},
        "logit_scales": W["student.logit_scales"].detach(),
        "bank": (after, (pointer + len(z)) % len(bank), min(len(bank), filled + len(z))),
    }


def reference_of(module: PretrainModule, batch: dict) -> dict:
    weights = dict(module.named_parameters())
    bank = module.kd_loss
    return reference(weights, bank.memory_bank.clone(), int(bank.bank_filled), int(bank.bank_pointer), batch)


# ---------------------------------------------------------------------------------------------------------------
# The check


def close(name: str, got, expected) -> None:
    try:
        torch.testing.assert_close(got, expected, **TOL)
    except AssertionError as e:
        raise AssertionError(f"{name} differs from the reference: {str(e).splitlines()[-1]}") from None


def check_step(module: PretrainModule, batch: dict) -> None:
    ref = reference_of(module, batch)
    got = run_evlp(module, batch)
    close("image tower output", got["image tower"], ref["image tower"])
    close("text tower output", got["text tower"], ref["text tower"])
    image_in, text_in = got["shared_in"]
    close("image tokens after the token type", image_in, ref["img"]["tokens"])
    close("text tokens after the token type", text_in, ref["txt"]["tokens"])
    for name, (fc1, out), branch in zip(("image", "text"), got["shared_out"], (ref["img"], ref["txt"])):
        close(f"{name} fc1 activation (pre-GELU)", fc1, branch["fc1"])
        close(f"{name} shared block output", out, branch["out"])
    for name, mine, branch in (("image", got["img"], ref["img"]), ("text", got["txt"], ref["txt"])):
        close(f"{name} kd = head(fc_norm(CLS))", mine["kd"], branch["kd"])
        close(f"{name} x (normalised output CLS)", mine["x"], branch["x"])
        close(f"{name} x_interm (normalised fc1 CLS)", mine["x_interm"], branch["x_interm"])
    close("teacher CLS", got["teacher"], ref["teacher"])

    kd_image, kd_text = ref["kd_rows"]
    close("KD image->teacher loss", got["kd"]["image_loss"], kd_image.mean())
    close("KD text->teacher loss", got["kd"]["text_loss"], kd_text.mean())
    close("kd_loss", got["out"]["kd_loss"], ref["kd"])
    itc_fc1, itc_out = got["itc"]
    for name, mine, level in (("ITC on the fc1 CLS", itc_fc1, "fc1"), ("ITC on the output CLS", itc_out, "out")):
        i2t, t2i = ref["itc_rows"][level]
        close(f"{name}, image->text", mine["image_loss"], i2t.mean())
        close(f"{name}, text->image", mine["text_loss"], t2i.mean())
    close("itc_loss (½(ITC_fc1 + ITC_out))", got["out"]["itc_loss"], ref["itc_loss"])
    close("total loss (KD + ½(ITC_fc1 + ITC_out))", got["out"]["loss"], ref["total"])
    close("clamped logit scales", got["logit_scales"], ref["logit_scales"])

    assert set(got["grads"]) == set(ref["grads"]), set(got["grads"]) ^ set(ref["grads"])
    for name in sorted(got["grads"]):  # every trainable student parameter
        close(f"gradient of student.{name}", got["grads"][name], ref["grads"][name])
    bank, pointer, filled = got["bank"]
    close("memory bank after the push", bank, ref["bank"][0])
    assert (pointer, filled) == ref["bank"][1:], f"bank pointer/fill {(pointer, filled)} != {ref['bank'][1:]}"


def test_the_step_equals_the_reference():
    check_step(build_module(), make_batch())


def test_the_reference_is_not_trivially_satisfied():
    """The fixture exercises what it claims: padding, a clamp that acts, unwritten junk in the bank, a wrap-around
    push, two towers that differ by modality."""
    module, batch = build_module(), make_batch()
    assert batch["padding_mask"].any() and not batch["padding_mask"][:, 0].any()
    assert module.student.logit_scales[0] > math.log(100)
    bank = module.kd_loss
    assert bank.memory_bank[PREFILLED:].norm(dim=-1).min() > 0.5 and PREFILLED + N > BANK
    tte = module.student.tte_scale[:, None] * module.student.token_type_embeddings.weight.T  # (D, 2)
    assert (tte[:, 0] - tte[:, 1]).abs().max() > 0.1


# ---------------------------------------------------------------------------------------------------------------
# Two real processes (gloo): each rank's losses, DDP's averaged gradients and the bank equal the reference


def _rank_step(rank: int, world: int, init_file: str, module: PretrainModule, batch: dict, out_dir: str) -> None:
    torch.set_num_threads(1)  # a forked child must not enter the parent's OpenMP pool (it would hang)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        rows = slice(rank * N // world, (rank + 1) * N // world)
        result = run_evlp(module, {k: v[rows] for k, v in batch.items()})
        for g in result["grads"].values():  # what DDP does with the ranks' gradients
            dist.all_reduce(g)
            g /= world
        keep = {"kd": result["kd"], "itc": result["itc"], "out": result["out"], "grads": result["grads"],
                "bank": result["bank"]}
        torch.save(keep, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def check_two_processes(module: PretrainModule, batch: dict, tmp_path) -> None:
    ref = reference_of(module, batch)
    world = 2
    ctx = mp.get_context("fork")  # the children inherit the module (and any mutation applied to evlp's code)
    procs = [ctx.Process(target=_rank_step, args=(r, world, str(tmp_path / "init"), module, batch, str(tmp_path)))
             for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in procs] == [0] * world, "a rank failed (its traceback is in the captured stderr)"
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]
    kd_image, kd_text = ref["kd_rows"]
    for rank, got in enumerate(results):
        rows = slice(rank * N // world, (rank + 1) * N // world)
        close(f"rank {rank} KD loss", got["kd"]["loss"], (kd_image[rows].mean() + kd_text[rows].mean()) / 2)
        for mine, level in zip(got["itc"], ("fc1", "out")):
            i2t, t2i = ref["itc_rows"][level]
            close(f"rank {rank} ITC loss ({level})", mine["loss"], (i2t[rows].mean() + t2i[rows].mean()) / 2)
        bank, pointer, filled = got["bank"]
        close(f"rank {rank} memory bank after the push (global batch, rank order)", bank, ref["bank"][0])
        assert (pointer, filled) == ref["bank"][1:]
    close("mean of the ranks' losses", sum(r["out"]["loss"] for r in results) / world, ref["total"])
    for name in sorted(ref["grads"]):
        close(f"DDP-averaged gradient of student.{name}", results[0]["grads"][name], ref["grads"][name])


def test_two_processes_equal_the_reference(tmp_path):
    check_two_processes(build_module(), make_batch(), tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# The test bites: each mutation of evlp's code fails it, at the named assertion


def mutate(monkeypatch, owner, name: str, *edits: tuple[str, str]) -> None:
    """Replace ``owner.name`` by its own source with ``edits`` (old -> new) applied, for the rest of the test."""
    func = inspect.unwrap(getattr(owner, name))
    source = textwrap.dedent(inspect.getsource(func))
    for old, new in edits:
        assert source.count(old) == 1, f"mutation site {old!r} not found once in {owner.__name__}.{name}: update " \
                                       f"this meta-test to the code"
        source = source.replace(old, new)
    namespace: dict = {}
    exec(compile(source, inspect.getsourcefile(func), "exec"), func.__globals__, namespace)
    monkeypatch.setattr(owner, name, namespace[name])


MUTATIONS = {
    "drop the ITC term on the fc1 CLS": (
        PretrainModule, "_losses",
        [('itc_loss = (itc_interm["loss"] + itc["loss"]) / 2', 'itc_loss = itc["loss"] / 2')],
        "itc_loss"),
    "drop the ITC term on the output CLS": (
        PretrainModule, "_losses", [('itc_loss = (itc_interm["loss"] + itc["loss"]) / 2',
                                     'itc_loss = itc_interm["loss"] / 2')],
        "itc_loss"),
    "one token type for both modalities": (
        SSMKE, "forward_image", [("self._shared(tokens, IMAGE, None)", "self._shared(tokens, TEXT, None)")],
        "image tokens after the token type"),
    "detach the student's KD vectors instead of the teacher's": (
        PretrainModule, "_losses", [('fp32_or_wider(img["kd"])', 'fp32_or_wider(img["kd"]).detach()'),
                                    ('fp32_or_wider(txt["kd"])', 'fp32_or_wider(txt["kd"]).detach()')],
        "gradient of student.fc_norm.bias"),
    "detach the text side of the ITC keys": (
        ContrastiveLoss, "forward", [("all_text = gather_with_grad(text_features)",
                                      "all_text = gather_with_grad(text_features).detach()")],
        "gradient of student.shared.attn.proj.bias"),
    "forget the fc_norm before the KD head": (
        SSMKE, "_shared", [('"kd": self.head(self.fc_norm(cls))', '"kd": self.head(cls)')],
        "image kd = head(fc_norm(CLS))"),
    "unwritten bank rows used as negatives": (
        ContrastiveDistillationLoss, "_candidate_logits", [('.masked_fill(unwritten, float("-inf"))', "")],
        "KD image->teacher loss"),
    "GELU applied before taking the fc1 CLS": (
        SharedBlock, "forward", [("h = self.fc1(self.norm2(x))", "h = F.gelu(self.fc1(self.norm2(x)))"),
                                 ("self.drop(F.gelu(h))", "self.drop(h)")],
        "image fc1 activation (pre-GELU)"),
}


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_each_mutation_is_caught(mutation, monkeypatch):
    owner, name, edits, caught_by = MUTATIONS[mutation]
    mutate(monkeypatch, owner, name, *edits)
    with pytest.raises(AssertionError, match="^" + re.escape(caught_by)):
        check_step(build_module(), make_batch())


def test_local_distillation_candidates_are_caught(monkeypatch, tmp_path):
    """The original's memory-bank loss: the rank's own teacher vectors + bank, labels arange(B). On one process it
    is the same function, so only the 2-process check can catch it."""
    mutate(monkeypatch, PretrainModule, "_losses",
           ("self.kd_logit_scale, use_memory_bank=train, gather=train,",
            "self.kd_logit_scale, use_memory_bank=train, gather=False,"))
    check_step(build_module(), make_batch())  # one process: unchanged
    with pytest.raises(AssertionError, match="^rank 0 KD loss"):
        check_two_processes(build_module(), make_batch(), tmp_path)
