"""Fixtures of the reliability suite: one small ``tiny`` build folder, made once per session and copied by the
tests that damage it (``_rel_helpers.copy_build``)."""

from __future__ import annotations

import pytest
import torch
from _rel_helpers import build_config


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on a shared 2-core machine two OpenMP threads spin against other processes and the tiny
    UNet runs many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    """A finished ``tiny`` build folder; never modified (copy it first)."""
    from slimexport.api import build

    root = tmp_path_factory.mktemp("reliability-build")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = build(build_config(), out=root / "tiny", progress=False, cache_dir=root / "cache")
    finally:
        torch.set_num_threads(before)
    assert res.passed, res.report["parity"]
    return res.out_dir
