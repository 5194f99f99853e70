"""imgclf: a reproducible image-classification pipeline (MLP vs CNN) driven by DVC and MLflow."""

__version__ = "0.1.0"
