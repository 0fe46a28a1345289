"""Score fusion: the unknown detector of the ``plus`` preset.

The ``paper`` preset (Lee & AlRegib, ICIP 2021) learns an MLP on the gradient
representations of a *proxy* classifier and applies it to the final classifier's. The
``plus`` preset instead models the *final* classifier's known training samples directly
(one-class, as kNN does: Sun et al., "Out-of-Distribution Detection with Deep Nearest
Neighbors", ICML 2022) and adds up several standardised signals:

- ``gradient``: kNN in gradient space. With ``gradient_rep="head"`` the representation is
  the full per-sample gradient of the confounding-label loss with respect to the head's
  weight, dJ/dW = g hᵀ (g = dJ/dz, K; h the head input, D), L2-normalised. Its cosine
  similarity factorises, cos(g₁h₁ᵀ, g₂h₂ᵀ) = cos(g₁, g₂)·cos(h₁, h₂), so the K×D gradient
  is never materialised. ``gradient_rep="norms"`` uses the log per-parameter squared
  gradient norms of the paper's Eq. 1 instead, standardised with held-out known
  statistics, with Euclidean kNN. ``gradient_rep="projection"`` uses a random projection
  of the full per-sample gradient of every Linear/Conv weight of the classifier
  (LoGra's Kronecker-factored projection, Choe et al. 2024; after TRAK, Park et al.,
  ICML 2023; see :mod:`gradosr.gradients.projection`), ``projection_dim`` per side of
  each layer, with cosine kNN: it reaches the layers below the head. With
  ``gradient_metric="mahalanobis"`` (``norms`` or ``projection``) the gradient signal is
  instead minus the Mahalanobis distance to the nearest class mean of the known
  training gradients under their tied covariance (Lee et al., NeurIPS 2018, applied in
  gradient space: the class-centred second moment of per-sample gradients is a centred
  empirical Fisher information), :class:`gradosr.detectors.mahalanobis.Mahalanobis`.
- ``features``: kNN on L2-normalised penultimate features (Sun et al., 2022);
- ``max_logit``: the maximum logit (Vaze et al., ICLR 2022);
- ``gradnorm``: log ‖dJ/dW‖₁ of the head under the uniform target (Huang et al.,
  NeurIPS 2021; higher = known), for ablations;
- ``gradorth``: log ‖dJ/dW S Sᵀ‖_F of the head under the uniform target, S (D×r) the
  top right-singular vectors of the known training features holding ``GRADORTH_ENERGY``
  of their energy: the norm of the gradient's projection on the known data's important
  subspace, = ‖g‖₂ ‖Sᵀh‖₂ (GradOrth, Behpour et al., NeurIPS 2023; higher = known).

Each signal's raw score s (higher = known) is standardised with the mean and standard
deviation of its scores on held-out known samples (the validation split, never
unknowns), and the detector score is the sum of the standardised signals
(``combine="sum"``). With ``combine="fisher"`` each signal gives instead an empirical
p-value against the held-out knowns, p = (#{held-out scores <= s} + 1) / (n + 1), and
the score is Fisher's combination Σ log p (Fisher, 1925; as in Haroush et al., "A
Statistical Framework for Efficient Out of Distribution Detection in Deep Neural
Networks", ICLR 2022): one signal far in its tail weighs more than in a sum of z-scores. kNN uses the
k-th nearest training sample, k = min(``k``, the smallest class's training count).

Inputs are "views" of N samples (float64 tensors): ``logits`` N×K, ``features`` N×D,
``g`` N×K (the logit gradient of the configured target), ``g_uniform`` N×K (the
uniform target's, for ``gradnorm``/``gradorth``) and, for ``gradient_rep="norms"``,
``norms`` N×P, for ``gradient_rep="projection"``, ``gproj`` N×P.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from gradosr.errors import CheckpointError, ConfigError, DataError
from gradosr.gradients.targets import per_sample_loss

SIGNALS = ("gradient", "features", "max_logit", "gradnorm", "gradorth")
GRADIENT_REPS = ("head", "norms", "projection")
COMBINES = ("sum", "fisher")
GRADIENT_METRICS = ("knn", "mahalanobis")
#: fraction of the known training features' energy (sum of squared singular values)
#: kept in GradOrth's subspace; fixed a priori (GradOrth keeps an energy fraction too)
GRADORTH_ENERGY = 0.97
_EPS = 1e-12


@dataclass(frozen=True)
class FusionConfig:
    """Which signals are combined and how (sum of z-scores or Fisher's combination of
    p-values, see the module docstring), the gradient representation, the largest k of
    the kNN signals and the per-side dimension of the projected gradients
    (``gradient_rep="projection"``)."""

    signals: tuple[str, ...] = ("gradient", "features", "max_logit")
    gradient_rep: str = "head"
    k: int = 50
    projection_dim: int = 16
    combine: str = "sum"
    gradient_metric: str = "knn"

    def __post_init__(self) -> None:
        object.__setattr__(self, "signals", tuple(self.signals))
        bad = [s for s in self.signals if s not in SIGNALS]
        if bad or not self.signals or len(set(self.signals)) != len(self.signals):
            raise ConfigError(f"signals must be distinct names among {SIGNALS}, got {list(self.signals)}")
        if self.gradient_rep not in GRADIENT_REPS:
            raise ConfigError(f"gradient_rep must be one of {GRADIENT_REPS}, got {self.gradient_rep!r}")
        if isinstance(self.k, bool) or int(self.k) != self.k or self.k < 1:
            raise ConfigError(f"k must be a positive integer, got {self.k!r}")
        if self.gradient_metric not in GRADIENT_METRICS:
            raise ConfigError(f"gradient_metric must be one of {GRADIENT_METRICS}, got {self.gradient_metric!r}")
        if self.gradient_metric == "mahalanobis" and self.gradient_rep == "head":
            raise ConfigError("gradient_metric mahalanobis needs gradient_rep norms or projection")
        if self.combine not in COMBINES:
            raise ConfigError(f"combine must be one of {COMBINES}, got {self.combine!r}")
        if isinstance(self.projection_dim, bool) or int(self.projection_dim) != self.projection_dim \
                or self.projection_dim < 1:
            raise ConfigError(f"projection_dim must be a positive integer, got {self.projection_dim!r}")


def logit_gradient(logits: torch.Tensor, target: str = "confounding", n_ones: int | None = None,
                   output: str = "softmax") -> torch.Tensor:
    """g = dJ/dz (float64 N×K) of the per-sample loss J of ``target`` at logits N×K.

    The head's weight gradient of a sample is g hᵀ (exact: z = W h + b)."""
    z = torch.as_tensor(logits).detach().to(torch.float64).requires_grad_(True)
    if len(z) == 0:
        return torch.zeros_like(z, requires_grad=False)
    (g,) = torch.autograd.grad(per_sample_loss(z, target=target, n_ones=n_ones, output=output).sum(), z)
    return g


def _unit(x: torch.Tensor) -> torch.Tensor:
    x = torch.as_tensor(x).to(torch.float64)
    return x / x.norm(dim=1, keepdim=True).clamp_min(_EPS)


def kth_neighbour_distance(query: list[torch.Tensor], bank: list[torch.Tensor], k: int,
                           euclidean: bool = False, chunk_size: int | None = None) -> torch.Tensor:
    """Distance (float64 N) of each query to its k-th nearest bank row.

    ``query``/``bank``: lists of factors (N×d_i / M×d_i). Cosine mode (default): every
    factor is L2-normalised, the similarity is the product of the factors' cosines (the
    cosine of their outer product) and the distance sqrt(2 − 2 sim). Euclidean mode: one
    factor, plain Euclidean distance. Exact; chunking does not change the result."""
    m = len(bank[0])
    if m < k:
        raise DataError(f"kNN needs at least k={k} training samples, got {m}")
    n = len(query[0])
    out = torch.empty(n, dtype=torch.float64)
    chunk = chunk_size or max(1, (1 << 22) // max(1, m))
    for start in range(0, n, chunk):
        if euclidean:
            d = torch.cdist(query[0][start:start + chunk], bank[0])
        else:
            sim = None
            for q, b in zip(query, bank):
                s = q[start:start + chunk] @ b.T
                sim = s if sim is None else sim * s
            d = (2.0 - 2.0 * sim).clamp_min(0.0).sqrt()
        out[start:start + chunk] = torch.topk(d, k, dim=1, largest=False, sorted=True).values[:, -1]
    return out


def important_subspace(features: torch.Tensor, energy: float = GRADORTH_ENERGY) -> torch.Tensor:
    """GradOrth's subspace (Behpour et al., NeurIPS 2023): the top right-singular vectors
    (D×r, float64) of the N×D representation matrix, r the fewest holding ``energy`` of
    the sum of squared singular values."""
    x = torch.as_tensor(features).to(torch.float64)
    _, sv, vh = torch.linalg.svd(x, full_matrices=False)
    share = torch.cumsum(sv.square(), 0) / sv.square().sum().clamp_min(_EPS)
    r = int(torch.searchsorted(share, torch.tensor(energy, dtype=torch.float64)).item()) + 1
    return vh[:min(r, len(sv))].T.contiguous()


class FusionDetector:
    """Combined one-class signals of the final classifier (``plus`` preset): the sum of
    their z-scores or Fisher's combination of their p-values on held-out knowns.

    ``fit(train, labels, val)``: views of known training samples (labels 0..K-1) and of
    held-out knowns; ``score_samples(views)``: float64 N, higher = more likely known;
    ``signal_scores(views)``: the raw score of every signal (dict of float64 N).
    """

    def __init__(self, config: FusionConfig | None = None):
        self.config = config or FusionConfig()
        self.banks: dict[str, list[torch.Tensor]] = {}
        self.stats: dict[str, tuple[float, float]] = {}
        #: sorted held-out known scores of every signal (``combine="fisher"``)
        self.calibration: dict[str, torch.Tensor] = {}
        self.mahalanobis_ = None  # gradient_metric="mahalanobis": a fitted Mahalanobis scorer
        self.k_: int | None = None

    # ------------------------------------------------------------------ views
    def _factors(self, signal: str, views: dict) -> list[torch.Tensor]:
        if signal == "features":
            return [_unit(views["features"])]
        if self.config.gradient_rep == "head":
            return [_unit(views["g"]), _unit(views["features"])]
        if self.config.gradient_rep == "projection":
            return [_unit(views["gproj"])]
        return [torch.as_tensor(views["norms"]).to(torch.float64)]

    def _raw(self, signal: str, views: dict) -> torch.Tensor:
        if signal == "max_logit":
            return torch.as_tensor(views["logits"]).to(torch.float64).max(dim=1).values
        if signal == "gradnorm":
            g = torch.as_tensor(views["g_uniform"]).to(torch.float64)
            h = torch.as_tensor(views["features"]).to(torch.float64)
            # GradNorm: ‖g hᵀ‖₁ = ‖g‖₁ ‖h‖₁ (higher = known), on a log scale
            return torch.log((g.abs().sum(1) * h.abs().sum(1)).clamp_min(1e-300))
        if signal == "gradorth":
            g = torch.as_tensor(views["g_uniform"]).to(torch.float64)
            h = torch.as_tensor(views["features"]).to(torch.float64)
            return torch.log((g.norm(dim=1) * (h @ self.banks["gradorth"][0]).norm(dim=1)).clamp_min(1e-300))
        if signal == "gradient" and self.config.gradient_metric == "mahalanobis":
            return torch.as_tensor(self.mahalanobis_.score_samples(self._gradient_outputs(views)))
        euclid = signal == "gradient" and self.config.gradient_rep == "norms"
        return -kth_neighbour_distance(self._factors(signal, views), self.banks[signal], self.k_, euclidean=euclid)

    def _gradient_outputs(self, views: dict):
        from gradosr.detectors.base import ClassifierOutputs

        rep = views["norms"] if self.config.gradient_rep == "norms" else views["gproj"]
        return ClassifierOutputs(torch.as_tensor(views["logits"]), torch.as_tensor(rep).to(torch.float64))

    # -------------------------------------------------------------- fit/score
    def fit(self, train: dict, labels: np.ndarray, val: dict) -> "FusionDetector":
        y = np.asarray(labels, dtype=np.int64)
        k_classes = int(torch.as_tensor(train["logits"]).shape[1])
        counts = np.bincount(y, minlength=k_classes)
        if counts.min() < 1:
            raise DataError(f"known classes {np.flatnonzero(counts == 0).tolist()} have no training samples")
        if len(torch.as_tensor(val["logits"])) < 2:
            raise DataError("the fused detector needs at least 2 held-out known samples")
        self.k_ = int(min(self.config.k, counts.min()))
        mahalanobis = self.config.gradient_metric == "mahalanobis" and "gradient" in self.config.signals
        self.banks = {s: self._factors(s, train) for s in self.config.signals
                      if s == "features" or (s == "gradient" and not mahalanobis)}
        if mahalanobis:
            from gradosr.detectors.mahalanobis import Mahalanobis

            self.mahalanobis_ = Mahalanobis().fit(self._gradient_outputs(train), y)
        if "gradorth" in self.config.signals:
            self.banks["gradorth"] = [important_subspace(torch.as_tensor(train["features"]))]
        self.stats = {}
        for s in self.config.signals:
            v = self._raw(s, val)
            if not torch.isfinite(v).all():
                raise DataError(f"the {s} signal of the held-out knowns is not finite")
            self.stats[s] = (float(v.mean()), max(float(v.std(unbiased=False)), _EPS))
            if self.config.combine == "fisher":
                self.calibration[s] = torch.sort(v).values.contiguous()
        return self

    def signal_scores(self, views: dict) -> dict[str, np.ndarray]:
        if self.k_ is None:
            raise ConfigError("the fused detector is not fitted")
        return {s: self._raw(s, views).numpy() for s in self.config.signals}

    def score_samples(self, views: dict) -> np.ndarray:
        raw = self.signal_scores(views)
        n = len(torch.as_tensor(views["logits"]))
        total = np.zeros(n)
        for s, r in raw.items():
            if self.config.combine == "fisher":
                calib = self.calibration[s].numpy()
                total += np.log((np.searchsorted(calib, r, side="right") + 1) / (len(calib) + 1))
            else:
                mean, std = self.stats[s]
                total += (r - mean) / std
        return total

    # ------------------------------------------------------------ persistence
    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        if self.k_ is None:
            raise ConfigError("the fused detector is not fitted")
        tensors = {f"bank.{s}.{i}": t.contiguous() for s, parts in self.banks.items() for i, t in enumerate(parts)}
        tensors.update({f"calibration.{s}": t for s, t in self.calibration.items()})
        if self.mahalanobis_ is not None:
            tensors["mahalanobis.means"] = torch.as_tensor(self.mahalanobis_.means_)
            tensors["mahalanobis.whiten"] = torch.as_tensor(self.mahalanobis_.whiten_)
        meta = {"kind": "fusion", "config": {**asdict(self.config), "signals": list(self.config.signals)},
                "k": self.k_, "stats": {s: list(v) for s, v in self.stats.items()}}
        return tensors, meta

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict) -> "FusionDetector":
        try:
            det = cls(FusionConfig(**meta["config"]))
            det.k_ = int(meta["k"])
            det.stats = {s: (float(v[0]), float(v[1])) for s, v in meta["stats"].items()}
            if det.config.gradient_metric == "mahalanobis" and "gradient" in det.config.signals:
                from gradosr.detectors.mahalanobis import Mahalanobis

                det.mahalanobis_ = Mahalanobis.from_state(tensors["mahalanobis.means"].to(torch.float64).numpy(),
                                                          tensors["mahalanobis.whiten"].to(torch.float64).numpy())
            for s in det.config.signals:
                if s in ("features", "gradorth") or (s == "gradient" and det.mahalanobis_ is None):
                    n_parts = 2 if (s == "gradient" and det.config.gradient_rep == "head") else 1
                    det.banks[s] = [tensors[f"bank.{s}.{i}"].to(torch.float64) for i in range(n_parts)]
                if s not in det.stats:
                    raise KeyError(f"stats of {s}")
                if det.config.combine == "fisher":
                    det.calibration[s] = tensors[f"calibration.{s}"].to(torch.float64)
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise CheckpointError(f"the fused detector's files are incomplete: {exc}") from None
        return det
