"""evlp: efficient vision-language pretraining from pretrained unimodal models.

    import evlp
    model, preprocess, tokenizer = evlp.load("model-375-1.2345-train.ckpt")   # or an `evlp export` folder
    evlp.classify(model, preprocess, tokenizer, ["dog.jpg"], ["dog", "cat"])   # [("dog", 0.93)]
"""

__version__ = "0.1.0"

# The public API is imported on first use: `import evlp` (and so the `evlp` command) stays light, without torch.
_LAZY = {
    "load": "evlp.api",
    "classify": "evlp.api",
    "zero_shot_classifier": "evlp.eval.zero_shot",
    "EvlpError": "evlp.errors",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'evlp' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
