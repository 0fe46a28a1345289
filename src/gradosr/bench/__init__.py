"""The benchmark harness: every method side by side on the same classifiers
(``gradosr benchmark``), with tables and plots."""

from gradosr.bench.runner import BenchmarkSettings, run_benchmark

__all__ = ["BenchmarkSettings", "run_benchmark"]
