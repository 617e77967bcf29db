"""slimexport: training-free slimming of diffusion UNets (SlimDiff), export, engines, parity and speed.

``import slimexport`` is lean: it imports neither diffusers, onnxruntime, triton nor tensorrt, and does not
initialise CUDA. The public functions below import what they need when called.
"""

from slimexport._version import __version__

__all__ = ["__version__", "bench_folder", "build", "build_config", "compress", "load_model", "load_slim_unet", "save_slim_unet",
           "verify_folder"]


def __getattr__(name):
    if name in ("compress", "build"):
        from slimexport import api

        return getattr(api, name)
    if name in ("verify_folder", "bench_folder"):
        from slimexport import folder

        return getattr(folder, name)
    if name in ("load_slim_unet", "save_slim_unet"):
        from slimexport.slim import apply

        return getattr(apply, name)
    if name == "build_config":
        from slimexport.flags import build_config

        return build_config
    if name == "load_model":
        from slimexport.models.load import load_model

        return load_model
    raise AttributeError(f"module 'slimexport' has no attribute {name!r}")
