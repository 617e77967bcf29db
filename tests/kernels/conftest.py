"""Kernel tests: Triton's CPU interpreter on CPU tensors here, compiled kernels on CUDA tensors on a GPU machine.

``TRITON_INTERPRET`` must be set before triton is first imported (diffusers imports it at collection), so the root
``tests/conftest.py`` sets it, unless the caller did: ``1`` without CUDA, ``0`` with CUDA. The ``kernel_device``
fixture gives the device the odd-shape tests run on (``cpu`` under the interpreter, else ``cuda``) and skips them
without triton. Tests marked ``gpu`` need CUDA and compiled kernels; they are skipped otherwise (bf16 is wrong in
the interpreter).
"""

import pytest
import torch

from slimexport.kernels import dispatch as kd

NO_TRITON = "triton is not installed (pip install 'slimexport[kernels]')"


def _cuda_compiled() -> bool:
    return torch.cuda.is_available() and not kd.interpreter_enabled() and kd.triton_available()


def pytest_runtest_setup(item):
    if item.get_closest_marker("gpu") is not None and not _cuda_compiled():
        pytest.skip("needs a CUDA GPU, triton, and TRITON_INTERPRET unset or 0")


@pytest.fixture(autouse=True)
def _clean_dispatch(monkeypatch):
    """No SLIMEXPORT_KERNELS from the caller's shell, and no AUTO choices carried between tests."""
    monkeypatch.delenv(kd.ENV_VAR, raising=False)
    kd.clear_choices()
    yield
    kd.clear_choices()


@pytest.fixture
def kernel_device() -> str:
    """Where the Triton twins run in the odd-shape tests: the interpreter on CPU, else the GPU."""
    if not kd.triton_available():
        pytest.skip(NO_TRITON)
    if kd.interpreter_enabled():
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    pytest.skip("TRITON_INTERPRET=0 and no CUDA: nowhere to run Triton kernels")


def _fake_do_bench(kernel_call, quantiles=None, **kwargs):
    """Stands in for the autotuner's GPU timing under the interpreter: runs the config once, times nothing."""
    kernel_call()
    return [1.0, 1.0, 1.0]


@pytest.fixture
def interpreted_autotune(kernel_device, monkeypatch):
    """``use(module)``: make that op's Triton twin take its GPU launch path (autotune over the configs, prune,
    grid heuristics) under the interpreter, with the autotuner's timing faked. CPU only: on CUDA every other
    test takes that path."""
    if kernel_device != "cpu":
        pytest.skip("on CUDA every other test takes this path")

    def use(module) -> None:
        tuned = module._kernels(True, True)[1].tuned  # interpreted, autotuned: as the wrapper asks
        monkeypatch.setattr(module, "INTERPRETER_CONFIG", None)
        monkeypatch.setattr(tuned, "_do_bench", _fake_do_bench)

    return use


@pytest.fixture
def cuda() -> str:
    if not _cuda_compiled():
        pytest.skip("needs a CUDA GPU, triton, and TRITON_INTERPRET unset or 0")
    return "cuda"
