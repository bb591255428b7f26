"""DiT / Skip-DiT, the size registry, checkpoint loading and the bundled trained models."""
from .checkpoint import CheckpointError, infer_config, load_model, read_state_dict, sha256
from .dit import DiT, DiTConfig, Trunk
from .registry import SIZES, build, config_for, model_names

__all__ = ["CheckpointError", "DiT", "DiTConfig", "SIZES", "Trunk", "build", "config_for", "infer_config",
           "load_model", "model_names", "read_state_dict", "sha256"]
