"""FP8 products (`ldm.models.float8`, `--fp8`, `fp8: true`): the exact product of the quantised operands, within
FP8's precision of the full product, forward and backward; the U-Net keeps its keys; the doors reach it."""
import json

import numpy as np
import pytest
import torch
from helpers import assert_close_to_ref, tiny_components, tiny_train_config, unet_inputs
from safetensors.torch import load_file
from PIL import Image
from torch import nn

from ldm.cli.txt2img import main as txt2img
from ldm.errors import LdmError
from ldm.models.float8 import (E4M3, E5M2, Float8Linear, check_fp8_device, float8_linear, from_float8, quantize,
                               to_float8, transformer_linears, uses_float8)
from ldm.pipeline.fast import fast_network
from ldm.pipeline.images import read_png_parameters
from ldm.train.loop import train
from ldm.train.model import build_parts

E4M3_MAX, E5M2_MAX = 448.0, 57344.0
PREFIX = "denoiser.network."  # the U-Net's keys inside the trainer's checkpoint


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _dequant(x, dtype):
    x8, scale = quantize(x, dtype)
    return x8.float() * scale


@pytest.mark.parametrize("dtype, top", [(E4M3, E4M3_MAX), (E5M2, E5M2_MAX)])
@pytest.mark.parametrize("magnitude", [1e-4, 1.0, 3e4])
def test_quantize_maps_the_largest_value_to_the_formats_max_and_keeps_the_rest_within_its_precision(dtype, top,
                                                                                                   magnitude):
    x = torch.randn(64, 48, generator=torch.Generator().manual_seed(0)) * magnitude
    x8, scale = quantize(x, dtype)
    assert x8.dtype == dtype and scale.dtype == torch.float32
    assert x8.float().abs().max().item() == top  # the amax lands exactly on the format's largest value
    mantissa = 3 if dtype is E4M3 else 2
    big = x.abs() > x.abs().max() / 4  # normal numbers: relative error at most half an ulp
    err = ((x8.float() * scale - x).abs() / x.abs())[big]
    assert err.max().item() <= 2.0 ** -(mantissa + 1) * 1.0001


def test_quantize_of_zeros_is_finite():
    x8, scale = quantize(torch.zeros(4, 16))
    assert torch.isfinite(x8.float()).all() and scale.item() > 0 and x8.float().abs().max() == 0


def test_the_forward_product_is_exactly_the_product_of_the_quantised_operands():
    g = torch.Generator().manual_seed(1)
    linear = nn.Linear(64, 96)
    x = torch.randn(3, 50, 64, generator=g)
    out = float8_linear(x, linear.weight, linear.bias)
    expected = _dequant(x.reshape(-1, 64), E4M3) @ _dequant(linear.weight, E4M3).t() + linear.bias
    assert out.shape == (3, 50, 96) and out.dtype == torch.float32
    assert_close_to_ref(out.reshape(-1, 96), expected, rel=1e-5, what="FP8 product")
    assert _rel(out, nn.functional.linear(x, linear.weight, linear.bias)) < 0.08  # e4m3: 3 mantissa bits


def test_the_backward_products_are_those_of_the_quantised_operands():
    g = torch.Generator().manual_seed(2)
    linear = nn.Linear(32, 48)
    linear.__class__ = Float8Linear
    x = torch.randn(48, 32, generator=g, requires_grad=True)  # 48 rows: a multiple of 16 for the FP8 reduction
    grad = torch.randn(48, 48, generator=g)
    linear(x).backward(grad)
    g8 = _dequant(grad, E5M2)
    assert_close_to_ref(x.grad, g8 @ _dequant(linear.weight, E4M3), rel=1e-5, what="input gradient")
    assert_close_to_ref(linear.weight.grad, g8.t() @ _dequant(x.detach(), E4M3), rel=1e-5, what="weight gradient")
    assert_close_to_ref(linear.bias.grad, grad.sum(0), rel=1e-6, what="bias gradient")  # the bias stays exact


def test_a_row_count_the_kernel_cannot_reduce_over_gives_the_same_weight_gradient():
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(32, 16, generator=g, requires_grad=True)
    x, grad = torch.randn(7, 16, generator=g), torch.randn(7, 32, generator=g)
    float8_linear(x, weight).backward(grad)
    expected = _dequant(grad, E5M2).t() @ _dequant(x, E4M3)
    assert_close_to_ref(weight.grad, expected, rel=1e-5, what="weight gradient over 7 rows")


def test_under_autocast_the_result_takes_autocasts_dtype_and_bf16_inputs_give_bf16():
    linear = nn.Linear(32, 32)
    linear.__class__ = Float8Linear
    x = torch.randn(8, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert linear(x).dtype == torch.bfloat16
    assert linear.to(torch.bfloat16)(x.bfloat16()).dtype == torch.bfloat16


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_to_float8_changes_only_the_transformer_linears_and_keeps_every_key_and_value(kind):
    unet = tiny_components(kind).unet
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    reference = _out(unet)
    expected = len(transformer_linears(unet))
    assert to_float8(unet) == expected > 0
    assert type(unet.time_embed[0]) is nn.Linear  # outside the transformers: untouched
    assert not transformer_linears(unet)  # every one of them is a Float8Linear now
    after = unet.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    fp8 = _out(unet)
    assert 0 < _rel(fp8, reference) < 0.15, "FP8 changes the output by FP8's precision (measured 5-8%)"
    assert from_float8(unet) == expected and not uses_float8(unet)
    assert_close_to_ref(_out(unet), reference, rel=1e-6, what="after from_float8")


def test_the_fused_qkv_product_runs_in_fp8_too():
    unet = tiny_components().unet
    reference = _out(unet)
    fast_network(unet, mode=None, channels_last=False, fp8=True)  # FP8, then q|k|v fused
    attn = unet.middle_block[1].transformer_blocks[0].attn1
    assert attn.qkv_weight is not None and type(attn.to_q) is Float8Linear
    fused_fp8 = _out(unet)
    from_float8(unet)  # the same fused model with plain products
    assert_close_to_ref(_out(unet), reference, rel=1e-5, what="fused, plain products")
    to_float8(unet)
    assert torch.equal(_out(unet), fused_fp8)
    assert 0 < _rel(fused_fp8, reference) < 0.15


def test_the_compiled_fp8_step_equals_the_eager_one():
    g = torch.Generator().manual_seed(4)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
    for layer in (model[0], model[2]):
        layer.__class__ = Float8Linear
    x = torch.randn(48, 32, generator=g)
    model(x).square().mean().backward()
    eager = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(model, backend="aot_eager", dynamic=False)
    compiled(x).square().mean().backward()
    for e, c in zip(eager, (p.grad for p in model.parameters())):
        assert_close_to_ref(c, e, rel=1e-5, what="compiled FP8 gradient")


def test_a_network_without_transformer_linears_and_an_unknown_device_are_refused():
    with pytest.raises(LdmError, match="drop --fp8"):
        to_float8(nn.Sequential(nn.Linear(32, 32)))
    with pytest.raises(LdmError, match="drop --fp8"):
        check_fp8_device("meta")


@pytest.mark.slow
def test_training_with_fp8_keeps_the_checkpoint_keys_and_moves_the_weights_as_full_precision_does(shape_shards,
                                                                                                   tmp_path):
    # Zero-initialised output layers (the U-Net's last convolution, each transformer's proj_out) let gradients
    # reach the transformer blocks from the third step on: three steps, then compare what each run changed.
    common = ["max_steps=3", "data.caption_dropout=0.0", "data.batch_size=2", "optim.warmup_steps=0",
              "optim.lr=0.001", "compile=false"]
    config = tiny_train_config(shape_shards, tmp_path / "full", *common)
    train(config)
    train(tiny_train_config(shape_shards, tmp_path / "fp8", *common, "fp8=true"))
    step = ("checkpoints", "step-000003", "model.safetensors")
    full, fp8 = load_file(tmp_path.joinpath("full", *step)), load_file(tmp_path.joinpath("fp8", *step))
    assert list(fp8) == list(full)
    torch.manual_seed(config.seed)
    initial = build_parts(config.model).unet.state_dict()
    keys = [k for k in full if k.startswith(PREFIX) and "transformer_blocks" in k]
    moved = torch.cat([(full[k] - initial[k[len(PREFIX):]]).flatten() for k in keys])
    fp8_moved = torch.cat([(fp8[k] - initial[k[len(PREFIX):]]).flatten() for k in keys])
    assert moved.abs().max() > 1e-5, "the transformer blocks were trained"
    assert not torch.equal(fp8_moved, moved), "the FP8 products ran"
    assert _rel(fp8_moved, moved) < 0.5, "and moved them as full precision does (measured 0.17 with seeds 0 and 11)"
    assert all(torch.isfinite(v).all() for v in fp8.values())


def test_the_fp8_u_nets_gradients_are_the_full_precision_ones_within_fp8s_precision():
    unet = tiny_components().unet
    with torch.no_grad():  # zero-initialised output layers would hide the transformers from the gradients
        for p in unet.parameters():
            if not p.any():
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(p.numel()))
    x, t, context = unet_inputs()
    target = torch.randn(x.shape, generator=torch.Generator().manual_seed(9))
    linears = transformer_linears(unet)

    def grads():
        unet.zero_grad()
        torch.nn.functional.mse_loss(unet(x, t, context=context), target).backward()
        return torch.cat([m.weight.grad.flatten() for m in linears])

    full = grads()
    to_float8(unet)
    fp8 = grads()
    assert full.abs().max() > 0 and _rel(fp8, full) < 0.3


def _out(unet):
    x, t, context = unet_inputs()
    with torch.no_grad():
        return unet(x, t, context=context)


def test_ldm_txt2img_fp8_runs_the_fp8_products_and_records_them(tiny_sd_folder, tmp_path):
    common = ["a red circle", "--model", str(tiny_sd_folder), "--steps", "2", "--height", "16", "--width", "16",
              "--seed", "3", "--sampler", "ddim"]
    assert txt2img(common + ["--out", str(tmp_path / "plain")]) == 0
    assert txt2img(common + ["--fp8", "--out", str(tmp_path / "fp8")]) == 0
    (plain,), (fp8,) = (_records(tmp_path / name) for name in ("plain", "fp8"))
    assert fp8["fp8"] is True and "fp8" not in plain
    assert read_png_parameters(tmp_path / "fp8" / fp8["file_name"])["fp8"] is True
    a, b = (np.asarray(Image.open(tmp_path / name / r["file_name"]), dtype=np.float32)
            for name, r in (("plain", plain), ("fp8", fp8)))
    assert not np.array_equal(a, b), "the FP8 products ran"
    assert np.abs(a - b).mean() < 0.1 * 255, "and changed the image by FP8's precision only"


def _records(folder):
    return [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]


def test_a_training_run_fp8_cannot_run_on_is_refused_before_its_folder_exists(shape_shards, tmp_path, monkeypatch):
    import ldm.train.loop as loop

    def refuse(device):
        raise LdmError(f"FP8 needs a GPU of compute capability 8.9 or more ({device}): drop --fp8")

    monkeypatch.setattr(loop, "check_fp8_device", refuse)
    with pytest.raises(LdmError, match="drop --fp8"):
        train(tiny_train_config(shape_shards, tmp_path / "run", "max_steps=1", "fp8=true", "compile=false"))
    assert not (tmp_path / "run").exists()


def test_a_stage_without_transformer_linears_runs_as_it_is_and_a_model_without_any_is_refused():
    from types import SimpleNamespace

    from ldm.pipeline.fast import compile_pipeline

    plain = nn.Sequential(nn.Conv2d(4, 16, 3), nn.SiLU())  # a pixel stage without attention
    pipe = SimpleNamespace(stages=[SimpleNamespace(unet=tiny_components().unet, codec=None),
                                   SimpleNamespace(unet=plain, codec=None)])
    compile_pipeline(pipe, mode=None, fp8=True)
    assert uses_float8(pipe.stages[0].unet) and not uses_float8(plain)
    with pytest.raises(LdmError, match="drop --fp8"):
        compile_pipeline(SimpleNamespace(stages=[SimpleNamespace(unet=nn.Sequential(nn.Conv2d(4, 16, 3)),
                                                                 codec=None)]), mode=None, fp8=True)


def test_a_training_run_whose_unet_has_no_transformer_linears_is_refused_before_its_folder_exists(shape_shards,
                                                                                                  tmp_path):
    """An Efficient U-Net without attention (no transformer blocks): fp8 has nothing to run on; nothing is written,
    and the config alone decides (the network is built on the meta device, drawing no random numbers)."""
    config = tiny_train_config(shape_shards, tmp_path / "run", "max_steps=1", "fp8=true", "compile=false")
    config.model.unet = dict(type="efficient_unet", in_channels=4, out_channels=4, model_channels=32,
                             channel_mult=[1, 2], num_res_blocks=[1, 1], attention_levels=[],
                             cross_attention_levels=[], context_dim=32, sample_size=16)
    state = torch.random.get_rng_state()
    with pytest.raises(LdmError, match="has no transformer linear layers.*set fp8: false"):
        train(config)
    assert not (tmp_path / "run").exists()
    assert torch.equal(torch.random.get_rng_state(), state)


def test_the_early_fp8_check_leaves_a_whole_pretrained_models_unet_to_to_float8(shape_shards, tmp_path):
    """`pretrained.unet` naming a model folder: that model's own U-Net config wins over `model.unet`, so the check
    from the config alone must not judge it (to_float8 does, once it is loaded)."""
    from ldm.train.loop import check_fp8_unet

    config = tiny_train_config(shape_shards, tmp_path / "run", "fp8=true")
    config.model.unet = dict(type="efficient_unet", in_channels=4, out_channels=4, model_channels=32,
                             channel_mult=[1, 2], num_res_blocks=[1, 1], attention_levels=[],
                             cross_attention_levels=[], context_dim=32, sample_size=16)
    with pytest.raises(LdmError, match="set fp8: false"):
        check_fp8_unet(config.model)
    config.model.pretrained.unet = str(tmp_path)  # a folder: a whole model
    check_fp8_unet(config.model)
