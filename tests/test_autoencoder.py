"""KL autoencoder: parity with diffusers on the same weights, posterior maths, latent scaling."""
import math

import pytest
import torch
from helpers import assert_close_to_ref, realistic_weights

from ldm.errors import ConfigError
from ldm.io.keys_vae import vae_config_to_diffusers, vae_original_to_diffusers
from ldm.models.autoencoder import AutoencoderConfig, AutoencoderKL, DiagonalGaussian

TINY = AutoencoderConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, resolution=32, z_channels=4, embed_dim=4,
                         scale_factor=0.5, shift_factor=0.1)


def _perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """Random GroupNorm affine parameters too, so that a mis-mapped norm would show."""
    return realistic_weights(model).eval()


def test_parity_with_diffusers_autoencoder():
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL

    ours = _perturbed(AutoencoderKL(TINY))
    theirs = DiffusersAutoencoderKL(**{k: v for k, v in vae_config_to_diffusers(TINY).items()
                                       if not k.startswith("_")}).eval()
    theirs.load_state_dict(vae_original_to_diffusers(ours.state_dict(), TINY), strict=True)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        post, ref = ours.encode(x), theirs.encode(x).latent_dist
        assert post.mean.shape == (2, 4, 16, 16)
        assert_close_to_ref(post.mean, ref.mean)
        assert_close_to_ref(post.std, ref.std)
        z = torch.randn(2, 4, 16, 16)
        assert_close_to_ref(ours.decode(z), theirs.decode(z).sample)


def test_any_downsampling_factor_and_level_attention():
    cfg = AutoencoderConfig(ch=32, ch_mult=(1, 1, 2), num_res_blocks=1, attn_resolutions=(8,), resolution=32,
                            z_channels=3, embed_dim=2)
    model = AutoencoderKL(cfg).eval()
    assert model.downsample_factor == 4 and model.latent_channels == 2
    assert "encoder.down.2.attn.0.q.weight" in model.state_dict()  # 32 -> 16 -> 8: level 2 runs at 8 px
    assert "decoder.up.2.attn.1.proj_out.weight" in model.state_dict()
    with torch.no_grad():
        post = model.encode(torch.randn(1, 3, 32, 32))
        assert post.mean.shape == (1, 2, 8, 8)
        assert model.decode(post.mode()).shape == (1, 3, 32, 32)


def test_compvis_key_names():
    keys = set(AutoencoderKL(TINY).state_dict())
    for key in ["encoder.conv_in.weight", "encoder.down.0.block.0.norm1.weight",
                "encoder.down.1.block.0.nin_shortcut.weight", "encoder.down.0.downsample.conv.weight",
                "encoder.mid.attn_1.q.weight", "encoder.mid.block_2.conv2.bias",
                "encoder.norm_out.weight", "decoder.up.1.block.1.conv1.weight", "decoder.up.1.upsample.conv.weight",
                "decoder.up.0.block.0.nin_shortcut.weight", "quant_conv.weight", "post_quant_conv.bias"]:
        assert key in keys, key
    assert "encoder.down.1.downsample.conv.weight" not in keys
    assert AutoencoderKL(TINY).state_dict()["encoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)


def test_latent_scaling_helpers():
    model = _perturbed(AutoencoderKL(TINY))
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        mean = model.encode(x).mean
        z = model.encode_latents(x, sample=False)
        assert torch.allclose(z, (mean - 0.1) * 0.5)
        g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
        assert torch.equal(model.encode_latents(x, generator=g1), model.encode_latents(x, generator=g2))
        assert not torch.allclose(model.encode_latents(x), z)
        assert torch.allclose(model.decode_latents(z), model.decode(z / 0.5 + 0.1))
        recon, post = model(x, sample_posterior=False)
        assert torch.allclose(recon, model.decode(post.mean))


def test_diagonal_gaussian_maths():
    mean, logvar = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    post = DiagonalGaussian(torch.cat([mean, logvar], dim=1))
    q = torch.distributions.Normal(mean, torch.exp(0.5 * logvar))
    p = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    assert torch.allclose(post.kl(), torch.distributions.kl_divergence(q, p).sum((1, 2, 3)), atol=1e-5)
    s = post.sample(torch.Generator().manual_seed(0))
    assert torch.allclose(post.nll(s), -q.log_prob(s).sum((1, 2, 3)), atol=1e-4)
    assert torch.equal(post.mode(), mean)
    clamped = DiagonalGaussian(torch.cat([mean, torch.full_like(mean, 50.0)], dim=1))
    assert torch.allclose(clamped.std, torch.full_like(mean, math.exp(10.0)))
    many = DiagonalGaussian(torch.cat([torch.full((1, 1, 64, 64), 2.0), torch.full((1, 1, 64, 64), math.log(0.25))], 1))
    draw = many.sample(torch.Generator().manual_seed(1))
    assert abs(draw.mean().item() - 2.0) < 0.05 and abs(draw.std().item() - 0.5) < 0.03


def test_bad_group_count_is_a_config_error():
    with pytest.raises(ConfigError, match="norm_groups"):
        AutoencoderKL(AutoencoderConfig(ch=20, ch_mult=(1,), resolution=8))
