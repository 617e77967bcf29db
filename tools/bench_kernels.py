"""Benchmark the slimexport Triton kernels against their torch references at SD1.4 shapes.

    python tools/bench_kernels.py                        # all ops, UNet batch 4 and 16 (batch 2 and 8 with CFG)
    python tools/bench_kernels.py --ops attention --batches 2 --dtype bf16 --json bench.json

A command line over :mod:`slimexport.bench.kernel_bench` (the shapes, columns and timing are described there).
Without CUDA it runs a smoke test of the references at tiny shapes.
"""

import sys

from slimexport.bench.kernel_bench import main

if __name__ == "__main__":
    sys.exit(main())
