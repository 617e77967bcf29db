"""slimexport.timer on the CPU: wall-clock times of sleeping calls, counted calls, no CUDA paths taken."""

import time

import pytest
import torch

from slimexport import timer


def nap(ms: float = 2.0):
    calls = []

    def fn():
        calls.append(1)
        time.sleep(ms / 1e3)

    return fn, calls


def test_call_timer_on_the_cpu():
    t = timer.CallTimer("cpu")
    fn, calls = nap()
    ms = t.time(fn)
    assert not t.cuda and 2.0 <= ms < 200.0 and calls == [1]
    assert t.collect() == []


def test_call_ms_loop_ms_wall_seconds():
    fn, calls = nap()
    assert 2.0 <= timer.call_ms(fn, "cpu") < 200.0 and len(calls) == 1
    assert 2.0 <= timer.loop_ms(fn, torch.device("cpu")) < 200.0 and len(calls) == 3  # one warm-up, one timed
    assert 0.002 <= timer.wall_seconds(fn, "cpu") < 0.2 and len(calls) == 4


def test_graph_ms_is_none_off_cuda():
    fn, calls = nap()
    assert timer.graph_ms(fn, "cpu") is None and calls == []


@pytest.mark.parametrize("device,cuda", [("cpu", False), ("cuda", True), ("cuda:1", True), (torch.device("cpu"), False)])
def test_is_cuda(device, cuda):
    assert timer.is_cuda(device) is cuda


@pytest.mark.gpu
def test_cuda_timers():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    x = torch.randn(512, 512, device="cuda")
    assert timer.call_ms(lambda: x @ x, "cuda") > 0
    assert timer.loop_ms(lambda: x @ x, "cuda") > 0
    assert timer.graph_ms(lambda: x @ x, "cuda", calls=5, replays=3, warmup=2) > 0
    t = timer.CallTimer("cuda")
    assert t.time(lambda: x @ x) is None and len(t.collect()) == 1
