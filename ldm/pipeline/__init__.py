"""Composers: stages (denoiser, codec, conditioning, shape), start strategies, and the one sampling function."""

from ldm.pipeline.load import load_pipeline
from ldm.pipeline.settings import GenerationSettings, check_settings

__all__ = ["load_pipeline", "GenerationSettings", "check_settings"]
