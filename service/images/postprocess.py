"""Model outputs → what clients get: top-k labels with softmax scores, embedding vectors."""

from __future__ import annotations

import base64
from collections.abc import Sequence

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - np.max(logits))
    return shifted / np.sum(shifted)


def top_k(logits: np.ndarray, k: int, labels: Sequence[str]) -> list[dict[str, object]]:
    """The k most likely classes, highest first (ties: lower index first)."""
    probabilities = softmax(logits.astype(np.float64))
    k = min(k, probabilities.shape[0])
    candidates = np.argpartition(-probabilities, k - 1)[:k]
    order = candidates[np.lexsort((candidates, -probabilities[candidates]))]
    return [
        {"index": int(index), "label": labels[index], "score": float(probabilities[index])}
        for index in order
    ]


def embedding(vector: np.ndarray, normalize: bool) -> np.ndarray:
    if not normalize:
        return vector
    norm = float(np.linalg.norm(vector))
    return vector / norm if norm > 0 else vector


def to_base64(vector: np.ndarray) -> str:
    """Little-endian float32 bytes, base64: 4 bytes a value instead of ~10 as JSON text."""
    return base64.b64encode(vector.astype("<f4", copy=False).tobytes()).decode("ascii")
