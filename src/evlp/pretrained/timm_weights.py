"""Weight files for timm donors (``kind: timm:<model name>``, ``path: <file>``): read, map, check, load.

A file is a state dict saved with ``safetensors`` or ``torch.save``; the latter is read with
``torch.load(weights_only=True)`` only, so a file that pickles anything but tensors and plain containers is refused
rather than unpickled. A training checkpoint that wraps the state dict (``{'state_dict': ...}``, ``{'model': ...}``)
and DDP's ``module.`` prefix are unwrapped. Then, in order:

* torchvision's MobileNetV2 (``features.*``, ``classifier.1.*``) is renamed to timm's ``mobilenetv2_*`` layout (the
  table in ``torchvision_mobilenet_v2``), so torchvision's ImageNet weights fill ``timm:mobilenetv2_100``;
* the model family's own ``checkpoint_filter_fn``, which timm applies to its pretrained files, converts other
  upstream layouts (OpenAI/open_clip, DINOv2, BEiT ...) and resizes position embeddings to the built image size;
* the classifier is dropped where the model was built without one (a tower, or a teacher whose target is not
  ``logits``); a teacher that distils ``logits`` gets a classifier with as many classes as the file's.

What is left must be exactly the model's state dict (names and shapes); anything else is one ``EvlpError`` that
names the tensors. ``check_timm_weights`` does all of this against a model built on the meta device, so a file that
does not fit is reported before any work, without allocating the model.
"""

from __future__ import annotations

import pickle
import re
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from evlp.errors import EvlpError
from evlp.models.timm_donors import create_timm_model
from evlp.pretrained.files import first_line, sniff
from evlp.pretrained.towers import fit_problems

WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module")  # where training checkpoints nest the weights


def _is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(k, str) for k in obj) and \
        all(isinstance(v, torch.Tensor) for v in obj.values())


def read_state_dict(path: str | Path, where: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors or ``torch.save`` file, unwrapped; ``EvlpError`` saying what the file is
    otherwise."""
    path = Path(path)
    if not path.is_file():
        raise EvlpError(f"{where}.path: {path} does not exist; put the weights file there, or set {where}.path=null "
                        f"{where}.pretrained_hub=true for timm's own pretrained weights" if not path.exists() else
                        f"{where}.path: {path} is a folder, expected a weights file (.safetensors, .pth, .pt)")
    kind = sniff(path)
    if kind == "safetensors":
        try:
            return load_file(path, device="cpu")
        except SafetensorError as e:
            raise EvlpError(f"{where}.path: {path}: truncated or corrupt safetensors file ({first_line(e)})") from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=kind == "zip")
    except pickle.UnpicklingError as e:
        raise EvlpError(f"{where}.path: {path} pickles more than tensors ({first_line(e)}); evlp loads weights with "
                        f"torch.load(weights_only=True) and never runs pickled code: save the state dict alone, or "
                        f"as safetensors") from None
    except Exception as e:
        raise EvlpError(f"{where}.path: {path}: unreadable checkpoint ({first_line(e)})") from e
    for key in WRAPPER_KEYS:
        if isinstance(obj, dict) and not _is_state_dict(obj) and _is_state_dict(obj.get(key)):
            obj = obj[key]
    if not _is_state_dict(obj):
        found = f"a dict with keys {list(obj)[:6]}" if isinstance(obj, dict) else f"a {type(obj).__name__}"
        raise EvlpError(f"{where}.path: {path} holds {found}, expected a state dict (tensor name -> tensor)")
    if all(k.startswith("module.") for k in obj):  # saved from a DistributedDataParallel wrapper
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


# torchvision MobileNetV2 sub-module -> timm's name, for a block without (DepthwiseSeparableConv) and with
# (InvertedResidual) an expansion convolution.
TV_SEPARABLE = {"conv.0.0": "conv_dw", "conv.0.1": "bn1", "conv.1": "conv_pw", "conv.2": "bn2"}
TV_INVERTED = {"conv.0.0": "conv_pw", "conv.0.1": "bn1", "conv.1.0": "conv_dw", "conv.1.1": "bn2",
               "conv.2": "conv_pwl", "conv.3": "bn3"}
TV_FEATURE = re.compile(r"^features\.(\d+)\.(.+)\.([a-z_]+)$")


def is_torchvision_mobilenet_v2(state: dict) -> bool:
    return "features.0.0.weight" in state and "features.1.conv.0.0.weight" in state


def torchvision_mobilenet_v2(state: dict, model: nn.Module) -> dict:
    """Rename torchvision's MobileNetV2 keys to timm's (the same network: ReLU6, BatchNorm eps 1e-5, same padding):

    ==========================================  ==========================================
    torchvision                                 timm ``mobilenetv2_*``
    ==========================================  ==========================================
    ``features.0.{0,1}``                        ``conv_stem``, ``bn1``
    ``features.i.conv.*``, i = 1 .. n           ``blocks.s.j.*``, the i-th block in order
    ``features.{n+1}.{0,1}``                    ``conv_head``, ``bn2``
    ``classifier.1``                            ``classifier``
    ==========================================  ==========================================

    Keys that match nothing keep their names (and are then reported as unexpected).
    """
    blocks = [f"blocks.{s}.{j}" for s, stage in enumerate(model.blocks) for j in range(len(stage))]
    head = len(blocks) + 1
    out = {}
    for key, value in state.items():
        m = TV_FEATURE.match(key)
        new = key
        if key.startswith("classifier.1."):
            new = "classifier." + key[len("classifier.1."):]
        elif m:
            index, module, tensor = int(m.group(1)), m.group(2), m.group(3)
            if index in (0, head) and module in ("0", "1"):
                names = ("conv_stem", "bn1") if index == 0 else ("conv_head", "bn2")
                new = f"{names[int(module)]}.{tensor}"
            elif 1 <= index <= len(blocks):
                table = TV_INVERTED if f"features.{index}.conv.3.weight" in state else TV_SEPARABLE
                if module in table:
                    new = f"{blocks[index - 1]}.{table[module]}.{tensor}"
        out[new] = value
    return out


def _classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    names = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or ()
    return tuple(f"{n}." for n in ((names,) if isinstance(names, str) else names))


def map_state_dict(state: dict, model: nn.Module, name: str) -> dict:
    """A read state dict in ``model``'s names and shapes (see the module docstring). A classifier of another size
    than the model's is resized to the file's (``reset_classifier``) when the model has one."""
    if is_torchvision_mobilenet_v2(state) and name.split(".")[0].startswith("mobilenetv2"):
        state = torchvision_mobilenet_v2(state, model)
    family_filter = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    if family_filter is not None:
        state = family_filter(state, model)
    expected = model.state_dict()
    heads = _classifier_prefixes(model)
    if not any(k.startswith(heads) for k in expected):
        return {k: v for k, v in state.items() if not (heads and k.startswith(heads))}
    weight = next((f"{h}weight" for h in heads if f"{h}weight" in state), None)
    if weight is not None and weight in expected and state[weight].shape[0] != expected[weight].shape[0]:
        model.reset_classifier(state[weight].shape[0])
    return state


def fit_weights(model: nn.Module, state: dict, name: str, path: Path, where: str) -> dict:
    """``state`` mapped to ``model`` (which may be on the meta device), or the EvlpError naming what does not fit."""
    mapped = map_state_dict(state, model, name)
    problems = fit_problems(model.state_dict(), mapped)
    if problems:
        hint = (" (torchvision's MobileNetV2 weights fit timm:mobilenetv2_100)" if is_torchvision_mobilenet_v2(state)
                else "")
        raise EvlpError(f"{where}.path: {path} does not fit timm's {name}{hint}: {'; '.join(problems)}")
    return mapped


def load_timm_model(name: str, img_size: int, where: str, path: str | None = None, hub: bool = False,
                    model_kwargs=None, keep_classifier: bool = False) -> nn.Module:
    """timm's ``name`` with weights from ``path``, or timm's own pretrained ones (``hub``), or random ones.

    ``keep_classifier`` keeps the classifier (a teacher that distils logits); otherwise the model is built
    without one.
    """
    if path is not None and hub:
        raise EvlpError(f"{where}: both path and pretrained_hub are set; give one source of weights")
    state = read_state_dict(path, where) if path is not None else None
    model = create_timm_model(name, img_size, None if keep_classifier else 0, where, model_kwargs, pretrained=hub)
    if state is not None:
        model.load_state_dict(fit_weights(model, state, name, Path(path), where), strict=True)
    return model


def check_timm_weights(name: str, img_size: int, where: str, path: str, model_kwargs=None,
                       keep_classifier: bool = False) -> None:
    """Raise the EvlpError ``load_timm_model`` would, without building the model in memory (meta device)."""
    state = read_state_dict(path, where)
    with torch.device("meta"):
        model = create_timm_model(name, img_size, None if keep_classifier else 0, where, model_kwargs)
    fit_weights(model, state, name, Path(path), where)
