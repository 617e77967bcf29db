"""The per-image benchmark's timing helpers and the digits harness's verdicts (no exports, no sampling of SD)."""

from __future__ import annotations

import numpy as np
import torch

from slimexport.harness.stepcache_quality import target_check, write_report
from slimexport.stepcache import CacheConfig, CachePlan
from slimexport.stepcache.bench import time_calls, time_images
from slimexport.stepcache.export import CACHE, CachedEngineUNet, EngineUNet


class _Engine:
    """An engine stub: latent = 0.1 × sample (+ the cache's mean on the shallow path), counting its calls."""

    def __init__(self, shallow=False):
        self.shallow, self.calls = shallow, 0
        outs = [{"name": "latent"}] + ([] if shallow else [{"name": CACHE}])
        self.io_spec = {"inputs": [], "outputs": outs}

    def run(self, feeds):
        self.calls += 1
        out = {"latent": 0.1 * feeds["sample"]}
        if self.shallow:
            out["latent"] = out["latent"] + feeds[CACHE].mean()
        else:
            out[CACHE] = np.ones((1,), dtype="float32")
        return out


def test_time_images_runs_every_variant_on_the_same_start(tiny):
    full, shallow = _Engine(), _Engine(shallow=True)
    variants = {"dense": EngineUNet(full), "cached": CachedEngineUNet(full, shallow, CachePlan(CacheConfig(mode=2)))}
    cond = torch.zeros(1, 77, 32)
    lat = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    res = time_images(variants, tiny, cond, cond, lat, [4, 6], guidance=5.0, rounds=2)
    assert set(res) == {4, 6}
    assert res[6]["cached"]["pattern"] == "FsFsFs" and res[6]["dense"]["pattern"] is None
    assert len(res[4]["dense"]["seconds"]) == 2 and res[4]["dense"]["final_rel_to_first"] == 0
    assert res[4]["cached"]["final_rel_to_first"] > 0  # the shallow stub adds the cache's mean
    assert shallow.calls == 2 * (2 + 3)  # rounds × shallow steps at 4 and 6 steps


def test_time_calls_interleaves():
    a, b = _Engine(), _Engine(shallow=True)
    feeds = {"x": {"sample": np.zeros((2, 4, 8, 8), "float32")},
             "c": {"sample": np.zeros((2, 4, 8, 8), "float32"), CACHE: np.zeros(1, "float32")}}
    res = time_calls({"full": (a, "x"), "shallow": (b, "c")}, feeds, iterations=3, warmup=1)
    assert a.calls == b.calls == 4 and len(res["full"]["ms"]) == 3 and res["full"]["median_ms"] >= 0


def test_quality_target_and_report(tmp_path):
    def row(unet, cache, acc, fd, **kw):
        return {"id": f"{unet}/{cache}@10", "unet": unet, "cache": cache, "steps": 10, "final_rel_l2": 0.01,
                "accuracy": acc, "accuracy_std": 0.01, "fd": fd, "fd_std": 2.0, **kw}

    results = {"command": "c", "date": "2026-12-02", "machine": {"processor": "x", "cpus": 2, "torch": "2", "torch_threads": 1},
               "rows": [row("dense", None, 0.95, 20.0),
                        row("dense", 3, 0.94, 21.5, pattern="FssF", full_fraction=0.5, accuracy_delta=-0.01,
                            accuracy_delta_std=0.01, fd_delta=1.5, fd_delta_std=1.0),
                        row("dense", 5, 0.90, 23.0, accuracy_delta=-0.05, accuracy_delta_std=0.01, fd_delta=3.0,
                            fd_delta_std=0.5)]}
    t = target_check(results)
    assert t["dense/3@10"]["passed"] and not t["dense/5@10"]["passed"] and not t["dense/5@10"]["within_noise"]
    results["target"] = t
    write_report(results, tmp_path)
    text = (tmp_path / "results.md").read_text()
    assert "`FssF`" in text and "**fail**" in text and "| 10 | dense | off |" in text


def test_bench_runs_the_pytorch_pair_without_exporting(tmp_path):
    """``--backend torch``: the PyTorch paths as engines (what a GPU run uses with CUDA graphs), nothing exported."""
    from slimexport.stepcache.bench import parse_args, run

    res = run(parse_args(["--model", "tiny", "--random-weights", "--cache", "2", "--steps", "6", "--size", "64",
                          "--backend", "torch", "--variants", "dense,cached", "--work", str(tmp_path / "w")]))
    assert not (tmp_path / "w").exists()
    assert res["backend"]["backend"] == "torch" and res["schedules"] == {"6": "FsFsFs"}
    assert res["per_image"]["6"]["cached"]["pattern"] == "FsFsFs" and res["per_image_speedup"]["6"]["dense"] == 1.0
    assert res["per_call_ms"]["dense/shallow"]["median_ms"] > 0
