"""Slim UNets: the decoupled-head attention processor, module replacement, save and load."""

from slimexport.slim.apply import install_processors, load_slim_unet, replace_linears, save_slim_unet
from slimexport.slim.attention import SlimAttnProcessor

__all__ = ["SlimAttnProcessor", "install_processors", "load_slim_unet", "replace_linears", "save_slim_unet"]
