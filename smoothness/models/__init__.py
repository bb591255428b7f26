"""Core layer: DiT / Skip-DiT, Latte, LatteT2V, the size registry, checkpoint loading, the bundled
trained models, caption files and labelled model entries. Imports nothing of the package outside
``models/`` (torch and numpy only)."""
from .captions import Captions, caption_attrs, load_caption_embeds
from .checkpoint import CheckpointError, infer_config, load_model, read_state_dict, sha256
from .dit import DiT, DiTConfig, Trunk
from .entries import ModelEntry, as_entries, load_entries
from .latte import Latte, LatteConfig
from .latte_t2v import LatteT2V, LatteT2VConfig
from .registry import LATTE_DATASETS, SIZES, build, config_for, make, model_names

__all__ = ["Captions", "CheckpointError", "DiT", "DiTConfig", "LATTE_DATASETS", "Latte", "LatteConfig", "LatteT2V",
           "LatteT2VConfig", "ModelEntry", "SIZES", "Trunk", "as_entries", "build", "caption_attrs", "config_for",
           "infer_config", "load_caption_embeds", "load_entries", "load_model", "make", "model_names",
           "read_state_dict", "sha256"]
