"""Data: webdataset streaming (img2dataset layout), transforms, filters, caption dropout, buckets, dataset builders."""
from ldm.data.captions import drop_captions
from ldm.data.config import DataConfig
from ldm.data.filters import SampleFilter
from ldm.data.loader import SkipCounter, StreamLoader, make_loader
from ldm.data.samples import register_sample_format
from ldm.data import latents as _latents  # noqa: F401  registers the "latent" sample format

__all__ = ["DataConfig", "SampleFilter", "SkipCounter", "StreamLoader", "drop_captions", "make_loader", "register_sample_format"]
