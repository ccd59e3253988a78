"""Zero-shot and few-shot classifiers over stored tile embeddings.

A classifier is a (classes, d) matrix of L2-normalised class embeddings in the model's joint
space. Text classifiers average a class's prompt embeddings (templates x synonyms, each
normalised) and normalise again; few-shot prototypes average example tile embeddings the
same way. Tiles are scored as ``logits = logit_scale * cosine`` and
``probs = softmax(logits)``, with the model's own logit scale.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

from slide_clip.prompts import PromptSet
from slide_clip.store import model_key


def normalize(x: np.ndarray, axis: int = -1) -> np.ndarray:
    n = np.linalg.norm(x, axis=axis, keepdims=True)
    return x / np.maximum(n, 1e-12)


def text_classifier(encoder, prompts: PromptSet) -> np.ndarray:
    """(classes, d) text classifier: per class, the normalised mean of its normalised prompts."""
    rows = []
    for cls in prompts.classes:
        emb = encoder.encode_texts(prompts.texts(cls))  # already L2-normalised per prompt
        rows.append(normalize(emb.mean(axis=0)))
    return np.stack(rows).astype(np.float32)


def prototypes(features: np.ndarray, labels: list[str], class_names: list[str]) -> np.ndarray:
    """(classes, d) few-shot prototypes: the normalised mean of each class's example embeddings."""
    feats = normalize(np.asarray(features, np.float64))
    labels = np.asarray(labels)
    rows = []
    for c in class_names:
        sel = feats[labels == c]
        if not len(sel):
            raise ValueError(f"class {c!r} has no examples")
        rows.append(normalize(sel.mean(axis=0)))
    return np.stack(rows).astype(np.float32)


def tile_logits(features: np.ndarray, classifier: np.ndarray, logit_scale: float) -> np.ndarray:
    """(n, classes) logits: ``logit_scale * features @ classifier.T`` (cosines for unit vectors)."""
    return (logit_scale * (np.asarray(features, np.float32) @ np.asarray(classifier, np.float32).T)).astype(np.float32)


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    z = logits - np.max(logits, axis=axis, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=axis, keepdims=True)).astype(np.float32)


#: The text side's version in a cached classifier: raised when slide-clip's text encoding of
#: one model changes (2: CONCH's own attention mask for prompts holding ``<pad>``), so a matrix
#: computed by an older slide-clip is computed again.
CLASSIFIER_VERSION = 2


class ClassifierCache:
    """Text classifiers on disk, one per (model weights, prompt set): computed once, reused.

    Files are ``<dir>/<model>/<set>-<prompt hash>-<weights hash>.npz``, keyed by the
    weights' sha256 and the prompt set's hash, so neither a changed prompt nor changed
    weights can reuse a stale matrix; one of another :data:`CLASSIFIER_VERSION` is not used.
    """

    def __init__(self, directory: str | Path):
        from slide_clip.storage.filesystems import upath

        self.dir = upath(directory)  # beside stores at a URL too

    def path(self, model: str, weights_sha256: str, prompts: PromptSet) -> Path:
        return self.dir / model_key(model) / f"{model_key(prompts.name)}-{prompts.hash[:16]}-{weights_sha256[:16]}.npz"

    def get(self, model: str, weights_sha256: str, prompts: PromptSet) -> np.ndarray | None:
        p = self.path(model, weights_sha256, prompts)
        if not p.is_file():
            return None
        with np.load(io.BytesIO(p.read_bytes())) as z:
            meta = json.loads(str(z["meta"]))
            if meta.get("prompt_hash") != prompts.hash or meta.get("weights_sha256") != weights_sha256 \
                    or meta.get("version") != CLASSIFIER_VERSION:
                return None
            return z["classifier"].astype(np.float32)

    def put(self, model: str, weights_sha256: str, prompts: PromptSet, classifier: np.ndarray) -> Path:
        p = self.path(model, weights_sha256, prompts)
        from slide_clip.storage.objects import replace_file

        meta = json.dumps({"model": model, "weights_sha256": weights_sha256, "prompt_set": prompts.name,
                           "prompt_hash": prompts.hash, "classes": prompts.class_names,
                           "version": CLASSIFIER_VERSION})
        with replace_file(p) as tmp, open(tmp, "wb") as f:  # a reader never sees half a file
            np.savez(f, classifier=np.asarray(classifier, np.float32), meta=np.array(meta))
        return p
