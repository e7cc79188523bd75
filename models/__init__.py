"""Model definitions on qserve.layers, and a registry keyed by Hugging Face architecture name."""

from qserve.models.registry import get_model_class, supported_architectures

__all__ = ["get_model_class", "supported_architectures"]
