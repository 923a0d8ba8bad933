"""The fast path and FP8 reach every network a base + refiner ensemble runs: `ExpertEnsemble.stages` is the base's
(the settings it is called with), but the refiner samples the low-noise steps and decodes, so `compile_pipeline`
must convert its U-Net (and its decoder) too, and the records say so."""
import torch

from ldm.models.float8 import uses_float8
from ldm.pipeline.fast import compile_pipeline
from ldm.pipeline.generate import generate_to_folder
from ldm.pipeline.load import load_pipeline
from ldm.pipeline.refiner import ExpertEnsemble


def _ensemble(folder):
    return ExpertEnsemble(load_pipeline(str(folder), device="cpu"), load_pipeline(str(folder), device="cpu"), 0.5)


def test_fp8_and_the_fast_path_reach_the_refiner_too(tiny_sd_folder, tmp_path):
    ensemble = _ensemble(tiny_sd_folder)
    compile_pipeline(ensemble, mode=None, fp8=True)
    for pipe in (ensemble.base, ensemble.refiner):
        assert uses_float8(pipe.unet)
        attn = next(m for name, m in pipe.unet.named_modules() if name.endswith("attn1"))
        assert attn.qkv_weight is not None  # fused q|k|v
        conv = next(m for m in pipe.unet.modules() if isinstance(m, torch.nn.Conv2d))
        assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    decoder_conv = next(m for m in ensemble.autoencoder.decoder.modules() if isinstance(m, torch.nn.Conv2d))
    assert decoder_conv.weight.is_contiguous(memory_format=torch.channels_last)  # the refiner decodes
    (record,) = generate_to_folder(ensemble, ["a red circle"], tmp_path / "out", sampler="euler", steps=2,
                                   guidance=2.0, height=16, width=16, progress=False)
    assert record["fp8"] is True

