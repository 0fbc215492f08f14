"""Baselines trained through the same pipeline as Med-NCA (the UNet)."""
