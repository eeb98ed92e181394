"""Datasets, input pipelines, metrics and evaluation (installed as ``segface_jax.train``)."""
