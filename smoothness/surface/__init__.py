"""Feature-smoothness surfaces (Skip-DiT, arXiv 2411.17616, Fig. 2) for any DiT.

Engine layer: directions and perturbation (``perturb``), the batched engine (``engine``), chunk
evaluation (``evaluation``), the configuration (``config``), the dataset and ``compute``
(``compute``), its file schema and I/O (``io``), similarity metrics (``similarity``) and smoothness
scores (``scores``). May import the core (models, diffusion, hooks, chain) and nothing above it;
``cli`` and ``__main__`` are the command ``python -m smoothness.surface``.

    from smoothness.surface import SurfaceConfig, compute, load_entries
    ds = compute(load_entries(["digits-dit", "digits-skip-dit"]), SurfaceConfig(steps=(10, 250)))
"""
from ..models import ModelEntry, load_entries
from .config import DTYPES, SurfaceConfig
from .dataset import compute, empty_dataset
from .engine import GridEngine, Perturbation
from .evaluation import EVALUATIONS
from .perturb import Axis, DirectionSpec

__all__ = ["Axis", "DTYPES", "DirectionSpec", "EVALUATIONS", "GridEngine", "ModelEntry", "Perturbation",
           "SurfaceConfig", "compute", "empty_dataset", "load_entries"]
