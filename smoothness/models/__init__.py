"""DiT / Skip-DiT, the size registry, checkpoint loading and the bundled trained models."""
from .captions import load_caption_embeds
from .checkpoint import CheckpointError, infer_config, load_model, read_state_dict, sha256
from .dit import DiT, DiTConfig, Trunk
from .latte import Latte, LatteConfig
from .latte_t2v import LatteT2V, LatteT2VConfig
from .registry import LATTE_DATASETS, SIZES, build, config_for, make, model_names

__all__ = ["CheckpointError", "DiT", "DiTConfig", "LATTE_DATASETS", "Latte", "LatteConfig", "LatteT2V", "LatteT2VConfig", "SIZES", "Trunk", "build",
           "config_for", "infer_config", "load_caption_embeds", "load_model", "make", "model_names", "read_state_dict", "sha256"]
