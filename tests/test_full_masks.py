"""An all-True text mask (CLIP's) is dropped before the sampling loop: the same attention, no mask per step."""
import torch
from helpers import assert_close_to_ref, tiny_components, unet_inputs

import ldm.pipeline.stage as stage_module
from ldm.diffusion.conditioning import drop_full_masks
from ldm.pipeline.pipeline import Pipeline
from ldm.pipeline.sampling import sample


def _half(mask):
    return {"context": torch.randn(2, 4, 8), "context_mask": mask}


def test_all_true_masks_are_dropped_in_both_halves_and_nothing_else_changes():
    full = torch.ones(2, 4, dtype=torch.bool)
    cond = {"cond": _half(full), "uncond": _half(full.clone())}
    dropped = drop_full_masks(cond)
    assert dropped["cond"]["context_mask"] is None and dropped["uncond"]["context_mask"] is None
    assert dropped["cond"]["context"] is cond["cond"]["context"]
    assert cond["cond"]["context_mask"] is full  # the caller's dict is left as it was
    assert drop_full_masks(_half(full))["context_mask"] is None  # unguided


def test_a_padded_mask_in_either_half_keeps_both():
    full, padded = torch.ones(2, 4, dtype=torch.bool), torch.tensor([[True, True, False, False]] * 2)
    cond = {"cond": _half(full), "uncond": _half(padded)}  # T5: the empty negative prompt is padded
    assert drop_full_masks(cond) is cond
    assert drop_full_masks(_half(padded))["context_mask"] is padded
    no_text = {"x_cond": torch.zeros(1)}
    assert drop_full_masks(no_text) is no_text


def test_the_unet_gives_the_same_output_without_an_all_true_mask():
    unet = tiny_components().unet
    x, t, context = unet_inputs()
    mask = torch.ones(context.shape[:2], dtype=torch.bool)
    with torch.no_grad():
        assert_close_to_ref(unet(x, t, context=context), unet(x, t, context=context, context_mask=mask),
                            rel=1e-5, what="U-Net without the all-True mask")


def test_sampling_gives_the_reference_images_with_the_mask_dropped(monkeypatch):
    pipe = Pipeline(tiny_components(seed=3))
    settings = pipe.settings(steps=4, guidance=5.0, seed=5, sampler="ddim", height=32, width=32)
    cond = pipe.stage.conditioning(["a red square"], None, 1, 5.0)
    assert cond["cond"]["context_mask"] is None and cond["uncond"]["context_mask"] is None  # CLIP: all True
    got = sample(pipe.stage, ["a red square"], settings)
    monkeypatch.setattr(stage_module, "drop_full_masks", lambda cond: cond)  # the reference: the mask kept
    assert pipe.stage.conditioning(["a red square"], None, 1, 5.0)["cond"]["context_mask"] is not None
    want = sample(pipe.stage, ["a red square"], settings)
    assert_close_to_ref(got, want, rel=1e-5, what="images without the all-True mask")
