"""The ordered first checks for a machine with TensorRT and a GPU (issue 21).

    python tools/trt_smoke.py [--out DIR]

A command line over :mod:`slimexport.harness.trt_smoke` (the checks, their order and exit codes are described
there). Without TensorRT it says so and exits 0 after checking what it can.
"""

import sys

from slimexport.harness.trt_smoke import main

if __name__ == "__main__":
    sys.exit(main())
