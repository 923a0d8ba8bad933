"""Reading inductor's autotune log (`ldm.bench.autotune`) on blocks copied from an H200 run (run 7)."""
from ldm.bench.autotune import autotune_blocks, autotune_summary

LOG = """measured peak: 769 TFLOP/s (bf16 8192^3 matmul)
Autotune Choices Stats:
{"num_choices": 18, "num_triton_choices": 17, "best_kernel": "triton_convolution2d_566", "best_time": 0.0203}
AUTOTUNE convolution(2x320x64x64, 320x320x3x3)
strides: [1310720, 1, 20480, 320], [2880, 1, 960, 320]
dtypes: torch.bfloat16, torch.bfloat16
  triton_convolution2d_566 0.0203 ms 100.0% ALLOW_TF32=False, BLOCK_K=128, BLOCK_M=64, BLOCK_N=128, GROUPS=1
  triton_convolution2d_561 0.0210 ms 96.9% ALLOW_TF32=False, BLOCK_K=64, BLOCK_M=128, BLOCK_N=64, GROUPS=1
  convolution 0.0447 ms 45.4% 
  triton_convolution2d_564 0.0449 ms 45.2% ALLOW_TF32=False, BLOCK_K=128, BLOCK_M=128, BLOCK_N=128, GROUPS=1
SingleProcess AUTOTUNE benchmarking takes 9.1935 seconds and 0.0002 seconds precompiling for 18 choices
Autotune Choices Stats:
{"num_choices": 20, "num_triton_choices": 18, "best_kernel": "triton_mm_137", "best_time": 0.0167}
AUTOTUNE mm(8192x320, 320x960)
strides: [320, 1], [1, 320]
dtypes: torch.bfloat16, torch.bfloat16
  triton_mm_137 0.0167 ms 100.0% ACC_TYPE='tl.float32', ALLOW_TF32=True, BLOCK_K=64, BLOCK_M=64, BLOCK_N=128
  triton_mm_131 0.0170 ms 98.2% ACC_TYPE='tl.float32', ALLOW_TF32=True, BLOCK_K=32, BLOCK_M=64, BLOCK_N=64
SingleProcess AUTOTUNE benchmarking takes 5.6296 seconds and 0.0003 seconds precompiling for 20 choices
AUTOTUNE convolution(2x1280x16x16, 1280x1280x3x3)
strides: [327680, 1, 20480, 1280], [11520, 1, 3840, 1280]
dtypes: torch.bfloat16, torch.bfloat16
  convolution 0.0502 ms 100.0% 
  triton_convolution2d_1648 0.0537 ms 93.5% ALLOW_TF32=False, BLOCK_K=128, BLOCK_M=64, BLOCK_N=128
E1130 00:48:03.149000 2493 torch/_inductor/select_algorithm.py:3924] [0/0] Runtime error during autotuning:
"""


def test_each_block_keeps_its_shapes_choices_and_the_extern_kernels_time():
    blocks = autotune_blocks(LOG)
    assert [b["op"] for b in blocks] == ["convolution", "mm", "convolution"]
    conv, mm, conv_big = blocks
    assert conv["shapes"] == "2x320x64x64, 320x320x3x3"
    assert conv["strides"] == "[1310720, 1, 20480, 320], [2880, 1, 960, 320]"
    assert [name for name, _ in conv["choices"]] == ["triton_convolution2d_566", "triton_convolution2d_561",
                                                     "convolution", "triton_convolution2d_564"]
    assert conv["best"] == ("triton_convolution2d_566", 0.0203)
    assert conv["extern_ms"] == 0.0447
    assert abs(conv["speedup"] - 0.0447 / 0.0203) < 1e-12
    assert mm["extern_ms"] is None and mm["speedup"] is None  # cuBLAS slower than every choice listed
    assert conv_big["best"] == ("convolution", 0.0502) and conv_big["speedup"] == 1.0


def test_the_summary_counts_the_winners_and_sums_only_listed_extern_times():
    summary = autotune_summary(autotune_blocks(LOG))
    assert summary["blocks"] == 3 and summary["triton_won"] == 2 and summary["extern_listed"] == 2
    assert summary["extern_ms_listed"] == round(0.0447 + 0.0502, 4)
    assert summary["best_ms_listed"] == round(0.0203 + 0.0502, 4)
    assert summary["by_op"] == {"convolution": 2, "mm": 1}


def test_a_log_without_autotuning_gives_nothing():
    assert autotune_blocks("lever: {}\nSingleProcess AUTOTUNE benchmarking takes 1 seconds\n") == []
    assert autotune_summary([])["blocks"] == 0


def test_a_warning_inside_a_block_a_generated_split_k_choice_and_a_zero_time_are_read_right():
    """decompose_k's split-K subgraph is inductor's, not the library's; a line from another thread does not end the
    block; a choice timed 0 (inductor's DIVIDED BY ZERO line) gives no speedup instead of raising."""
    log = """AUTOTUNE mm(320x65536, 65536x320)
strides: [1, 320], [320, 1]
dtypes: torch.bfloat16, torch.bfloat16
  decompose_k_mm_8_split 0.0300 ms 100.0% k_split=8
W1130 00:48:03.149000 2493 torch/_inductor/some_module.py:1] [0/0] a warning from another thread
  mm 0.0600 ms 50.0% 
  triton_mm_12 0.0700 ms 42.9% ACC_TYPE='tl.float32'
SingleProcess AUTOTUNE benchmarking takes 1.0 seconds and 0.0 seconds precompiling for 3 choices
AUTOTUNE addmm(64x64, 64x64, 64x64)
strides: [64, 1], [64, 1], [64, 1]
dtypes: torch.bfloat16, torch.bfloat16, torch.bfloat16
  bias_addmm 0.0000 ms <DIVIDED BY ZERO ERROR>
  addmm 0.0100 ms 0.0% 
"""
    split_k, zero = autotune_blocks(log)
    assert [name for name, _ in split_k["choices"]] == ["decompose_k_mm_8_split", "mm", "triton_mm_12"]
    assert split_k["extern_ms"] == 0.06 and split_k["speedup"] == 2.0
    assert zero["extern_ms"] == 0.0 and zero["speedup"] is None
    assert autotune_summary([split_k, zero])["triton_won"] == 1


def _cache_file(tmp_path):
    """An inductor local autotune cache laid out as the H200 run's (run 8): pad_mm's flat entries beside
    op -> inputs -> precision -> choice -> ms."""
    import json

    cache = {"system": {"hash": "c33f"}, "cache": {
        "base mm time: ((torch.Size([154, 768]), ...))": 0.0051,
        "((torch.Size([154, 768]), ...), 'exclude_pad:False')": 0.0049,
        "addmm": {"((2, 1280), ...)": {"high": {"a": 0.01, "b": 0.02}},
                  "((512, 1280), ...)": {"high": {"a": 0.03}}},
        "convolution": {"((2, 320, 64, 64), ...)": {"high": {"c": 0.02}}},
        "mm": {}}}
    path = tmp_path / "c33f"
    path.write_text(json.dumps(cache))
    return path


def test_the_cache_counter_counts_tuned_shapes_not_pad_mms_flat_entries(tmp_path, capsys):
    import json

    from ldm.bench.autotune import main, tuned_shapes

    path = _cache_file(tmp_path)
    assert tuned_shapes(json.loads(path.read_text())) == 3
    assert tuned_shapes({}) == 0
    main(["--count-cache", str(path), str(path)])
    assert capsys.readouterr().out.strip() == "6"


def test_the_reader_prints_one_line_per_block_then_a_summary(tmp_path, capsys):
    import json

    from ldm.bench.autotune import main

    log = tmp_path / "perf.log"
    log.write_text(LOG)
    main([str(log)])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line.get("op") for line in lines[:3]] == ["convolution", "mm", "convolution"]
    assert lines[0]["speedup"] == round(0.0447 / 0.0203, 3)
    assert lines[-1]["summary"]["blocks"] == 3
