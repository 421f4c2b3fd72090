"""Loading models to compress and saving/loading compressed ones."""

from .models import LoadedModel, default_gguf_path, load_model, resolve
from .saved import FORMAT_VERSION, is_shrink_folder, load, read_manifest, save

__all__ = ["FORMAT_VERSION", "LoadedModel", "default_gguf_path", "is_shrink_folder", "load", "load_model",
           "read_manifest", "resolve", "save"]
