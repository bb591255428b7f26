"""Core layer: DiT / Skip-DiT, Latte, LatteT2V, the model protocol and family table, the diffusers
adapters (DiT, PixArt, Latte, HunYuan-DiT), the size registry, checkpoint and folder loading, the
bundled trained models, caption files, labelled model entries, the VAE that decodes latents, and LPIPS (AlexNet) from a local weights file. Imports
nothing of the package outside ``models/`` (torch and numpy; diffusers only when a diffusers model or
the VAE is built)."""
from .captions import Captions, caption_attrs, load_caption_embeds
from .checkpoint import CheckpointError, infer_config, load_model, read_state_dict, sha256
from .dit import DiT, DiTConfig, Trunk
from .entries import ModelEntry, as_entries, load_entries
from .latte import Latte, LatteConfig
from .latte_t2v import LatteT2V, LatteT2VConfig
from .protocol import FAMILIES, DiTModel, Family, family_of, register, wrap
from .registry import LATTE_DATASETS, SIZES, build, config_for, make, model_names
from .lpips import Lpips
from .vae import Vae

__all__ = ["Captions", "CheckpointError", "DiT", "DiTConfig", "DiTModel", "FAMILIES", "Family", "LATTE_DATASETS",
           "Latte", "LatteConfig", "LatteT2V", "LatteT2VConfig", "Lpips", "ModelEntry", "SIZES", "Trunk", "as_entries", "build",
           "caption_attrs", "config_for",
           "family_of", "infer_config", "load_caption_embeds", "load_entries", "load_model", "make",
           "model_names", "read_state_dict", "register", "sha256", "Vae", "wrap"]
