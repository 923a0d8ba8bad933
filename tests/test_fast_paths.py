"""The fast paths compute what the reference path computes: fused q|k|v, channels_last, the compiled networks and
whole sampling loops from the same seed; fusing leaves every checkpoint layout (native, diffusers, original) as it
was, bitwise."""
import pytest
import torch
from helpers import assert_close_to_ref, tiny_components, unet_inputs

from ldm.cli.txt2img import build_parser
from ldm.errors import LdmError
from ldm.io.formats import load_model, save_diffusers, save_native, save_original
from ldm.models.attention import set_sdpa_kernels
from ldm.models.fused import fuse_qkv, unfuse_qkv
from ldm.pipeline.fast import compile_pipeline, fast_network
from ldm.pipeline.pipeline import Pipeline
from ldm.pipeline.sampling import sample


def _unet_out(unet, channels_last=False):
    x, t, context = unet_inputs()
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    with torch.no_grad():
        return unet(x, t, context=context)


def _state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_fused_qkv_gives_the_reference_output_and_the_same_state_dict(kind):
    unet = tiny_components(kind).unet
    reference, before = _unet_out(unet), _state(unet)
    assert fuse_qkv(unet) == 4  # self-attention of the 4 transformers: 1 down, 1 middle, 2 up
    assert fuse_qkv(unet) == 0  # fused layers stay as they are
    assert_close_to_ref(_unet_out(unet), reference, rel=1e-5, what="fused U-Net")
    after = unet.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_the_fused_product_is_the_one_that_runs_and_shares_storage_with_the_weights():
    unet = tiny_components().unet
    fuse_qkv(unet)
    attn = unet.middle_block[1].transformer_blocks[0].attn1
    assert attn.to_q.weight.data_ptr() == attn.qkv_weight.data_ptr()
    reference = _unet_out(unet)
    with torch.no_grad():
        attn.to_v.weight.mul_(2)  # written through the view into the fused matrix
    changed = _unet_out(unet)
    assert (changed - reference).abs().max() > 1e-3 * reference.abs().max()
    unfuse_qkv(unet)
    assert attn.qkv_weight is None and attn.to_q.weight.data_ptr() != attn.to_k.weight.data_ptr()
    assert_close_to_ref(_unet_out(unet), changed, rel=1e-5, what="unfused U-Net")


def test_loading_a_checkpoint_and_casting_keep_the_fused_matrix_in_step():
    source, target = tiny_components(seed=0).unet, tiny_components(seed=5).unet
    fuse_qkv(target)
    target.load_state_dict(source.state_dict())
    assert_close_to_ref(_unet_out(target), _unet_out(source), rel=1e-5, what="fused U-Net after load_state_dict")
    attn = target.middle_block[1].transformer_blocks[0].attn1
    pointer = attn.qkv_weight.data_ptr()
    target.float()  # no change: the same storage (CUDA graphs keep replaying)
    assert attn.qkv_weight.data_ptr() == pointer == attn.to_q.weight.data_ptr()
    target.double()  # a cast copies the weights apart; the layer shares them with a new fused matrix again
    assert attn.qkv_weight.dtype == torch.float64 and attn.to_k.weight.data_ptr() == attn.qkv_weight[
        attn.to_q.weight.shape[0]:].data_ptr()
    x, t, context = unet_inputs()
    with torch.no_grad():
        out = target(x.double(), t, context=context.double())
    assert_close_to_ref(out, _unet_out(source), rel=1e-5, what="fused U-Net in float64")


def test_training_through_a_fused_model_reaches_the_separate_weights():
    reference, fused = tiny_components(seed=0).unet.train(), tiny_components(seed=0).unet.train()
    fuse_qkv(fused)
    x, t, context = unet_inputs()
    for model in (reference, fused):
        model(x, t, context=context).square().mean().backward()
    attn_ref = reference.middle_block[1].transformer_blocks[0].attn1
    attn = fused.middle_block[1].transformer_blocks[0].attn1
    for name in ("to_q", "to_k", "to_v"):
        grad = getattr(attn, name).weight.grad
        assert grad is not None and grad.abs().max() > 0
        assert_close_to_ref(grad, getattr(attn_ref, name).weight.grad, rel=1e-5, what=f"{name} gradient")


def test_channels_last_gives_the_reference_output():
    unet = tiny_components().unet
    reference = _unet_out(unet)
    fast_network(unet, mode=None)  # fused + NHWC, not compiled
    assert next(p for p in unet.parameters() if p.ndim == 4).is_contiguous(memory_format=torch.channels_last)
    assert_close_to_ref(_unet_out(unet, channels_last=True), reference, rel=1e-5, what="NHWC U-Net")


@pytest.mark.slow
def test_fused_models_save_the_same_files_in_every_format(tmp_path):
    plain, fused = tiny_components(seed=3), tiny_components(seed=3)
    compile_pipeline(Pipeline(fused), mode=None)  # fused q|k|v + NHWC, in place on the parts' networks
    assert fused.unet.middle_block[1].transformer_blocks[0].attn1.qkv_weight is not None
    for name, save in (("native", save_native), ("diffusers", save_diffusers),
                       ("original.safetensors", save_original)):
        save(plain, tmp_path / f"plain-{name}")
        save(fused, tmp_path / f"fused-{name}")
        a, b = load_model(tmp_path / f"plain-{name}"), load_model(tmp_path / f"fused-{name}")
        for role in ("unet", "autoencoder", "text_encoder"):
            sa, sb = a[role].state_dict(), b[role].state_dict()
            assert list(sa) == list(sb), f"{name} {role} keys"
            assert all(torch.equal(sa[k], sb[k]) for k in sa), f"{name} {role} values"
        again = tmp_path / f"again-{name}"  # load into a fused model, save again: the same weights, bitwise
        fast_network(b.unet, mode=None)
        save(b, again)
        sc = load_model(again).unet.state_dict()
        assert all(torch.equal(sc[k], a.unet.state_dict()[k]) for k in sc), f"{name} round trip"


@pytest.mark.slow
@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
def test_the_compiled_sampling_loop_gives_the_reference_images(sampler):
    reference = Pipeline(tiny_components(seed=2))
    fast = Pipeline(tiny_components(seed=2)).compile(backend="eager")  # dynamo's graphs, run by the eager backend
    settings = reference.settings(steps=6, guidance=5.0, seed=11, sampler=sampler, height=32, width=32, n=2)
    want = sample(reference.stage, ["a red square"], settings)
    got = sample(fast.stage, ["a red square"], settings)
    assert want.shape == (2, 3, 32, 32)
    assert_close_to_ref(got, want, rel=1e-5, what=f"compiled {sampler} loop")


def test_compile_modes_and_sdpa_kernels_are_checked():
    with pytest.raises(LdmError, match="unknown compile mode"):
        fast_network(tiny_components().unet, mode="fastest")
    with pytest.raises(ValueError, match="unknown SDPA kernels"):
        set_sdpa_kernels(["flashy"])
    set_sdpa_kernels(["cudnn"])
    set_sdpa_kernels(None)
    assert build_parser().parse_args(["a cat", "--compile"]).compile == "reduce-overhead"
    assert build_parser().parse_args(["a cat", "--compile", "max-autotune"]).compile == "max-autotune"
    assert build_parser().parse_args(["a cat"]).compile is None
