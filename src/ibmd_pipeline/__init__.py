"""ibmd-pipeline: Inverse Bridge Matching Distillation of diffusion bridge models, as a Kedro project."""

__version__ = "0.1.0"
