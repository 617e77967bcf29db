"""Latency table validation (issue 18): predicted vs measured end-to-end latency of slim UNets on the engine.

    python tools/latency_check.py                                         # SD1.4 shapes, ONNX Runtime and OpenVINO
    python tools/latency_check.py --model tiny --size 32 --iterations 5   # a smoke run
    python tools/latency_check.py --help                                  # every option

A command line over :mod:`slimexport.harness.latency_check`; results go to docs/results of this checkout and the
exports, statistics and table cache to engines/latency-check by default.
"""

import sys
from pathlib import Path

from slimexport.harness.latency_check import main

if __name__ == "__main__":
    sys.exit(main(root=Path(__file__).resolve().parents[1]))
