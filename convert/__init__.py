"""PyTorch -> Orbax conversion of SegFace release checkpoints (installed as segface_jax.convert).

This is the only runtime code that imports torch.
"""
