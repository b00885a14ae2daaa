"""The SKU gallery: reference embeddings per SKU, searched with faiss, versioned separately from weights.

Packaging variants are references of their canonical SKU, so a promo pack votes for the product it is.
Scores are turned into probabilities by a temperature fitted on held-out queries; the distance to the
nearest reference is the novelty score that lets the recognizer say "unknown product".

An SKU's score is its nearest reference's similarity (`nearest`), or (`blend`) half that and half the
similarity to a weight vector per SKU fitted over the gallery with every SKU weighted alike: a new SKU with
five references then competes on equal terms with a trained look-alike that has fifty, instead of losing
its queries to it (docs/measurements.md, Recognizer 12-05 (13)).
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from models.errors import BundleError, GalleryMismatch

NEIGHBOURS = 64  # references retrieved per query before grouping by SKU
SCORING = ("nearest", "blend")
BLEND_SCALE = 12.0  # softmax scale of the SKU weights' fit: chosen on Grocery train photos alone (8-16)


@dataclass(frozen=True)
class Classification:
    sku_id: np.ndarray  # (N,) object: canonical SKU, or None when unknown
    probability: np.ndarray  # (N,) calibrated probability of the top SKU
    margin: np.ndarray  # (N,) top-1 minus top-2 probability
    novelty: np.ndarray  # (N,) 1 - cosine similarity to the nearest reference
    candidates: tuple[tuple[tuple[str, float], ...], ...]  # per query: top-k (sku_id, probability)
    embedding: np.ndarray
    top_sku: np.ndarray = field(default=None)  # type: ignore[assignment]  # top SKU even when unknown


@dataclass
class Gallery:
    embeddings: np.ndarray  # (M, D) float32, L2-normalised
    sku_ids: list[str]  # canonical SKU of each reference
    variant_ids: list[str]
    embedding_model: str  # fingerprint of the network that made the embeddings
    version: str = "0"
    temperature: float = 0.05
    unknown_threshold: float = 1.0  # novelty above this -> unknown product (1.0 never triggers)
    scoring: str = "nearest"  # one of SCORING
    sku_weights: np.ndarray | None = None  # (len(skus), D) for `blend`: fitted here when not given
    _index: object = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.embeddings = np.ascontiguousarray(self.embeddings, dtype=np.float32)
        if self.embeddings.ndim != 2 or len(self.embeddings) != len(self.sku_ids) != len(self.variant_ids):
            raise BundleError("gallery embeddings and labels disagree in length")
        if not len(self.sku_ids):
            raise BundleError("a gallery needs at least one reference")
        import faiss

        self._index = faiss.IndexFlatIP(self.embeddings.shape[1])
        self._index.add(self.embeddings)
        self._skus = np.asarray(self.sku_ids, dtype=object)
        if self.scoring not in SCORING:
            raise BundleError(f"unknown gallery scoring {self.scoring!r}; choose one of {', '.join(SCORING)}")
        if self.scoring == "blend":
            if self.sku_weights is None:
                self.sku_weights = fit_sku_weights(self.embeddings, self.sku_ids)
            self.sku_weights = np.ascontiguousarray(self.sku_weights, dtype=np.float32)
            if self.sku_weights.shape != (len(self.skus), self.embeddings.shape[1]):
                raise BundleError(
                    f"gallery {self.version}: SKU weights of shape {self.sku_weights.shape} do not fit "
                    f"{len(self.skus)} SKUs of {self.embeddings.shape[1]}-d embeddings"
                )
            self._weight_row = {s: i for i, s in enumerate(self.skus)}

    @property
    def skus(self) -> list[str]:
        return sorted(set(self.sku_ids))

    def check_compatible(self, embedding_model: str) -> None:
        if embedding_model != self.embedding_model:
            raise GalleryMismatch(
                f"gallery {self.version} was built with embedding model {self.embedding_model}, "
                f"but the loaded recognizer is {embedding_model}: rebuild the gallery for this model"
            )

    def sku_scores(self, queries: np.ndarray, k: int) -> tuple[list[list[tuple[str, float]]], np.ndarray]:
        """Per query: SKUs ranked by their best reference similarity (top k), and the nearest similarity."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self.embeddings.shape[1]:
            raise GalleryMismatch(
                f"query embeddings of shape {q.shape} do not fit a {self.embeddings.shape[1]}-d gallery"
            )
        sims, idx = self._index.search(q, min(NEIGHBOURS, len(self.sku_ids)))
        to_weights = q @ self.sku_weights.T if self.scoring == "blend" else None
        ranked = []
        for n, (srow, irow) in enumerate(zip(sims, idx, strict=True)):
            best: dict[str, float] = {}
            for s, i in zip(srow, irow, strict=True):
                if i >= 0:
                    sku = self._skus[i]
                    if s > best.get(sku, -2.0):
                        best[sku] = float(s)
            if to_weights is not None:
                weights = to_weights[n]
                best = {sku: 0.5 * (s + float(weights[self._weight_row[sku]])) for sku, s in best.items()}
            ranked.append(sorted(best.items(), key=lambda kv: -kv[1])[:k])
        return ranked, sims[:, 0]

    def classify(self, queries: np.ndarray, k: int = 5) -> Classification:
        n = len(queries)
        ranked, nearest = self.sku_scores(queries, max(k, 2)) if n else ([], np.zeros(0))
        sku = np.full(n, None, dtype=object)
        top = np.full(n, None, dtype=object)
        prob = np.zeros(n, np.float32)
        margin = np.zeros(n, np.float32)
        cands = []
        for i, row in enumerate(ranked):
            s = np.array([v for _, v in row], np.float64)
            p = np.exp((s - s.max()) / self.temperature)
            p /= p.sum()
            cands.append(tuple((name, float(pp)) for (name, _), pp in zip(row[:k], p[:k], strict=True)))
            top[i] = row[0][0]
            prob[i] = p[0]
            margin[i] = p[0] - (p[1] if len(p) > 1 else 0.0)
        novelty = (1.0 - np.asarray(nearest, np.float32)).clip(0, 2)
        known = novelty <= self.unknown_threshold
        sku[known] = top[known]
        return Classification(sku, prob, margin, novelty, tuple(cands), np.asarray(queries, np.float32), top)

    # --- persistence: a gallery is a directory that models.bundle signs and verifies -------------------

    def save(self, directory: Path, extra_manifest: dict | None = None) -> dict:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        np.save(directory / "embeddings.npy", self.embeddings.astype(np.float16))
        if self.scoring == "blend":  # the rule, not a stray array, decides what the signed gallery holds
            np.save(directory / "sku_weights.npy", self.sku_weights)
        (directory / "references.json").write_text(
            json.dumps(
                [{"sku_id": s, "variant_id": v} for s, v in zip(self.sku_ids, self.variant_ids, strict=True)]
            )
            + "\n"
        )
        return {
            "kind": "gallery",
            "version": self.version,
            "embedding_model": self.embedding_model,
            "dim": int(self.embeddings.shape[1]),
            "references": len(self.sku_ids),
            "skus": len(self.skus),
            "temperature": self.temperature,
            "unknown_threshold": self.unknown_threshold,
            "scoring": self.scoring,
            **(extra_manifest or {}),
        }

    @classmethod
    def from_directory(cls, directory: Path, manifest: dict) -> Gallery:
        directory = Path(directory)
        if manifest.get("kind") != "gallery":
            raise BundleError(f"{directory} is a {manifest.get('kind')!r} bundle, not a gallery")
        scoring = manifest.get("scoring", "nearest")  # galleries before 2026-12-05 name none
        try:
            emb = np.load(directory / "embeddings.npy", allow_pickle=False).astype(np.float32)
            refs = json.loads((directory / "references.json").read_text())
            weights = (
                np.load(directory / "sku_weights.npy", allow_pickle=False) if scoring == "blend" else None
            )
        except (OSError, ValueError) as exc:
            raise BundleError(f"gallery {directory} is unreadable: {exc}") from exc
        emb /= np.linalg.norm(emb, axis=1, keepdims=True).clip(1e-12)
        return cls(
            emb,
            [r["sku_id"] for r in refs],
            [r["variant_id"] for r in refs],
            manifest["embedding_model"],
            str(manifest["version"]),
            float(manifest["temperature"]),
            float(manifest["unknown_threshold"]),
            scoring,
            weights,
        )


def fit_sku_weights(
    embeddings: np.ndarray, sku_ids: list[str], scale: float = BLEND_SCALE, steps: int = 300
) -> np.ndarray:
    """One unit vector per SKU (in `sorted(set(sku_ids))` order), a cosine softmax classifier over the
    references in which each SKU weighs the same whatever its reference count. Starts at the SKUs' mean
    references; full-batch Adam, a second or so for a few thousand references."""
    skus = sorted(set(sku_ids))
    row = {s: i for i, s in enumerate(skus)}
    y = np.array([row[s] for s in sku_ids])
    x = np.asarray(embeddings, np.float32)
    counts = np.bincount(y, minlength=len(skus)).astype(np.float32)
    weight = (1.0 / counts[y]) / len(skus)  # per reference; sums to 1 over the gallery
    w = np.zeros((len(skus), x.shape[1]), np.float32)
    np.add.at(w, y, x)
    w /= np.linalg.norm(w, axis=1, keepdims=True).clip(1e-12)  # unit rows: Adam's step is a turn of them
    m, v = np.zeros_like(w), np.zeros_like(w)
    lr, b1, b2 = 0.01, 0.9, 0.999
    for step in range(1, steps + 1):
        norm = np.linalg.norm(w, axis=1, keepdims=True).clip(1e-12)
        unit = w / norm
        logits = scale * (x @ unit.T)
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        p[np.arange(len(y)), y] -= 1.0
        g_unit = scale * (p * weight[:, None]).T @ x
        g = (g_unit - (g_unit * unit).sum(1, keepdims=True) * unit) / norm  # through the normalisation
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        w -= lr * (m / (1 - b1**step)) / (np.sqrt(v / (1 - b2**step)) + 1e-8)
    return w / np.linalg.norm(w, axis=1, keepdims=True).clip(1e-12)


def fit_temperature(ranked: list[list[tuple[str, float]]], truth: list[str]) -> float:
    """Temperature that minimises the negative log-likelihood of the true SKU on held-out queries."""
    grid = np.exp(np.linspace(np.log(0.005), np.log(1.0), 80))
    best_t, best_nll = float(grid[0]), np.inf
    for t in grid:
        nll = 0.0
        for row, y in zip(ranked, truth, strict=True):
            s = np.array([v for _, v in row], np.float64)
            logp = (s - s.max()) / t
            logp -= np.log(np.exp(logp).sum())
            names = [n for n, _ in row]
            # A true SKU outside the retrieved top-k gets the probability floor of the smallest one.
            nll -= logp[names.index(y)] if y in names else logp.min() - 2.0
        if nll < best_nll:
            best_t, best_nll = float(t), nll
    return best_t


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = 15) -> float:
    """ECE with equal-width confidence bins."""
    confidence, correct = np.asarray(confidence, np.float64), np.asarray(correct, np.float64)
    edges = np.linspace(0, 1, bins + 1)
    ece = 0.0
    for lo, hi in itertools.pairwise(edges):
        m = (confidence > lo) & (confidence <= hi)
        if m.any():
            ece += m.mean() * abs(confidence[m].mean() - correct[m].mean())
    return float(ece)
