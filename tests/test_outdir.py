"""Output and cache folders: the default --out name, the shared cache's place, and the refusal of a folder of
someone else's files (before any work, with nothing written)."""

from __future__ import annotations

from pathlib import Path

import pytest

from slimexport.errors import UsageError
from slimexport.outdir import CACHE_ENV, OUTPUT_ENTRIES, check_out_dir, default_out, shared_cache


def test_default_out_names_the_model(tmp_path):
    (tmp_path / "my-pipe" / "unet").mkdir(parents=True)
    (tmp_path / "my-pipe" / "model_index.json").write_text("{}")
    (tmp_path / "solo" / "unet").mkdir(parents=True)  # a unet/ folder without a pipeline around it keeps its name
    (tmp_path / "ckpt.safetensors").write_bytes(b"")
    assert default_out(str(tmp_path / "my-pipe"), 0.73) == Path("engines/my-pipe-b0.73")
    assert default_out(str(tmp_path / "my-pipe" / "unet"), 0.73, "-onnxruntime") == Path("engines/my-pipe-b0.73-onnxruntime")
    assert default_out(str(tmp_path / "solo" / "unet"), 0.5) == Path("engines/unet-b0.5")
    assert default_out(str(tmp_path / "ckpt.safetensors"), 0.6) == Path("engines/ckpt-b0.6")
    assert default_out("CompVis/stable-diffusion-v1-4", 0.73) == Path("engines/CompVis--stable-diffusion-v1-4-b0.73")
    assert default_out("digits", 0.73) == Path("engines/digits-b0.73")
    assert default_out("sd14", 0, "-openvino", tag="s1.3") == Path("engines/sd14-s1.3-openvino")


def test_shared_cache_argument_then_environment_then_default(tmp_path, monkeypatch):
    monkeypatch.delenv(CACHE_ENV, raising=False)
    assert shared_cache() == Path("engines/.cache")
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "env"))
    assert shared_cache() == tmp_path / "env"
    assert shared_cache(tmp_path / "arg") == tmp_path / "arg"


def test_out_dir_of_someone_elses_files_is_refused(tmp_path):
    check_out_dir(tmp_path / "new")  # a new folder: fine, and not made here
    assert not (tmp_path / "new").exists()
    ours = tmp_path / "ours"
    ours.mkdir()
    for name in sorted(OUTPUT_ENTRIES)[:3]:
        (ours / name).mkdir()
    (ours / ".tmp-partial").write_text("")  # slimexport's temporaries start with '.'
    check_out_dir(ours)
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    for name in ("a.txt", "b.txt", "c.txt", "d.txt"):
        (theirs / name).write_text("x")
    with pytest.raises(UsageError, match=r"did not write \(a\.txt, b\.txt, c\.txt, …\).*pass a new or empty --out"):
        check_out_dir(theirs)
    check_out_dir(theirs, frozenset({"a.txt", "b.txt", "c.txt", "d.txt"}))  # a caller's own entries (sweep's points/)
    (theirs / "manifest.json").write_text('{"format": "x"}')  # a readable manifest: a folder slimexport wrote
    check_out_dir(theirs)
