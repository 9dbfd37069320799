"""evlp: efficient vision-language pretraining from pretrained unimodal models."""

__version__ = "0.1.0"
