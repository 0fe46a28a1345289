"""Multi-layer Mahalanobis: the feature ensemble of Lee et al., without and with input
perturbation.

Lee, Lee, Lee & Shin, "A Simple Unified Framework for Detecting Out-of-Distribution
Samples and Adversarial Attacks", NeurIPS 2018. For every layer l, the activations
A^l (N×C×H×W) are averaged over H×W into f^l(x) (C; an N×C layer is taken as is); on
the N known training samples, class means μ^l_k and one tied covariance Σ^l give the
confidence score of the layer (:class:`gradosr.detectors.mahalanobis.Mahalanobis`, the
same pseudo-inverse and float64 evaluation),

    M_l(x) = − min_k (f^l(x) − μ^l_k)ᵀ (Σ^l)⁺ (f^l(x) − μ^l_k).

``mahalanobis_pp`` first moves the input, separately per layer, a step ε against the
gradient of the distance to the closest class mean (the paper's input preprocessing),

    x̂_l = x − ε · sign(∇_x min_k (f^l(x) − μ^l_k)ᵀ (Σ^l)⁺ (f^l(x) − μ^l_k)),

and scores M_l(x̂_l). ``mahalanobis_ml`` uses ε = 0.

Ensemble. The paper combines the layers' scores with logistic-regression weights fitted
on validation OOD samples (or adversarial ones). No unknown may be seen while fitting
here, so the ensemble is an equal-weight sum of the layers' scores standardised on the
known training samples (their mean m_l and standard deviation s_l, perturbed like the
queries for ``mahalanobis_ml_pp``):

    score(x) = Σ_l (M_l(x) − m_l) / s_l,    higher = more likely known.

- Layers: the ``stages`` role of :mod:`gradosr.detectors.intermediate`, the paper's
  "end of every block" (ResNet18: the stem and layer1-4, as the paper's ResNet-34
  uses its first convolution and the four stages; CNN32: its three block outputs and
  the penultimate; LeNet: the two convolution ReLUs and the penultimate ReLU; an
  unseen model: the last 4 leaf modules with N×C or N×C×H×W outputs before the head).
- ε = 0.0014 for ``mahalanobis_ml_pp``, fixed: the paper selects ε from
  {0, 0.0005, 0.001, 0.0014, 0.002, 0.005, 0.01} on OOD validation data, which is not
  available here; 0.0014 is in that list and is ODIN's CIFAR value (the project's ODIN
  default). ε is in the units of the model inputs (after the stored normalisation); the
  authors divide the sign by the per-channel std of their normalisation, which here is
  part of the inputs already.

**Fit at scale.** The fit streams (``fit`` on chunks, ``partial_fit``): each chunk's
pooled f^l go into per-layer float64 class moments
(:class:`gradosr.detectors.mahalanobis.ClassMoments`, one pass, bit-identical to a
one-shot fit), in slices of whole batches of about ``ROW_CHUNK`` rows, and the chunk is
then dropped; no N×ΣC matrix of pooled activations and
no copy of the training inputs is formed. The standardisation needs the layer scores of
training rows, which need the fitted Gaussians, so a seeded uniform sample of at most
``standardise_rows`` (default 100,000) training rows is kept for it
(:class:`gradosr.streams.RowReservoir`): their pooled f^l for ``mahalanobis_ml``
(ΣC float64 each), their inputs for ``mahalanobis_ml_pp`` (which perturbs them). With
at most that many training samples, as in every protocol of this project, the sample
is every row and m_l, s_l are exactly those of all training samples;
``params["standardised_on"]`` records the count.

Activations come from forward hooks (and the input gradient of ``_pp`` from one batched
forward and backward per layer and batch, :func:`gradosr.gradients.capture.run`), in
eval mode, in batches of ``batch_size`` inputs.
"""

from __future__ import annotations

import numpy as np
import torch

from gradosr.detectors.base import ROW_CHUNK, Scorer, check_labels
from gradosr.detectors.inputs import ScorerInputs
from gradosr.detectors.intermediate import batched, channel_mean, check_batch_size, layer_pass, model_inputs, select_layers
from gradosr.detectors.mahalanobis import ClassMoments, Mahalanobis
from gradosr.detectors.registry import register
from gradosr.errors import ConfigError, DataError
from gradosr.gradients import capture
from gradosr.streams import RowReservoir


def _pooled(a: torch.Tensor, g) -> torch.Tensor:
    return channel_mean(a).to(device="cpu", dtype=torch.float64)


@register
class MahalanobisML(Scorer):
    method_id = "mahalanobis_ml"
    family = "gradient"
    paper = "Lee, Lee, Lee & Shin, NeurIPS 2018"
    needs = ("model", "inputs")
    needs_fit = True
    _state_tensors = ("means_", "whiten_")
    _state_meta = ("layers_", "dims_", "ranks_", "centre_", "spread_")
    default_epsilon = 0.0

    def __init__(self, epsilon: float | None = None, layers: tuple[str, ...] | None = None,
                 batch_size: int = 256, standardise_rows: int = 100_000) -> None:
        """``epsilon``: the input perturbation (None: the method's default, 0 for
        ``mahalanobis_ml``, 0.0014 for ``mahalanobis_ml_pp``); ``layers``: module names
        (None: the rule of the module docstring); ``standardise_rows``: at most this many
        training rows (a seeded uniform sample) give the layer scores' mean and standard
        deviation (module docstring, "Fit at scale")."""
        eps = self.default_epsilon if epsilon is None else epsilon
        if not eps >= 0:
            raise ConfigError(f"epsilon must be >= 0, got {epsilon!r}")
        self.epsilon, self.eps = epsilon, float(eps)
        self.layers = None if layers is None else tuple(layers)
        self.batch_size = check_batch_size(batch_size)
        if not (isinstance(standardise_rows, int) and standardise_rows >= 2):
            raise ConfigError(f"standardise_rows must be an integer >= 2, got {standardise_rows!r}")
        self.standardise_rows = standardise_rows
        self.params = {"epsilon": self.eps, "covariance": "tied (class-centred, 1/N), per layer",
                       "pooling": "mean over HxW", "ensemble": "equal-weight sum of training-standardised layer scores",
                       "layers": list(self.layers) if self.layers else "stages"}

    # ------------------------------------------------------------ features
    def pooled(self, outputs: ScorerInputs, layers: list[str]) -> dict[str, torch.Tensor]:
        """f^l of the (unperturbed) inputs, float64 N×C_l per layer."""
        parts = batched(outputs, self.batch_size, self.method_id,
                        lambda model, xb: layer_pass(model, xb, layers, "output", _pooled, None, self.method_id))
        return {n: torch.cat([p[n] for p in parts]) if parts else torch.zeros(0, 0, dtype=torch.float64)
                for n in layers}

    def _distance(self, layer: int, f: torch.Tensor) -> torch.Tensor:
        """min_k squared Mahalanobis distance of the rows f (torch, differentiable)."""
        w = torch.as_tensor(self.gauss_[layer].whiten_, dtype=f.dtype, device=f.device)
        c = torch.as_tensor(self.gauss_[layer].centres_, dtype=f.dtype, device=f.device)
        diff = (f @ w)[:, None, :] - c[None, :, :]
        return diff.pow(2).sum(dim=2).min(dim=1).values

    def _perturbed(self, model, xb: torch.Tensor, layer: int) -> torch.Tensor:
        """f^l(x̂_l) of one batch (float64 N×C_l)."""
        name = self.layers_[layer]
        module = dict(model.named_modules())[name]
        seen: dict[str, torch.Tensor] = {}
        hook = module.register_forward_hook(lambda m, i, o: seen.update(a=o))
        grads: list[torch.Tensor] = []
        try:
            capture.run(model, [], xb, lambda z: self._distance(layer, channel_mean(seen["a"]).to(torch.float64)),
                        input_grad=grads)
        finally:
            hook.remove()
        x_hat = xb.detach() - self.eps * torch.sign(grads[0])
        return layer_pass(model, x_hat, [name], "output", _pooled, None, self.method_id)[name]

    def _pooled_scores(self, pooled: list[torch.Tensor]) -> list[np.ndarray]:
        """M_l of the pooled rows f^l (one N×C_l tensor per layer): one float64 N per layer."""
        return [g.score_samples(ScorerInputs(activations={"f": f})) for g, f in zip(self.gauss_, pooled)]

    def layer_scores(self, outputs: ScorerInputs) -> np.ndarray:
        """M_l per layer, N×L (float64), before standardisation."""
        if len(outputs) == 0:
            return np.zeros((0, len(self.layers_)))
        if self.eps == 0:
            f = self.pooled(outputs, self.layers_)
            cols = self._pooled_scores([f[n] for n in self.layers_])
        else:
            def step(model, xb):
                return [(-self._distance(i, self._perturbed(model, xb, i))).numpy() for i in range(len(self.layers_))]

            parts = batched(outputs, self.batch_size, self.method_id, step)
            cols = [np.concatenate([p[i] for p in parts]) if parts else np.zeros(0) for i in range(len(self.layers_))]
        return np.stack(cols, axis=1) if cols else np.zeros((len(outputs), 0))

    # ----------------------------------------------------------------- fit
    def _start_fit(self) -> None:
        self._moments: list[ClassMoments] | None = None
        self._sample = RowReservoir(self.standardise_rows)
        self._model = None

    def _pending(self) -> bool:
        return getattr(self, "_moments", None) is not None and not getattr(self, "fitted_", False)

    def _accumulate(self, chunk: ScorerInputs, labels) -> None:
        """Stream one chunk of known training samples: per layer, its pooled activations
        f^l into the class moments (float64), and a reservoir sample of the rows for
        the training standardisation (module docstring, "Fit at scale")."""
        if getattr(self, "_moments", None) is None:
            self._start_fit()
        model, x = model_inputs(chunk, self.method_id)
        if self._moments is None:
            self.layers_ = list(self.layers) if self.layers else select_layers(model, x, "stages")
            self._moments = [ClassMoments() for _ in self.layers_]
        y, k = check_labels(labels, len(x), chunk)
        step = self.batch_size * max(1, ROW_CHUNK // self.batch_size)  # whole batches
        for start in range(0, len(x), step):
            rows = slice(start, start + step)
            f = self.pooled(chunk.rows(rows), self.layers_)
            for m, name in zip(self._moments, self.layers_):
                m.add(f[name].numpy(), y[rows], k)
            # ε = 0: the layer scores read f^l only, so its rows are sampled; else the inputs
            self._sample.add(torch.cat([f[n] for n in self.layers_], dim=1) if self.eps == 0
                             else x[rows].detach().to("cpu"))
        self._model = model

    def _finalize(self) -> None:
        """Per layer: class means and tied covariance of f^l; then the mean and standard
        deviation of the layer scores of the sampled training rows."""
        if getattr(self, "_moments", None) is None or self._moments[0].flush().n == 0:
            raise DataError(f"{self.method_id}: fit needs at least one training sample")
        self.gauss_ = [Mahalanobis.from_moments(m, source="activations:f") for m in self._moments]
        self.dims_ = [int(g.means_.shape[1]) for g in self.gauss_]
        self.ranks_ = [int(g.rank_) for g in self.gauss_]
        self.means_ = np.concatenate([g.means_ for g in self.gauss_], axis=1)
        whiten = np.zeros((sum(self.dims_), sum(self.ranks_)))
        d0 = r0 = 0
        for g, d, r in zip(self.gauss_, self.dims_, self.ranks_):
            whiten[d0:d0 + d, r0:r0 + r] = g.whiten_
            d0, r0 = d0 + d, r0 + r
        self.whiten_ = whiten
        self._restored()  # the per-layer Gaussians as a loaded scorer has them (bit-identical scores)
        scores = []
        for part in self._sample.parts():  # part by part: the sample is not copied whole
            if self.eps == 0:
                scores.append(np.stack(self._pooled_scores(part.split(self.dims_, dim=1)), axis=1))
            else:
                scores.append(self.layer_scores(ScorerInputs(model=self._model, inputs=part)))
        train = np.concatenate(scores)
        self.centre_ = train.mean(axis=0).tolist()
        spread = train.std(axis=0)
        self.spread_ = np.where(spread > 0, spread, 1.0).tolist()
        self.params = {**self.params, "layers_used": self.layers_, "ranks": self.ranks_,
                       "standardised_on": int(len(train))}
        self._chunks = []  # the moments and the sample stay: a later partial_fit adds to them
        self.fitted_ = True

    def _restored(self) -> None:
        """Rebuild the per-layer Gaussians from the stored blocks."""
        means = np.asarray(self.means_, dtype=np.float64)
        whiten = np.asarray(self.whiten_, dtype=np.float64)
        self.gauss_ = []
        d0 = r0 = 0
        for d, r in zip(self.dims_, self.ranks_):
            g = Mahalanobis(source="activations:f")
            g.means_, g.whiten_ = means[:, d0:d0 + d], whiten[d0:d0 + d, r0:r0 + r]
            g._restored()
            g.fitted_ = True
            self.gauss_.append(g)
            d0, r0 = d0 + d, r0 + r
        self.params = {**self.params, "layers_used": list(self.layers_), "ranks": list(self.ranks_)}

    def score_samples(self, outputs: ScorerInputs) -> np.ndarray:
        """Σ_l (M_l − m_l) / s_l -> N (float64), higher = more likely known."""
        self.check_fitted()
        s = self.layer_scores(outputs)
        if s.shape[1] != len(self.centre_):
            raise DataError(f"{self.method_id}: {s.shape[1]} layer scores for {len(self.centre_)} fitted layers")
        return ((s - np.asarray(self.centre_)) / np.asarray(self.spread_)).sum(axis=1)


@register
class MahalanobisMLPP(MahalanobisML):
    method_id = "mahalanobis_ml_pp"
    default_epsilon = 0.0014
