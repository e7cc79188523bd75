"""Model building blocks on top of qserve.kernels."""
