"""Composers: text -> conditioning -> sampler -> decode."""

from ldm.pipeline.load import load_pipeline

__all__ = ["load_pipeline"]
