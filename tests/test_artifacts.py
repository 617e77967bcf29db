"""Low-level artifact writing: strict JSON, atomic folder replacement that loses nothing, and the clean-up of a
killed run's temporaries."""

import json
import os

import numpy as np
import pytest

from slimexport import artifacts
from slimexport.artifacts import atomic_dir, remove_stale_temporaries, write_json


def _strict(text: str):
    def refuse(name):
        raise ValueError(f"non-JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def test_write_json_writes_non_finite_numbers_as_null(tmp_path):
    p = write_json(tmp_path / "r.json", {"sqnr_db": float("inf"), "rows": [float("nan"), 1.5, -float("inf")],
                                          "np": np.float32("inf"), "ok": np.float64(2.0), "t": (1, float("nan"))})
    assert _strict(p.read_text()) == {"sqnr_db": None, "rows": [None, 1.5, None], "np": None, "ok": 2.0, "t": [1, None]}


def test_atomic_dir_puts_the_old_folder_back_when_the_swap_fails(tmp_path, monkeypatch):
    final = tmp_path / "slim_unet"
    final.mkdir()
    (final / "w").write_text("old")
    real = os.replace

    def failing(src, dst):
        if str(dst) == str(final) and not str(src).endswith(".old"):  # the new folder's move into place
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(artifacts.os, "replace", failing)
    with pytest.raises(Exception, match="space"), atomic_dir(final) as tmp:
        (tmp / "w").write_text("new")
    assert (final / "w").read_text() == "old"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_stale_clean_up_restores_a_folder_killed_mid_swap(tmp_path):
    old = tmp_path / ".tmp-slim_unet.old"  # atomic_dir moved it aside, then the run was killed
    old.mkdir()
    (old / "w").write_text("old")
    half = tmp_path / ".tmp-onnx.x1y2z3"  # an unfinished new folder: wasted disk
    half.mkdir()
    kept = tmp_path / "calib"
    kept.mkdir()
    stale_old = tmp_path / ".tmp-calib.old"  # its folder is in place: this one is only leftovers
    stale_old.mkdir()
    (tmp_path / ".tmp-abc").write_text("")  # a short temporary name
    (tmp_path / ".tmp-.old").write_text("")
    remove_stale_temporaries(tmp_path)
    assert (tmp_path / "slim_unet" / "w").read_text() == "old"
    assert not half.exists() and not stale_old.exists() and kept.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
