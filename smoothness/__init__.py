"""smoothness: feature-smoothness surfaces and Skip-Cache for Diffusion Transformers."""
__version__ = "0.1.0"
