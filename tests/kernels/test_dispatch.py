"""dispatch: which twin runs where, the SLIMEXPORT_KERNELS override, graph capture, lean imports."""

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from slimexport.errors import MissingExtraError, UsageError
from slimexport.kernels import dispatch as kd
from slimexport.kernels.dispatch import KernelImpl, choose_impl, dispatch

REPO = Path(__file__).resolve().parents[2]


def ref_fn(x):
    return x + 1


def triton_fn(x):
    return x + 2


def failing_triton_fn(x):
    raise AssertionError("the Triton twin must not run here")


def test_kernel_impl_parses_names():
    assert KernelImpl.parse("Triton") is KernelImpl.TRITON
    assert KernelImpl.parse(KernelImpl.AUTO) is KernelImpl.AUTO
    with pytest.raises(UsageError, match="auto, torch, triton"):
        KernelImpl.parse("cuda")


@pytest.mark.parametrize("impl", ["auto", "torch", KernelImpl.AUTO])
def test_cpu_tensors_get_the_reference(impl):
    x = torch.arange(4.0)
    assert choose_impl("op", x, impl=impl) is KernelImpl.TORCH
    assert torch.equal(dispatch("op", ref_fn, failing_triton_fn, x, impl=impl), ref_fn(x))


def test_forced_triton_on_cpu_needs_the_interpreter(monkeypatch):
    if not kd.triton_available():
        pytest.skip("triton is not installed")
    x = torch.arange(4.0)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert torch.equal(dispatch("op", ref_fn, triton_fn, x, impl="triton"), triton_fn(x))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert torch.equal(dispatch("op", ref_fn, failing_triton_fn, x, impl="triton"), ref_fn(x))


def test_forced_triton_without_triton_names_the_extra(monkeypatch):
    monkeypatch.setattr(kd, "_AVAILABLE", False)
    assert not kd.triton_available()
    with pytest.raises(MissingExtraError, match=r"slimexport\[kernels\]") as err:
        dispatch("cov_accumulate", ref_fn, triton_fn, torch.zeros(2), impl="triton")
    assert "'triton'" in str(err.value) and "cov_accumulate" in str(err.value)
    # AUTO and TORCH still work without triton
    assert torch.equal(dispatch("op", ref_fn, failing_triton_fn, torch.zeros(2)), torch.ones(2))


def test_triton_wrappers_without_triton_name_the_extra(monkeypatch):
    from slimexport.kernels import cov_accumulate_triton

    monkeypatch.setattr(kd, "_AVAILABLE", False)
    with pytest.raises(MissingExtraError, match=r"slimexport\[kernels\]"):
        cov_accumulate_triton(torch.zeros(4, 4), torch.ones(2, 4))


def test_environment_overrides_impl(monkeypatch):
    x = torch.arange(3.0)
    monkeypatch.setenv(kd.ENV_VAR, "torch")
    assert kd.requested_impl("triton") is KernelImpl.TORCH
    assert torch.equal(dispatch("op", ref_fn, failing_triton_fn, x, impl="triton"), ref_fn(x))
    monkeypatch.setenv(kd.ENV_VAR, "TRITON")
    assert kd.requested_impl("torch") is KernelImpl.TRITON
    monkeypatch.setenv(kd.ENV_VAR, "fast")
    with pytest.raises(UsageError, match=kd.ENV_VAR):
        dispatch("op", ref_fn, triton_fn, x)


def test_jit_trace_records_the_reference(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(kd, "_AVAILABLE", True)

    def f(x):
        return dispatch("op", ref_fn, failing_triton_fn, x, impl="triton")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(f, torch.zeros(3), check_trace=False)
    assert torch.equal(traced(torch.ones(3)), torch.full((3,), 2.0))


@pytest.mark.parametrize("flag", ["onnx", "compiler"])
def test_graph_capture_uses_the_reference(monkeypatch, flag):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(kd, "_AVAILABLE", True)
    if flag == "onnx":
        monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
    else:
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert kd.in_graph_capture()
    x = torch.zeros(2)
    assert choose_impl("op", x, impl="triton") is KernelImpl.TORCH
    assert torch.equal(dispatch("op", ref_fn, failing_triton_fn, x, impl="triton"), ref_fn(x))


def test_shape_key_ignores_float_values():
    q = torch.zeros(1, 2, 3, 4)
    assert kd.shape_key("a", (q, 0.125)) == kd.shape_key("a", (q, 0.5))
    assert kd.shape_key("a", (q, 0.125)) != kd.shape_key("a", (q.transpose(2, 3), 0.125))
    assert kd.shape_key("a", (q, None)) != kd.shape_key("a", (q.half(), None))


@pytest.mark.parametrize("times,expected", [((1.0, 0.5), KernelImpl.TRITON), ((1.0, 0.99), KernelImpl.TORCH),
                                            ((0.5, 1.0), KernelImpl.TORCH)])
def test_auto_choice_is_measured_once_and_cached(monkeypatch, times, expected):
    calls = []

    def fake_measure(ref, tri, args, mutates):
        calls.append(mutates)
        return times

    monkeypatch.setattr(kd, "measure", fake_measure)
    x = torch.zeros(5)
    for _ in range(3):
        assert kd._auto_choice("op", ref_fn, triton_fn, (x,), (0,)) is expected
    assert calls == [(0,)]
    assert kd.cached_choice("op", x) is expected
    assert kd.choices() == {kd.shape_key("op", (x,)) + ("eager",): expected}
    with kd.graph_timing():  # a choice for graph replays is measured on its own
        assert kd.cached_choice("op", x) is None
    kd.clear_choices()
    assert kd.cached_choice("op", x) is None


def _fake_timers(monkeypatch, graph_fails=False):
    """Replace both CUDA timers: eager calls say the twin is slower (launch overhead), graph replays faster."""
    used = []

    def eager(fn, args, mutates):
        used.append("eager")
        return 1.0 if fn is ref_fn else 2.0

    def graph(fn, args, mutates):
        used.append("graph")
        if graph_fails:
            raise RuntimeError("operation not permitted when stream is capturing")
        return 1.0 if fn is ref_fn else 0.5

    monkeypatch.setattr(kd, "_time_ms", eager)
    monkeypatch.setattr(kd, "_time_graph_ms", graph)
    return used


def test_graph_timing_measures_replays_and_keys_the_choice(monkeypatch):
    used = _fake_timers(monkeypatch)
    x = torch.zeros(3)
    assert kd.timing_mode() == "eager"
    assert kd._auto_choice("op", ref_fn, triton_fn, (x,), ()) is KernelImpl.TORCH
    assert "graph" not in used
    with kd.graph_timing():
        assert kd.timing_mode() == "graph"
        assert kd._auto_choice("op", ref_fn, triton_fn, (x,), ()) is KernelImpl.TRITON
        assert kd.cached_choice("op", x) is KernelImpl.TRITON
    assert "graph" in used and kd.timing_mode() == "eager"
    assert kd.cached_choice("op", x) is KernelImpl.TORCH  # the eager choice is kept beside it
    monkeypatch.setenv(kd.TIMING_ENV_VAR, "graph")
    assert kd.timing_mode() == "graph"
    monkeypatch.setenv(kd.TIMING_ENV_VAR, "sometimes")
    with pytest.raises(UsageError, match="eager or graph"):
        kd.timing_mode()


def test_graph_timing_falls_back_to_eager_when_capture_fails(monkeypatch):
    used = _fake_timers(monkeypatch, graph_fails=True)
    with kd.graph_timing(), pytest.warns(RuntimeWarning, match="timing eager calls instead"):
        assert kd.measure(ref_fn, triton_fn, (torch.zeros(3),)) == (1.0, 2.0)
    assert used.count("graph") == 1 and used.count("eager") == 2 * (kd.AUTO_WARMUP_CALLS + kd.AUTO_TIMED_CALLS)


def test_auto_choice_falls_back_when_the_twin_fails(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("out of resources")

    monkeypatch.setattr(kd, "measure", broken)
    with pytest.warns(RuntimeWarning, match="reference is used"):
        assert kd._auto_choice("op", ref_fn, triton_fn, (torch.zeros(2),), ()) is KernelImpl.TORCH


def test_fits_int32():
    assert kd.fits_int32(torch.zeros(3, 4), torch.empty(0))
    big = torch.zeros(1).expand(2**31 + 5)  # a stride-0 view: no memory
    assert kd.fits_int32(big)
    assert not kd.fits_int32(torch.empty_strided((2, 2), (2**31, 1), device="meta"))
    assert not kd.fits_int32(torch.empty(2**31 + 1, dtype=torch.int8, device="meta"))


def test_triton_wrappers_refuse_cpu_without_interpreter(monkeypatch):
    if not kd.triton_available():
        pytest.skip("triton is not installed")
    from slimexport.kernels import lowrank_linear_triton

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(UsageError, match="TRITON_INTERPRET=1"):
        lowrank_linear_triton(torch.zeros(2, 4), torch.zeros(4, 2), torch.zeros(2, 3), None)


def test_lean_import():
    """``import slimexport`` and ``import slimexport.kernels`` import no triton and initialise no CUDA."""
    code = ("import sys, slimexport, slimexport.kernels, torch\n"
            "from slimexport.kernels import cov_accumulate, decoupled_attention, lowrank_linear, KernelImpl\n"
            "bad = [m for m in ('triton', 'diffusers', 'onnxruntime', 'tensorrt') if m in sys.modules]\n"
            "assert not bad, bad\n"
            "assert not torch.cuda.is_initialized()\n"
            "assert callable(cov_accumulate) and callable(decoupled_attention) and callable(lowrank_linear)\n")
    env = {k: v for k, v in __import__("os").environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(REPO)
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr

def test_force_kernels_overrides_argument_and_environment(monkeypatch):
    x = torch.arange(3.0)
    with kd.force_kernels("torch"):
        assert kd.requested_impl("triton") is KernelImpl.TORCH
        assert torch.equal(dispatch("op", ref_fn, failing_triton_fn, x, impl="triton"), ref_fn(x))
        monkeypatch.setenv(kd.ENV_VAR, "triton")
        assert kd.requested_impl("auto") is KernelImpl.TORCH  # the block wins over the environment
        with kd.force_kernels(sdpa_pad=True):  # nested: impl kept, pad added
            assert kd.requested_impl("auto") is KernelImpl.TORCH and kd.forced_sdpa_pad() is True
        assert kd.forced_sdpa_pad() is None
    assert kd.requested_impl("auto") is KernelImpl.TRITON  # the environment again
    monkeypatch.delenv(kd.ENV_VAR)
    assert kd.requested_impl("auto") is KernelImpl.AUTO
    with pytest.raises(RuntimeError), kd.force_kernels(KernelImpl.TORCH):
        raise RuntimeError("restored on errors too")
    assert kd.requested_impl("auto") is KernelImpl.AUTO
    with pytest.raises(UsageError, match="auto, torch, triton"), kd.force_kernels("cuda"):
        pass
    with pytest.raises(UsageError, match="sdpa_pad"), kd.force_kernels(sdpa_pad="1"):
        pass


def test_force_kernels_is_per_thread():
    import threading

    seen = []
    with kd.force_kernels("torch"):
        t = threading.Thread(target=lambda: seen.append(kd.requested_impl("auto")))
        t.start()
        t.join()
    assert seen == [KernelImpl.AUTO]


def test_force_kernels_sdpa_pad(monkeypatch):
    from slimexport.kernels.decoupled_attention import PAD_ENV_VAR, sdpa_pad_enabled

    monkeypatch.delenv(PAD_ENV_VAR, raising=False)
    assert not sdpa_pad_enabled()
    with kd.force_kernels(sdpa_pad=True):
        assert sdpa_pad_enabled()
        monkeypatch.setenv(PAD_ENV_VAR, "0")
        assert sdpa_pad_enabled()
    assert not sdpa_pad_enabled()
    monkeypatch.setenv(PAD_ENV_VAR, "1")
    assert sdpa_pad_enabled()
    with kd.force_kernels(sdpa_pad=False):
        assert not sdpa_pad_enabled()


# ---------------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_auto_measures_on_cuda(cuda):
    x = torch.randn(1000, device=cuda)
    assert choose_impl("op", x) is KernelImpl.AUTO
    out = dispatch("op", ref_fn, triton_fn, x)
    choice = kd.cached_choice("op", x)
    assert choice in (KernelImpl.TORCH, KernelImpl.TRITON)
    assert torch.equal(out, (triton_fn if choice is KernelImpl.TRITON else ref_fn)(x))


@pytest.mark.gpu
def test_graph_timing_on_cuda(cuda):
    """A real capture: positive per-call times, the in-place op's argument untouched, a cached graph-mode choice."""
    acc = torch.zeros(256, 256, device=cuda)
    x = torch.randn(4096, 256, device=cuda, dtype=torch.float16)

    def ref(a, b):
        return a.addmm_(b.float().T, b.float())

    ms = kd._time_graph_ms(ref, (acc, x), (0,))
    assert ms > 0 and torch.count_nonzero(acc) == 0
    with kd.graph_timing():
        dispatch("op_graph", ref, ref, acc, x, mutates=(0,))
        assert kd.cached_choice("op_graph", acc, x) in (KernelImpl.TORCH, KernelImpl.TRITON)
    torch.testing.assert_close(acc, x.float().T @ x.float())


@pytest.mark.gpu
def test_auto_measures_in_place_ops_on_clones(cuda):
    def ref_add(acc):
        return acc.add_(1)

    def tri_add(acc):
        return acc.add_(1)

    acc = torch.zeros(64, device=cuda)
    dispatch("inplace", ref_add, tri_add, acc, mutates=(0,))
    assert torch.equal(acc, torch.ones(64, device=cuda))



def test_interpreter_switched_on_after_triton_import_is_a_clear_error():
    """Triton decorates its own helpers when first imported: TRITON_INTERPRET=1 set later cannot take effect."""
    if not kd.triton_available():
        pytest.skip("triton is not installed")
    script = (
        "import os, torch, triton\n"
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "from slimexport.errors import UsageError\n"
        "from slimexport.kernels.cov_accumulate import cov_accumulate_triton\n"
        "try:\n"
        "    cov_accumulate_triton(torch.zeros(8, 8), torch.randn(5, 8))\n"
        "except UsageError as err:\n"
        "    print('USAGE', err)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert "USAGE" in out.stdout, out.stderr[-2000:]
    assert "before starting Python" in out.stdout
