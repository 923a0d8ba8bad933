"""ldm: text-to-image diffusion (Stable Diffusion and Imagen) that is correct, fast and pleasant to change."""

__version__ = "0.1.0"


def load_pipeline(model=None, *, device=None, dtype=None, allow_pickle=False, ema=True):
    """Load a model (path, hub id, or the bundled default) into a pipeline: `load_pipeline(p)("a cat", seed=0)`
    (`ema=False`: a single file's non-EMA U-Net weights, as diffusers' from_single_file loads them)."""
    from ldm.pipeline.load import load_pipeline as _load

    return _load(model, device=device, dtype=dtype, allow_pickle=allow_pickle, ema=ema)


def load_cascade(base, upscalers=(), *, device=None, dtype=None, allow_pickle=False, **options):
    """A base model then super-resolution stages, one text embedding: `load_cascade(b, [sr])("a cat", seed=0)`."""
    from ldm.pipeline.cascade import load_cascade as _load

    return _load(base, upscalers, device=device, dtype=dtype, allow_pickle=allow_pickle, **options)
