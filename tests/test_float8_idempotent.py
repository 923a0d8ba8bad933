"""FP8 twice (`to_float8`, `Pipeline.compile(fp8=True)` on a network already FP8, e.g. a compiled pipeline's stage
reused in a cascade) keeps the network as it is, instead of claiming it has no transformer linears."""
import torch
from helpers import assert_close_to_ref, tiny_components, unet_inputs

from ldm.models.float8 import Float8Linear, to_float8, transformer_linears, uses_float8
from ldm.pipeline.fast import fast_network


def _out(unet):
    x, t, context = unet_inputs()
    with torch.no_grad():
        return unet(x, t, context=context)


def test_to_float8_on_an_fp8_network_changes_nothing_and_says_so():
    unet = tiny_components().unet
    converted = len(transformer_linears(unet))
    assert to_float8(unet) == converted > 0
    first = _out(unet)
    assert to_float8(unet) == 0  # nothing left to change
    assert sum(type(m) is Float8Linear for m in unet.modules()) == converted
    assert torch.equal(_out(unet), first)


def test_the_fast_path_with_fp8_twice_runs_the_same_products():
    unet = tiny_components().unet
    fast_network(unet, mode=None, channels_last=False, fp8=True)
    first = _out(unet)
    fast_network(unet, mode=None, channels_last=False, fp8=True)
    assert uses_float8(unet)
    assert_close_to_ref(_out(unet), first, rel=1e-6, what="FP8 fast path applied twice")
