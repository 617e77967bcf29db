"""The ``bench`` stage: a build's dense and slim engines timed in one process (``build`` and ``bench DIR`` alike)."""

from __future__ import annotations

from slimexport.bench.timing import compare_speed
from slimexport.engines.base import make_feeds
from slimexport.engines.torch_runner import device_name


def run_bench(cfg, engines: dict, profile) -> dict:
    """Time ``engines["dense"]`` and ``engines["slim"]`` on the same random feeds.

    Args:
        cfg: the ``BuildConfig`` (``cfg.bench``: iterations, warmup, shapes; ``cfg.export.dtype``).
        engines: the dense and slim engines; profile: their ``EngineProfile`` (its optimal shapes by default).

    Returns:
        :func:`compare_speed`'s result with the iterations, dtype and device name added.
    """
    device = engines["dense"].device
    iters = cfg.bench.iterations or (100 if device.startswith("cuda") else 20)
    feeds = make_feeds(engines["dense"].io_spec, cfg.bench.batch or profile.opt_batch, cfg.bench.height or profile.opt_height,
                       cfg.bench.width or profile.opt_width, seed=0)
    res = compare_speed(engines["dense"], engines["slim"], feeds, warmup=cfg.bench.warmup, iterations=iters)
    res["iterations"] = iters
    res["dtype"] = cfg.export.dtype  # what both engines ran in (an fp16 CPU engine is refused before the build)
    res["device_name"] = device_name(device)
    return res
