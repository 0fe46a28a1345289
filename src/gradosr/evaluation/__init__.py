"""Evaluation: scoring methods on a protocol split, results records, tables, and the
experiments that run them over splits.

- :mod:`~gradosr.evaluation.scoring`: every method's scores on one split's test and
  validation images (``gradosr evaluate``, ``benchmark`` and ``ablate`` share it);
- :mod:`~gradosr.evaluation.records`: results records, their summary, the results document;
- :mod:`~gradosr.evaluation.tables`: one table renderer (Markdown and text), the CSV;
- :mod:`~gradosr.evaluation.driver`: the per-split loop of every experiment;
- :mod:`~gradosr.evaluation.benchmark`: ``gradosr benchmark``;
- :mod:`~gradosr.evaluation.ablation`: ``gradosr ablate`` (a benchmark of preset variants);
- :mod:`~gradosr.evaluation.run_eval`: ``gradosr evaluate`` on one run folder;
- :mod:`~gradosr.evaluation.plots`: ROC/OSCR curves and score histograms.
"""

from gradosr.evaluation.ablation import AblationSettings, run_ablation
from gradosr.evaluation.benchmark import BenchmarkSettings, run_benchmark
from gradosr.evaluation.driver import ExperimentSettings
from gradosr.evaluation.run_eval import evaluate_run

__all__ = ["AblationSettings", "BenchmarkSettings", "ExperimentSettings", "evaluate_run", "run_ablation",
           "run_benchmark"]
