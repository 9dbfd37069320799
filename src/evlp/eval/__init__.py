"""Evaluation: image-text retrieval recall@k, CLIP-style zero-shot classification, and embedding an eval loader."""

from evlp.eval.embed import RetrievalEmbeddings, embed_images, embed_retrieval_set
from evlp.eval.retrieval import chance_retrieval_metrics, retrieval_hits, retrieval_metrics
from evlp.eval.zero_shot import zero_shot_accuracy, zero_shot_classifier

__all__ = [
    "RetrievalEmbeddings",
    "chance_retrieval_metrics",
    "embed_images",
    "embed_retrieval_set",
    "retrieval_hits",
    "retrieval_metrics",
    "zero_shot_accuracy",
    "zero_shot_classifier",
]
