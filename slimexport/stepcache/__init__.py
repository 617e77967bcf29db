"""Calibrated step caching (issue 19): reuse the UNet's deep features across denoising steps.

The UNet is split at a *depth* into a full path, which also returns the feature entering the last ``depth`` up
blocks, and a shallow path (the first ``depth`` down blocks and last ``depth`` up blocks) that takes that feature
from the last full step (``unet``). How fast that feature changes from step to step is measured on the calibration
sampler (``measure``); a plan (``schedule``: a uniform interval, or ``auto``: a threshold on the predicted
accumulated change, mapped by timestep onto any step count) picks the full steps. ``CachedUNet`` (``wrapper``)
runs it inside diffusers' pipelines; ``export`` writes the pair as ONNX and runs engines of it by the plan;
``api.cache_stage`` does all of it for a build. Method and measurements: docs/method-notes.md, "Step caching".
"""

from slimexport.stepcache.schedule import CacheConfig, CachePlan, Schedule, ScheduleCursor, read_schedule
from slimexport.stepcache.unet import SplitUNet, check_depth
from slimexport.stepcache.wrapper import CachedUNet

__all__ = ["CacheConfig", "CachePlan", "CachedUNet", "Schedule", "ScheduleCursor", "SplitUNet", "check_depth",
           "read_schedule"]
