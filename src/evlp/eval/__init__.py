"""Evaluation: image-text retrieval recall@k (per caption, or against distinct captions with the unique-caption
subset), CLIP-style zero-shot classification, and embedding an eval loader."""

from evlp.eval.adapters import OpenClipAdapter
from evlp.eval.captions import CaptionRetrieval, caption_retrieval_metrics, evaluate_caption_retrieval
from evlp.eval.embed import RetrievalEmbeddings, embed_images, embed_retrieval_set
from evlp.eval.retrieval import chance_retrieval_metrics, retrieval_hits, retrieval_metrics
from evlp.eval.zero_shot import zero_shot_accuracy, zero_shot_classifier

__all__ = [
    "CaptionRetrieval",
    "OpenClipAdapter",
    "RetrievalEmbeddings",
    "caption_retrieval_metrics",
    "chance_retrieval_metrics",
    "embed_images",
    "embed_retrieval_set",
    "evaluate_caption_retrieval",
    "retrieval_hits",
    "retrieval_metrics",
    "zero_shot_accuracy",
    "zero_shot_classifier",
]
