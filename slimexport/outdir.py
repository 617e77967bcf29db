"""Where builds write: the default output folder, the cache builds share, and the check that an ``--out`` folder is
slimexport's to write into."""

from __future__ import annotations

import os
from pathlib import Path

from slimexport.artifacts import check_writable_dir, json_object
from slimexport.errors import UsageError

DEFAULT_ROOT = Path("engines")
# Where calibration statistics are shared between builds (a new budget reuses them): $SLIMEXPORT_CACHE_DIR, else here.
CACHE_ENV = "SLIMEXPORT_CACHE_DIR"
# What slimexport writes into an --out folder (its temporaries start with '.'): any other entry is someone else's.
OUTPUT_ENTRIES = frozenset({"manifest.json", "calib", "plan.json", "slim_unet", "onnx", "aoti", "openvino", "verify.json",
                            "bench.json", "report.json", "report.md", "report.html", "figures", "pipeline", "stepcache"})


def check_out_dir(out_dir: Path, entries: frozenset[str] = OUTPUT_ENTRIES) -> None:
    """Refuse, before any work, an --out that cannot be written, or a folder of someone else's files (slimexport
    would write calib/, onnx/ and reports among them); ``entries``: the names slimexport writes there."""
    check_writable_dir(out_dir)
    if out_dir.is_dir() and json_object(out_dir / "manifest.json", "manifest") is None:
        foreign = sorted(p.name for p in out_dir.iterdir() if p.name not in entries and not p.name.startswith("."))
        if foreign:
            raise UsageError(f"{out_dir} holds files slimexport did not write ({', '.join(foreign[:3])}"
                             f"{', …' if len(foreign) > 3 else ''}) and no readable manifest.json", "pass a new or empty --out folder")


def default_out(model: str, budget: float, suffix: str = "", tag: str | None = None) -> Path:
    """``engines/<name>-b<budget><suffix>`` (``tag`` in place of ``b<budget>``): a folder's name (its pipeline's for a
    ``unet/`` folder), else the id."""
    path = Path(model).expanduser().resolve()
    if path.exists():
        name = path.parent.name if path.name == "unet" and (path.parent / "model_index.json").exists() else path.name
        name = path.stem if path.is_file() and path.suffix == ".safetensors" else name  # a single-file checkpoint
    else:
        name = model.replace("/", "--")
    return DEFAULT_ROOT / f"{name}-{tag or f'b{budget:g}'}{suffix}"


def shared_cache(cache_dir: str | Path | None = None) -> Path:
    """Where builds share calibration statistics, prompt embeddings and latency tables: ``cache_dir``, else
    ``$SLIMEXPORT_CACHE_DIR``, else ``engines/.cache``."""
    return Path(cache_dir or os.environ.get(CACHE_ENV) or DEFAULT_ROOT / ".cache")
