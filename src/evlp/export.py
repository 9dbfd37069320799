"""``evlp export``: a training checkpoint -> a self-contained folder in the ecosystem's formats, optionally pushed.

    out/
      model.safetensors   the student's weights only (no teacher, no memory bank, no optimizer state)
      config.json         format + version, evlp version, image size, max text length, the run config's model
                          section with the weights' tower sizes, the distillation head's width, the source
      tokenizer files     ``save_pretrained`` of the run's tokenizer
      README.md           a model card: architecture, parameters, training data, evaluation, intended use, limits

``evlp.load(out)`` reads it back from safetensors and JSON only. ``push_to_hub`` uploads the folder with
huggingface_hub (``create_repo`` + ``upload_folder``), like open_clip's ``push_to_hf_hub``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from evlp import __version__
from evlp.api import (CONFIG_NAME, EXPORT_FORMAT, EXPORT_FORMAT_VERSION, WEIGHTS_NAME, LoadedModel, load_model)
from evlp.errors import EvlpError
from evlp.train.report import results_table

CARD_NAME = "README.md"


def export_model(source: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write the export folder ``out`` for a checkpoint (or re-export an export folder); returns ``out``.

    ``out`` must not exist, be empty, or be an earlier export (which is replaced). The folder is written under a
    temporary name next to ``out`` and renamed at the end, so an interrupted export leaves no half-written folder.
    """
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / CONFIG_NAME).is_file())):
        raise EvlpError(f"--out {out} exists and is not empty (nor an earlier export); choose a new folder")
    loaded = load_model(source, "cpu")
    if loaded.kind == "export" and loaded.source.resolve() == out.resolve():
        raise EvlpError(f"{out} is the export being read; choose another --out folder")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # left by an earlier interrupted export of this process id
    tmp.mkdir(parents=True)
    try:
        state = {k: v.detach().contiguous() for k, v in loaded.model.state_dict().items()}
        save_file(state, tmp / WEIGHTS_NAME, metadata={"format": "pt"})
        # safetensors creates its file owner-only (0600); an export is meant to be shared like the other files.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp / WEIGHTS_NAME, 0o666 & ~umask)
        (tmp / CONFIG_NAME).write_text(json.dumps(export_config(loaded), indent=2) + "\n")
        loaded.tokenizer.tokenizer.save_pretrained(tmp)
        (tmp / CARD_NAME).write_text(model_card(loaded, out.name, find_results(loaded)))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def export_config(loaded: LoadedModel) -> dict:
    source = {"kind": loaded.kind, "name": loaded.source.name, "step": loaded.step}
    if loaded.run_config is not None:
        source["run_name"] = loaded.run_config.get("run_name")
    return {
        "format": EXPORT_FORMAT,
        "format_version": EXPORT_FORMAT_VERSION,
        "evlp_version": __version__,
        "image_size": loaded.image_size,
        "max_text_len": loaded.tokenizer.max_len,
        "embedding": "L2-normalised CLS of the shared block output (encode_image / encode_text)",
        # The run's model section with the weights' tower sizes; `path` entries say what the towers started from.
        "model": loaded.model_config,
        "kd_dim": loaded.kd_dim,
        "source": source,
    }


def find_results(loaded: LoadedModel) -> tuple[dict | None, str]:
    """``(results, note)``: the run's ``results.json`` when it measured these very weights, else ``None`` and why.

    The run folder is ``<log_dir>/<run_name>/``: where the config says, or, for a moved base folder, at the same
    place relative to the checkpoint (``<model_path>/<run_name>/<file>``).
    """
    cfg = loaded.run_config
    if cfg is None:
        return None, "no run folder is known for an export"
    run_name = cfg.get("run_name", "")
    candidates = [Path(cfg["log_dir"]) / run_name]
    relative = os.path.relpath(cfg["log_dir"], cfg["model_path"])
    candidates.append(loaded.source.parent.parent / relative / run_name)
    for run_dir in candidates:
        path = run_dir / "results.json"
        if path.is_file():
            try:
                results = json.loads(path.read_text())
            except json.JSONDecodeError:
                return None, f"{path} is not valid JSON"
            if results.get("steps") != loaded.step:
                return None, (f"{path} holds the results of step {results.get('steps')}, not of this checkpoint "
                              f"(step {loaded.step})")
            return results, f"from the training run's results.json (step {loaded.step})"
    return None, f"no results.json in the run folder {candidates[0]}"


# ---------------------------------------------------------------------------------------------------------------
# Model card


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _teacher_name(teacher: dict) -> str:
    kind = teacher.get("kind", "beitv2")
    return "BEiTv2 ViT" if kind == "beitv2" else kind


def _origin(path: str | None) -> str:
    return f"initialised from `{path}`" if path else "randomly initialised"


def _data_names(cfg: dict) -> list[str]:
    names = []
    data_path = str(cfg.get("data_path", "")).rstrip("/")
    for entry in cfg["data"]["train"]:
        if entry == "quickstart":
            q = cfg["data"]["quickstart"]
            names.append(f"the embedded synthetic quickstart dataset ({q['num_train']:,} procedurally drawn scenes "
                         f"of coloured shapes with captions, {q['image_size']}px)")
        else:  # shown relative to data_path: the reader's folders differ anyway
            inside = data_path and entry.startswith(data_path + "/")
            names.append(f"`{entry[len(data_path) + 1:] if inside else entry}`")
    return names


def _results_section(results: dict | None, note: str) -> list[str]:
    if results is None:
        return ["No evaluation results are included: " + note + ". Evaluate the model with the standard protocols "
                "(e.g. `evlp eval zeroshot` / `evlp eval retrieval`)."]
    lines = results_table(results).splitlines()
    protocol = results.get("protocol") or {}
    lines += ["", f"Numbers in percent, {note}. Protocol:", ""]
    lines += [f"- {key}: {value}" for key, value in protocol.items()]
    return lines


def model_card(loaded: LoadedModel, name: str, found: tuple[dict | None, str]) -> str:
    m, cfg, model_cfg = loaded.model, loaded.run_config, loaded.model_config
    image, text = model_cfg["image_tower"], model_cfg["text_tower"]
    total = _count(m)
    towers = _count(m.image_tower) + _count(m.text_tower)
    image_from, text_from = _origin(image.get("path")), _origin(text.get("path"))
    teacher = model_cfg.get("teacher", {})
    lines = [
        "---",
        "library_name: evlp",
        "pipeline_tag: zero-shot-image-classification",
        "tags: [evlp, s-smke, clip, vision-language, knowledge-distillation, zero-shot-image-classification]",
        "---",
        "",
        f"# {name}",
        "",
        "An S-SMKE vision-language dual encoder trained with [evlp](https://github.com/TimCares/EV-LP): the first "
        "layers of a pretrained image model and of a pretrained text model, one shared Transformer block applied to "
        "each modality separately, trained with an image-text contrastive loss plus contrastive distillation from a "
        "frozen image teacher. Images and texts map to one embedding space; cosine similarity compares them.",
        "",
        "## Architecture",
        "",
        "| part | description | parameters |",
        "|---|---|---:|",
        f"| image tower | {m.image_tower.describe()}; {image_from} | {_count(m.image_tower):,} |",
        f"| text tower | {m.text_tower.describe()}; {text_from} | {_count(m.text_tower):,} |",
        f"| shared block and heads | 1 Transformer block, width {model_cfg['embed_dim']}, {model_cfg['num_heads']} "
        f"heads, token-type embeddings, projections, distillation head | {total - towers:,} |",
        f"| total | | {total:,} |",
        "",
        f"Embeddings: {model_cfg['embed_dim']}-dimensional, L2-normalised (the CLS token of the shared block's "
        f"output). Images: {loaded.image_size}x{loaded.image_size}, resized without cropping, ImageNet mean/std. Text: "
        f"at most {loaded.tokenizer.max_len} tokens including [CLS] and [SEP].",
        "",
        "## Usage",
        "",
        "```python",
        "import evlp",
        "",
        f'model, preprocess, tokenizer = evlp.load("{name}")  # this folder',
        'evlp.classify(model, preprocess, tokenizer, ["photo.jpg"], ["dog", "cat", "car"])  # [(label, prob)]',
        "",
        'token_ids, padding_mask = tokenizer(["a dog on a beach"])',
        "text = model.encode_text(token_ids, padding_mask)  # (1, D), L2-normalised",
        "```",
        "",
        f"Search your own photos: `evlp index PHOTOS_DIR --model {name}`, then `evlp search \"a dog on a beach\"`.",
        "",
        "## Training",
        "",
    ]
    if cfg is not None:
        d, t = cfg["data"], cfg["trainer"]
        lines += [f"- data: {'; '.join(_data_names(cfg))}"]
        steps = f"{loaded.step:,} steps" if loaded.step is not None else "unknown steps"
        lines += [f"- {steps}, {d['batch_size']} pairs per batch and process, on {t['devices']} {t['accelerator']} "
                  f"device(s) x {t['num_nodes']} node(s), precision {t['precision']}",
                  f"- run `{cfg.get('run_name')}`, checkpoint `{loaded.source.name}`"]
    lines += [f"- distillation teacher: {_teacher_name(teacher)} ({teacher.get('path') or 'randomly initialised'}); "
              "the teacher is not part of this model"]
    lines += ["", "## Evaluation", "", *_results_section(*found), "", "## Intended use", "",
              "Zero-shot image classification with text prompts and text-to-image / image-to-text retrieval (for "
              "example searching a photo collection by description), and research on efficient vision-language "
              "pretraining. Check accuracy on your own data before relying on it.", "",
              "## Limitations", "", *(f"- {line}" for line in limitations(loaded)), "",
              "## Files", "",
              f"`{WEIGHTS_NAME}` (weights), `{CONFIG_NAME}` (architecture and preprocessing), the tokenizer files. "
              "Loading reads safetensors and JSON only; nothing is unpickled.", ""]
    return "\n".join(lines)


def limitations(loaded: LoadedModel) -> list[str]:
    cfg, teacher = loaded.run_config or {}, loaded.model_config.get("teacher", {})
    train = [str(entry).lower() for entry in cfg.get("data", {}).get("train", [])]
    items = []
    if train == ["quickstart"]:
        items.append("**Toy model**: trained only on synthetic pictures of coloured shapes; it knows nothing about "
                     "real images or general language.")
    items += [
        "Not applicable to visual question answering, image captioning or visual reasoning: a dual encoder gives one "
        "embedding per image and per text, with no cross-attention between them and no text generation.",
        "Low performance on unimodal downstream tasks, especially CoLA (GLUE): use a dedicated text or image model "
        "for text-only or image-only work.",
    ]
    if any("coco" in entry for entry in train):
        items.append("COCO (train split) is in the training data, so COCO retrieval results are not zero-shot.")
    elif train and train != ["quickstart"]:
        items.append("The published S-SMKE recipe trains on COCO; this run's data (above) decides whether COCO "
                     "retrieval results are zero-shot.")
    if teacher.get("path") and teacher.get("kind", "beitv2") == "beitv2":
        items.append("The distillation teacher (BEiTv2) was pretrained on ImageNet-1K images, so ImageNet "
                     "\"zero-shot\" results are not strictly zero-shot.")
    elif teacher.get("path") or teacher.get("pretrained_hub"):
        items.append(f"If the distillation teacher ({_teacher_name(teacher)}) was trained on ImageNet images, "
                     "ImageNet \"zero-shot\" results are not strictly zero-shot.")
    if train != ["quickstart"]:
        items.append("Inherits the biases of its web-crawled caption data and of the pretrained towers.")
    return items


# ---------------------------------------------------------------------------------------------------------------
# Hub upload


def push_to_hub(folder: str | os.PathLike, repo_id: str, *, endpoint: str | None = None, token: str | None = None,
                private: bool = False, commit_message: str = "Upload evlp export") -> str:
    """Create the model repo ``repo_id`` if needed and upload ``folder`` to it; returns the repo URL.

    ``endpoint`` defaults to huggingface_hub's (``HF_ENDPOINT`` or huggingface.co), ``token`` to the logged-in one.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    folder = Path(folder)
    if not (folder / CONFIG_NAME).is_file():
        raise EvlpError(f"{folder} is not an `evlp export` folder")
    api = HfApi(endpoint=endpoint, token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(repo_id=repo_id, folder_path=folder, repo_type="model", commit_message=commit_message)
    except OfflineModeIsEnabled:
        raise EvlpError("cannot push: HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set; unset it to upload") from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        reason = " ".join(str(e).split())[:300] or type(e).__name__
        raise EvlpError(f"push to {repo_id} failed: {reason}") from None
    return str(url)
