"""Benchmark lowrank_linear at SD1.4 shapes: torch reference vs Triton (:mod:`slimexport.bench.kernel_bench`).

    python tools/bench_lowrank_linear.py [--batches 2 8] [--dtype fp16|bf16] [--json PATH]
"""

import sys

from slimexport.bench.kernel_bench import main

if __name__ == "__main__":
    sys.exit(main(ops_default=("lowrank_linear",)))
