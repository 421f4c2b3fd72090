"""Loading models to compress and saving/loading compressed ones."""

from .manifest import FORMAT_VERSION, is_own_folder, read_manifest
from .models import LoadedModel, default_gguf_path, load, read_model, resolve
from .saved import is_shrink_folder, save

__all__ = ["FORMAT_VERSION", "LoadedModel", "default_gguf_path", "is_own_folder", "is_shrink_folder", "load",
           "read_model", "read_manifest", "resolve", "save"]
