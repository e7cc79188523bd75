"""Model definitions on qserve.layers, and a registry keyed by Hugging Face architecture name."""

if __name__ != "qserve.models":  # imported as bare `models` because the repo root is on sys.path
    from qserve.kernels._bare_name import hand_over

    hand_over(__name__, __file__)
else:
    from qserve.models.registry import get_model_class, supported_architectures

    __all__ = ["get_model_class", "supported_architectures"]
