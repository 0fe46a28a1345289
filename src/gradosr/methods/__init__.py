"""The method layer of :class:`gradosr.osr.GradientOSR`.

- :mod:`~gradosr.methods.config`: OSRConfig, the presets, option names;
- :mod:`~gradosr.methods.base`: the strategy interface and registry, FitContext, FitData;
- :mod:`~gradosr.methods.proxy`: the paper's proxy-split MLP (``method="proxy"``);
- :mod:`~gradosr.methods.fused`: the ``plus`` preset's fused detector (``method="fusion"``);
- :mod:`~gradosr.methods.proxy_store`: the proxy classifiers, trained once;
- :mod:`~gradosr.methods.splits`, :mod:`~gradosr.methods.detector_inputs`,
  :mod:`~gradosr.methods.fit_data`: proxy splits, gradient features, fit inputs;
- :mod:`~gradosr.methods.persistence`: the run folder's method files.
"""

from gradosr.methods import fused, proxy  # noqa: F401  (importing them registers the strategies)
from gradosr.methods.base import STRATEGIES, FitContext, FitData
from gradosr.methods.config import DEFAULT_PRESET, PRESETS, OSRConfig, config_options, make_config
from gradosr.methods.proxy_store import ProxyStore

__all__ = ["STRATEGIES", "FitContext", "FitData", "DEFAULT_PRESET", "PRESETS", "OSRConfig", "config_options",
           "make_config", "ProxyStore"]
