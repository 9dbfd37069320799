"""GLUE metrics, computed once over a whole evaluation set, in percent (reference §8.4, defect 33).

The original computed every metric per batch and averaged the batch values, which is not the metric for the
non-decomposable ones (Matthews correlation with batches of 16, F1, Spearman) and gives NaN Spearman values for
constant batches. Here each function takes all predictions and labels of the set at once:

    glue_metrics("mrpc", predictions, labels)   # {"f1": 88.1, "accuracy": 83.6}

``predictions`` are class ids for classification and scores for STS-B. The definitions follow scikit-learn
(``accuracy_score``, ``f1_score`` of the positive class 1, ``matthews_corrcoef``) and SciPy (``pearsonr``,
``spearmanr`` with average ranks for ties); the tests check equality on the same inputs. Where those libraries warn and
return 0 (F1, MCC with an empty denominator) or NaN (a correlation of a constant), these return 0: a model that
predicts one constant has no correlation with the labels, and a NaN could never be chosen as the best checkpoint.
"""

from __future__ import annotations

import numpy as np

# What each task reports (logged as val/<name>); the first is the one that picks the best checkpoint.
TASK_METRICS = {
    "cola": ("mcc",),
    "sst2": ("accuracy",),
    "mrpc": ("f1", "accuracy"),
    "qqp": ("f1", "accuracy"),
    "stsb": ("spearman", "pearson"),
    "mnli": ("accuracy",),
    "qnli": ("accuracy",),
    "rte": ("accuracy",),
    "wnli": ("accuracy",),
}

# The seed README's names of the metrics.
DISPLAY_NAMES = {"accuracy": "Accuracy", "f1": "F1", "mcc": "MCC", "spearman": "Spearman", "pearson": "Pearson"}

DEFINITIONS = {
    "accuracy": "accuracy = share of correct predictions",
    "f1": "F1 of the positive class (label 1) = 2TP / (2TP + FP + FN)",
    "mcc": "Matthews correlation (TP·TN − FP·FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN))",
    "spearman": "Spearman rank correlation (average ranks for ties) of predicted and gold scores",
    "pearson": "Pearson correlation of predicted and gold scores",
}


def _arrays(predictions, labels) -> tuple[np.ndarray, np.ndarray]:
    p, y = np.asarray(predictions).reshape(-1), np.asarray(labels).reshape(-1)
    if p.shape != y.shape:
        raise ValueError(f"{p.size} predictions for {y.size} labels")
    if p.size == 0:
        raise ValueError("no predictions to score")
    return p, y


def accuracy(predictions, labels) -> float:
    p, y = _arrays(predictions, labels)
    return 100.0 * float(np.mean(p == y))


def f1(predictions, labels, positive: int = 1) -> float:
    """F1 of class ``positive`` (scikit-learn's ``f1_score(average="binary")``); 0 when there are no positives."""
    p, y = _arrays(predictions, labels)
    tp = int(np.sum((p == positive) & (y == positive)))
    fp = int(np.sum((p == positive) & (y != positive)))
    fn = int(np.sum((p != positive) & (y == positive)))
    denominator = 2 * tp + fp + fn
    return 100.0 * 2 * tp / denominator if denominator else 0.0


def matthews_corrcoef(predictions, labels) -> float:
    """Matthews correlation, multi-class form (scikit-learn's); 0 when predictions or labels are constant."""
    p, y = _arrays(predictions, labels)
    classes, encoded = np.unique(np.concatenate([y, p]), return_inverse=True)
    y_i, p_i = encoded[:y.size], encoded[y.size:]
    k = len(classes)
    confusion = np.zeros((k, k), dtype=np.float64)
    np.add.at(confusion, (y_i, p_i), 1.0)
    t_sum, p_sum = confusion.sum(axis=1), confusion.sum(axis=0)
    correct, n = np.trace(confusion), confusion.sum()
    cov_ytyp = correct * n - t_sum @ p_sum
    cov_ypyp = n * n - p_sum @ p_sum
    cov_ytyt = n * n - t_sum @ t_sum
    if cov_ypyp * cov_ytyt == 0:
        return 0.0
    return 100.0 * float(cov_ytyp / np.sqrt(cov_ytyt * cov_ypyp))


def pearson(predictions, labels) -> float:
    p, y = _arrays(predictions, labels)
    p, y = p.astype(np.float64), y.astype(np.float64)
    dp, dy = p - p.mean(), y - y.mean()
    denominator = np.sqrt((dp @ dp) * (dy @ dy))
    if denominator == 0:
        return 0.0
    return 100.0 * float(np.clip((dp @ dy) / denominator, -1.0, 1.0))


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties sharing the mean of their ranks (``scipy.stats.rankdata(method="average")``)."""
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    starts = np.r_[True, sorted_x[1:] != sorted_x[:-1]]
    group = np.cumsum(starts) - 1  # tie group of each sorted element
    first = np.flatnonzero(starts)
    counts = np.diff(np.r_[first, x.size])
    mean_rank = first + (counts + 1) / 2.0  # 1-based mean rank of each group
    ranks = np.empty(x.size, dtype=np.float64)
    ranks[order] = mean_rank[group]
    return ranks


def spearman(predictions, labels) -> float:
    p, y = _arrays(predictions, labels)
    return pearson(_average_ranks(p.astype(np.float64)), _average_ranks(y.astype(np.float64)))


METRICS = {"accuracy": accuracy, "f1": f1, "mcc": matthews_corrcoef, "spearman": spearman, "pearson": pearson}


def glue_metrics(task: str, predictions, labels) -> dict[str, float]:
    """Every metric ``task`` reports, over the whole set, in percent."""
    return {name: METRICS[name](predictions, labels) for name in TASK_METRICS[task]}
