"""Diffusion bridge teachers: configuration, construction from checkpoints, training."""
