"""Per-image latency of step caching with ONNX Runtime (issue 19): whole denoising loops, dense vs cached vs slim
vs cached + slim, interleaved.

    python tools/bench_stepcache.py --model sd14 --random-weights --cache 3 --steps 25,50 --size 256 \
        [--slim engines/sd14-slim/slim_unet] --out docs/results/cpu-stepcache-DATE.json
    python tools/bench_stepcache.py --help

A command line over :mod:`slimexport.stepcache.bench`.
"""

import sys

from slimexport.stepcache.bench import main

if __name__ == "__main__":
    sys.exit(main())
