"""The profile's kernel kinds (`ldm.bench.profile.kind_of`) on the kernel names an H200 run reported (run 5)."""
import pytest

from ldm.bench.profile import KINDS, kind_of


@pytest.mark.parametrize("kernel, kind", [
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x64_4x1x1_cga1x1x1_kernel0_0",
     "attention"),
    ("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x64x64_warpgroupsize1x1x1_g1_"
     "execute_segment", "convolution"),
    ("nvjet_sm90_tst_168x128_64x5_1x2_h_bz_coopA_bias_TNN", "matrix product"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "matrix product"),
    ("triton_red_fused_native_group_norm_silu_12", "normalisation"),
    ("triton_poi_fused_gelu_mul_split_view_16", "fused (triton)"),
    ("triton_poi_fused_convolution_add_3", "fused (triton)"),  # the work after a convolution, not the convolution
    # inductor's templates (max-autotune's winners) are the product or convolution itself, epilogue fused in
    ("triton_tem_fused_mm_7", "matrix product"),
    ("triton_tem_fused_addmm_gelu_3", "matrix product"),
    ("triton_tem_fused_convolution_add_5", "convolution"),
    ("triton_tem_fused_flex_attention_0", "attention"),
    ("void at::native::elementwise_kernel<128, 2>(copy_kernel)", "copy / layout"),
    ("some_unknown_kernel", "other"),
])
def test_each_kernel_name_gets_its_kind(kernel, kind):
    assert kind_of(kernel) == kind


def test_the_kinds_are_distinct_and_other_is_the_fallback():
    names = [kind for kind, _ in KINDS]
    assert len(names) == len(set(names)) and "other" not in names
