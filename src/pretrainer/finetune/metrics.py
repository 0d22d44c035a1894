"""Task metrics, computed by the established packages: scikit-learn (accuracy, F1, Matthews
correlation), scipy (Pearson, Spearman), seqeval (entity-level F1 for tagging). SQuAD's exact match
and token F1 are defined here (they are a normalisation and a bag-of-tokens overlap).

All scores are fractions in [0, 1] (SQuAD's own script prints percentages).
"""

from __future__ import annotations

import collections
import re
import string
import warnings

import numpy as np


def classification_metrics(gold: list[int], pred: list[int], n_labels: int) -> dict:
    """``accuracy``; ``f1``: binary F1 of label 1 (the second label, e.g. ``1`` of ``0``/``1``)
    when there are two labels, else macro-averaged; ``f1_macro``; ``mcc`` (Matthews); and
    ``majority_baseline``: the accuracy of always answering the most frequent gold label, the score
    a model that learned nothing about the inputs gets."""
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    labels = list(range(n_labels))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # undefined precision of a never-predicted class is 0
        macro = f1_score(gold, pred, labels=labels, average="macro", zero_division=0)
        f1 = (f1_score(gold, pred, labels=labels, pos_label=1, average="binary", zero_division=0)
              if n_labels == 2 else macro)
        mcc = matthews_corrcoef(gold, pred) if len(gold) else 0.0
    majority = max((gold.count(c) for c in set(gold)), default=0) / max(len(gold), 1)
    return {"accuracy": float(accuracy_score(gold, pred)), "f1": float(f1),
            "f1_macro": float(macro), "mcc": float(mcc), "majority_baseline": float(majority)}


def regression_metrics(gold: list[float], pred: list[float]) -> dict:
    """``pearson``, ``spearman`` (0 when either side is constant) and ``mse``."""
    from scipy.stats import pearsonr, spearmanr

    g, p = np.asarray(gold, dtype=np.float64), np.asarray(pred, dtype=np.float64)
    constant = len(g) < 2 or np.ptp(g) == 0 or np.ptp(p) == 0
    pearson = 0.0 if constant else float(pearsonr(g, p)[0])
    spearman = 0.0 if constant else float(spearmanr(g, p)[0])
    return {"pearson": pearson, "spearman": spearman, "mse": float(np.mean((g - p) ** 2)) if len(g) else 0.0}


def tagging_metrics(gold: list[list[str]], pred: list[list[str]]) -> dict:
    """Entity-level ``f1``, ``precision``, ``recall`` (seqeval, CoNLL's IOB chunks) and the
    word-level ``accuracy``."""
    from seqeval.metrics import f1_score, precision_score, recall_score

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # seqeval warns about tags outside the IOB scheme
        scores = {"f1": f1_score(gold, pred, zero_division=0),
                  "precision": precision_score(gold, pred, zero_division=0),
                  "recall": recall_score(gold, pred, zero_division=0)}
    words = sum(len(s) for s in gold)
    right = sum(a == b for gs, ps in zip(gold, pred) for a, b in zip(gs, ps))
    return {**{k: float(v) for k, v in scores.items()}, "accuracy": right / words if words else 0.0}


# ----------------------------------------------------------------------------------------------
# SQuAD

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles (a, an, the),
    whitespace runs collapsed to single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def token_f1(prediction: str, gold: str) -> float:
    """Harmonic mean of precision and recall of the normalised tokens (a multiset overlap)."""
    p, g = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not p or not g:
        return float(p == g)  # both empty: 1; one empty: 0
    common = sum((collections.Counter(p) & collections.Counter(g)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def squad_metrics(predictions: list[str], golds: list[list[str]]) -> dict:
    """Mean over questions of the best ``exact_match`` and ``f1`` against any gold answer."""
    em = f1 = 0.0
    for pred, answers in zip(predictions, golds):
        answers = answers or [""]
        em += max(exact_match(pred, a) for a in answers)
        f1 += max(token_f1(pred, a) for a in answers)
    n = max(1, len(predictions))
    return {"exact_match": em / n, "f1": f1 / n}
