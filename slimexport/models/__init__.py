"""Models: the registry, loading, and the map of compressible modules (the only code that knows diffusers names)."""

from slimexport.models.bundle import ModelBundle
from slimexport.models.load import load_model
from slimexport.models.registry import REGISTRY, ModelSpec, get_spec

__all__ = ["REGISTRY", "ModelBundle", "ModelSpec", "get_spec", "load_model"]
