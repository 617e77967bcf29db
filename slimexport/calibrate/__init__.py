"""Calibration (method stages A–B): SlimSet prompts, the sampler, hooks that stream fp32 correlations.

``select_prompts(bundle, cfg)`` picks the SlimSet; ``calibrate(bundle, prompts, cfg)`` runs the model's DDIM
sampler with classifier-free guidance under a :class:`StatsCollector` and returns :class:`CalibStats`, an
artifact of its own (safetensors + JSON) that later budgets reuse.
"""

from slimexport.calibrate.api import calibrate, select_prompts
from slimexport.calibrate.collector import StatsCollector
from slimexport.calibrate.stats import CalibStats

__all__ = ["CalibStats", "StatsCollector", "calibrate", "select_prompts"]
