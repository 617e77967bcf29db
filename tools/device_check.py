"""One GPU check anyone can rerun: compress SD1.4 (random weights), time dense vs slim, calibration throughput.

    OUT=/tmp/out python tools/device_check.py [--groups main,aoti] [--deadline 240] [--prompts 8 --steps 4]
                                              [--no-kernels] [--no-onnx] [--variants ...] [--sections ...]

A command line over :mod:`slimexport.harness.device_check` (its sections are described there and in ``--help``);
``tools/device_check.sh`` runs it on a GPU machine without a package registry. Without CUDA it is a smoke run on
the ``tiny`` model.
"""

from slimexport.harness.device_check import main

if __name__ == "__main__":
    main()
