"""Evaluation of sentence-embedding students: similarity agreement with the teacher, linear probes, CPU latency.

* `encode(model, texts, tokenizer)`: normalized-or-not sentence embeddings, batched by length (sorted, then put
  back in the input order).
* `similarity_spearman(student_emb, teacher_emb)`: Spearman correlation between the two models' cosine
  similarities over all pairs ``i < j`` of held-out sentences (1 = the student ranks every pair like the teacher).
* `linear_probe(train_emb, train_y, test_emb, test_y)`: accuracy of a logistic regression on frozen embeddings.
* `encode_latency_ms(models, texts, tokenizer)`: median CPU time to embed one sentence, models measured
  interleaved in one process so that machine load affects them alike.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from kdistill.encoders.data import tokenize
from kdistill.encoders.features import encoder_features, trim_padding
from kdistill.errors import DataError

__all__ = ["encode", "encode_latency_ms", "linear_probe", "pair_cosines", "similarity_spearman"]


@torch.no_grad()
def _embed(model: nn.Module, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    _, feats = encoder_features(model, trim_padding(dict(inputs)), {"embedding"})
    return feats["embedding"]


@torch.no_grad()
def encode(model: nn.Module, texts: Sequence[str], tokenizer: Any, *, max_length: int = 128,
           batch_size: int = 64) -> torch.Tensor:
    """Sentence embeddings ``(N, D)`` (float32, CPU) of `texts`, in order. `model`: a `SentenceEncoder` (its
    output) or an HF encoder (mean of the last hidden states). Eval mode is set and restored."""
    was = model.training
    model.eval()
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    device = next(model.parameters()).device
    out = [None] * len(texts)
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            enc = tokenize([texts[i] for i in idx], tokenizer, max_length)
            emb = _embed(model, {k: v.to(device) for k, v in enc.items()}).float().cpu()
            for row, i in enumerate(idx):
                out[i] = emb[row]
    finally:
        model.train(was)
    return torch.stack(out)


def pair_cosines(emb: torch.Tensor) -> np.ndarray:
    """Cosine similarities of every pair ``i < j`` of rows of `emb` (float64, row-major pair order)."""
    e = torch.nn.functional.normalize(emb.double(), dim=1)
    sim = e @ e.T
    iu = torch.triu_indices(len(e), len(e), offset=1)
    return sim[iu[0], iu[1]].numpy()


def similarity_spearman(student_embeddings: torch.Tensor, teacher_embeddings: torch.Tensor) -> float:
    """Spearman's rho between student and teacher cosine similarities over all sentence pairs ``i < j``."""
    from scipy.stats import spearmanr

    if len(student_embeddings) != len(teacher_embeddings) or len(student_embeddings) < 3:
        raise DataError("similarity_spearman needs the embeddings of the same >= 3 sentences from both models",
                        where="kdistill.encoders.similarity_spearman", fix="encode the same held-out texts")
    rho = spearmanr(pair_cosines(student_embeddings), pair_cosines(teacher_embeddings)).statistic
    return float(rho)


def linear_probe(train_embeddings: torch.Tensor, train_labels: Sequence[int], test_embeddings: torch.Tensor,
                 test_labels: Sequence[int], *, seed: int = 0, cs: Sequence[float] = (0.1, 1.0, 10.0)) -> dict:
    """Logistic-regression probe on frozen embeddings: features standardized (fitted on the training part), the
    inverse regularization ``C`` picked from `cs` by 5-fold cross-validation on the training part, accuracy on
    the test part. Returns ``{"accuracy", "C"}``."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x_train, x_test = train_embeddings.double().numpy(), test_embeddings.double().numpy()
    y_train, y_test = np.asarray(train_labels), np.asarray(test_labels)

    def probe(c: float):
        return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000, random_state=seed))

    scores = {c: float(np.mean(cross_val_score(probe(c), x_train, y_train, cv=5))) for c in cs}
    best = max(cs, key=lambda c: (scores[c], -c))
    model = probe(best).fit(x_train, y_train)
    return {"accuracy": float((model.predict(x_test) == y_test).mean()), "C": best}


@torch.no_grad()
def encode_latency_ms(models: Mapping[str, nn.Module], texts: Sequence[str], tokenizer: Any, *,
                      max_length: int = 128, batch_size: int = 1, repeats: int = 20, warmup: int = 3) -> dict:
    """Median milliseconds to embed `batch_size` sentences (tokenization excluded), per model.

    Each repeat times every model once on the next batch of `texts`, in turn (interleaved), so a load spike on a
    shared machine hits all models alike. Returns ``{name: median ms}``.
    """
    if not texts:
        raise DataError("no texts to time", where="encode_latency_ms", fix="pass held-out sentences")
    batches = []
    for r in range(repeats + warmup):
        chunk = [texts[(r * batch_size + i) % len(texts)] for i in range(batch_size)]
        batches.append(tokenize(chunk, tokenizer, max_length))
    states = {name: m.training for name, m in models.items()}
    times: dict[str, list[float]] = {name: [] for name in models}
    try:
        for m in models.values():
            m.eval()
        for r, enc in enumerate(batches):
            for name, m in models.items():
                t0 = time.perf_counter()
                _embed(m, enc)
                if r >= warmup:
                    times[name].append(time.perf_counter() - t0)
    finally:
        for name, m in models.items():
            m.train(states[name])
    return {name: statistics.median(ts) * 1000 for name, ts in times.items()}
