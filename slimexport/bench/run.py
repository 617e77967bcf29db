"""The ``bench`` stage: a build's dense and slim engines timed in one process (``build`` and ``bench DIR`` alike)."""

from __future__ import annotations

from slimexport.bench.timing import compare_speed
from slimexport.engines.base import make_feeds
from slimexport.engines.torch_runner import device_name


def run_bench(cfg, engines: dict, profile) -> dict:
    """Time ``engines["dense"]`` and ``engines["slim"]`` on the same random feeds.

    Args:
        cfg: the ``BuildConfig`` (``cfg.bench``: iterations or the time budget, warmup, shapes; ``cfg.export.dtype``).
        engines: the dense and slim engines; profile: their ``EngineProfile`` (its optimal shapes by default).

    Returns:
        :func:`compare_speed`'s result with the iterations, dtype and device name added.
    """
    device = engines["dense"].device
    b = cfg.bench
    iters = b.iterations or (100 if device.startswith("cuda") else 20)  # with no --iterations: the least, then by budget
    feeds = make_feeds(engines["dense"].io_spec, b.batch or profile.opt_batch, b.height or profile.opt_height,
                       b.width or profile.opt_width, seed=0)
    res = compare_speed(engines["dense"], engines["slim"], feeds, warmup=b.warmup, iterations=iters,
                        target_ci=None if b.iterations else b.target_ci, max_seconds=b.max_seconds)
    res["dtype"] = cfg.export.dtype  # what both engines ran in (an fp16 CPU engine is refused before the build)
    res["device_name"] = device_name(device)
    return res
