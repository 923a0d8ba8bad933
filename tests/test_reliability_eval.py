"""Hostile input to ldm-eval and ldm-fid: 16-bit and odd image modes, killed runs' temporaries, paths that leave the
folder, overwrites, non-finite or invalid settings caught before the CLIP model loads, and honest outputs."""
import ast
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from helpers import TINY_CLIP, captioned_folder, patch_everywhere, run_cli, write_images, write_tiny_sd

from ldm.cli.eval import main as eval_main
from ldm.cli.fid import main as fid_main
from ldm.errors import LdmError
from ldm.eval.clip_score import ClipModel
from ldm.eval.frechet import frechet_distance
from ldm.eval.imagefolder import list_images, load_rgb, read_metadata
from ldm.eval.report import REPORT_FILES, plot_tradeoff, write_report


@pytest.fixture(scope="module")
def clip_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("clipcfg") / "ldm-test-tiny-clip.json"
    path.write_text(json.dumps(TINY_CLIP))
    return path


def _no_clip(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the CLIP model was loaded before the settings were checked")

    patch_everywhere(monkeypatch, "ldm.eval.clip_score.ClipModel", refuse)


def _png16(path, array, color_type):
    """A 16-bit PNG written by hand (Pillow cannot write 16-bit RGB): color type 0 grey, 2 RGB, 4 grey+alpha."""
    h, w = array.shape[:2]
    raw = b"".join(b"\x00" + array[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))
    return path


GREY16 = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65520


# 10. image modes -------------------------------------------------------------------------------------------------


def test_sixteen_bit_grey_png_is_rescaled_not_clipped(tmp_path):
    Image.fromarray(GREY16).save(tmp_path / "grey16.png")  # Pillow writes (and reads) it as I;16
    assert Image.open(tmp_path / "grey16.png").mode == "I;16"
    rgb = np.asarray(load_rgb(tmp_path / "grey16.png"))
    expected = np.round(GREY16 / 257).astype(np.uint8)
    assert (rgb == 255).mean() < 0.01  # the audit saw 99.75% of the pixels at 255
    np.testing.assert_array_equal(rgb, np.repeat(expected[..., None], 3, axis=-1))


@pytest.mark.parametrize("color_type, channels", [(0, 1), (2, 3), (4, 2)])
def test_every_sixteen_bit_png_layout_matches_the_value_over_257(tmp_path, color_type, channels):
    planes = [GREY16, GREY16 // 2, 65535 - GREY16][:channels]
    if color_type == 4:
        planes = [GREY16, np.full_like(GREY16, 65535)]  # grey + opaque alpha
    path = _png16(tmp_path / "x.png", np.stack(planes, -1) if channels > 1 else GREY16, color_type)
    rgb = np.asarray(load_rgb(path)).astype(int)
    colour = planes if color_type == 2 else [GREY16] * 3
    for c in range(3):
        assert np.abs(rgb[..., c] - colour[c] / 257).max() <= 1.0  # Pillow keeps the high byte of 16-bit colour


def test_netpbm_images_are_listed_as_pytorch_fid_lists_them_and_deep_grey_is_rescaled(tmp_path):
    """pytorch-fid counts .pgm / .ppm files: ldm skipped them, so one folder gave two tools different image sets."""
    rgb = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.ppm")
    Image.fromarray(rgb[..., 0]).save(tmp_path / "b.PGM")
    deep = np.arange(64).reshape(8, 8) * 1040  # 0 .. 65520
    for name, maxval in (("c.pgm", 65535), ("d.pgm", 1023)):  # Pillow opens both as mode I scaled to 0..65535
        values = (deep * maxval // 65535).astype(">u2")
        (tmp_path / name).write_bytes(b"P5\n8 8\n%d\n" % maxval + values.tobytes())
    assert [p.name for p in list_images(tmp_path)] == ["a.ppm", "b.PGM", "c.pgm", "d.pgm"]
    np.testing.assert_array_equal(np.asarray(load_rgb(tmp_path / "a.ppm")), rgb)
    for name in ("c.pgm", "d.pgm"):
        grey = np.asarray(load_rgb(tmp_path / name)).astype(int)[..., 0]
        assert np.abs(grey - deep / 257).max() <= 1.0 and grey.max() == 255, name


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "CMYK", "L", "1"])
def test_eight_bit_modes_convert_as_pillow_does(tmp_path, mode):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).convert(mode)
    path = tmp_path / ("x.tiff" if mode == "CMYK" else "x.png")
    image.save(path)
    with Image.open(path) as reopened:
        expected = np.asarray(reopened.convert("RGB"))
    np.testing.assert_array_equal(np.asarray(load_rgb(path)), expected)


def test_float_and_32_bit_images_of_unknown_range_are_refused(tmp_path):
    Image.fromarray(np.linspace(0, 1, 256, dtype=np.float32).reshape(16, 16)).save(tmp_path / "f.tiff")
    with pytest.raises(LdmError, match=r"f.tiff: .*32-bit floating-point image \(mode F\)"):
        load_rgb(tmp_path / "f.tiff")
    Image.fromarray(np.arange(256, dtype=np.int32).reshape(16, 16) * 1000).save(tmp_path / "i.tiff")
    with pytest.raises(LdmError, match=r"32-bit integer image \(mode I\)"):
        load_rgb(tmp_path / "i.tiff")


# killed runs, overwrites, paths outside the folder ----------------------------------------------------------------


def test_hidden_temporaries_of_a_killed_run_are_not_images(tmp_path):
    folder = write_images(tmp_path / "gen", seed=0, sizes=((32, 32),) * 2)
    tmp = folder / ".00002-a-cat.png.k3j4.tmp"
    tmp.mkdir()
    (tmp / "00002-a-cat.png").write_bytes(b"")  # the 0-byte PNG a kill during an atomic write leaves
    (folder / ".hidden.png").write_bytes(b"")
    assert [p.name for p in list_images(folder, recursive=True)] == ["000.png", "001.png"]


def test_fid_recursive_ignores_a_killed_runs_temporaries(random_weights, tmp_path, capsys):  # noqa: F811
    a = write_images(tmp_path / "a" / "sub", seed=0, sizes=((32, 32),) * 3).parent
    (a / "sub" / ".00003-x.png.abc.tmp").mkdir()
    (a / "sub" / ".00003-x.png.abc.tmp" / "00003-x.png").write_bytes(b"")
    args = ["--inception-weights", random_weights, "--num-workers", "0", "--device", "cpu", "--recursive"]
    code, err = run_cli(fid_main, [a, a, *args], capsys)
    assert code == 0, err
    assert "3 images" in err


def test_fid_of_identical_statistics_is_exactly_zero_not_negative():
    for seed in range(20):  # round-off made 12 of 40 such cases negative, down to -1e-30 and below
        rng = np.random.default_rng(seed)
        x = rng.normal(size=(50, 8)) * rng.uniform(0.1, 10, size=8) + rng.normal(size=8) * 100
        mu, sigma = x.mean(0), np.cov(x, rowvar=False)
        d = frechet_distance(mu, sigma, mu, sigma)
        assert 0.0 <= d <= 1e-9 * np.trace(sigma)


def test_fid_save_stats_refuses_to_overwrite_without_the_flag(random_weights, tmp_path, capsys, monkeypatch):  # noqa: F811
    a = write_images(tmp_path / "a", seed=0, sizes=((32, 32),) * 2)
    stats = tmp_path / "a.npz"
    stats.write_bytes(b"precious")
    args = ["--inception-weights", random_weights, "--num-workers", "0", "--device", "cpu"]
    code, err = run_cli(fid_main, [a, "--save-stats", stats, *args], capsys)
    assert code == 2 and f"--save-stats {stats} exists; pass --overwrite" in err
    assert stats.read_bytes() == b"precious"
    code, err = run_cli(fid_main, [a, "--save-stats", stats / "x.npz", *args], capsys)
    assert code == 2 and "is a file, so no folder can be made there" in err
    code, err = run_cli(fid_main, [a, "--save-stats", stats, "--overwrite", *args], capsys)
    assert code == 0, err
    assert np.load(stats)["mu"].shape == (2048,)


def test_fid_refuses_statistics_that_are_not_a_covariance_or_not_an_npz(tmp_path, capsys):
    good, n = tmp_path / "good.npz", 8
    np.savez(good, mu=np.zeros(n), sigma=np.eye(n))
    nan_mu = np.zeros(n)
    nan_mu[3] = np.nan
    bad = {"nan.npz": ("savez", dict(mu=nan_mu, sigma=np.eye(n)), "holds NaN or infinite values"),
           "asym.npz": ("savez", dict(mu=np.zeros(n), sigma=np.triu(np.ones((n, n)))), "sigma is not symmetric"),
           "npy.npz": ("save", np.zeros(n), "not a .npz archive"),
           "cut.npz": ("bytes", good.read_bytes()[:200], "not a .npz archive")}
    for name, (how, content, message) in bad.items():
        path = tmp_path / name
        if how == "savez":
            np.savez(path, **content)
        elif how == "save":
            with open(path, "wb") as f:
                np.save(f, content)
        else:
            path.write_bytes(content)
        code, err = run_cli(fid_main, [good, path], capsys)
        assert code == 2 and message in err and "Traceback" not in err, (name, err)
    code, err = run_cli(fid_main, [good, good], capsys)
    assert code == 0, err  # the good file itself passes


def test_fid_and_eval_check_workers_stats_name_and_image_count_before_loading_a_network(tmp_path, capsys, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("Inception was loaded before the arguments were checked")

    patch_everywhere(monkeypatch, "ldm.eval.inception.InceptionExtractor", refuse)
    two = write_images(tmp_path / "two", seed=0, sizes=((32, 32),) * 2)
    one = write_images(tmp_path / "one", seed=1, sizes=((32, 32),))
    for argv, message in (([two, two, "--num-workers", "-1"], "--num-workers must be 0"),
                          ([two, "--save-stats", tmp_path / "stats"], "name the statistics file *.npz"),
                          ([one, two], "one image; FID needs at least 2")):
        code, err = run_cli(fid_main, argv, capsys)
        assert code == 2 and message in err, err
    patch_everywhere(monkeypatch, "ldm.eval.clip_score.ClipModel", refuse)
    for argv, message in ((["--num-workers", "-1"], "--num-workers must be 0"),
                          (["--ref", tmp_path / "nope.npz"], "nope.npz: no such folder of reference images or .npz")):
        code, err = run_cli(eval_main, ["--images", two, *argv, "--out", tmp_path / "eval"], capsys)
        assert code == 2 and message in err and not (tmp_path / "eval").exists(), err
    assert not (tmp_path / "stats").exists()


def test_eval_sets_too_small_for_the_metrics_are_named_before_clip_loads(tmp_path, capsys, monkeypatch):
    """One image cannot make a covariance, nor four-or-fewer a k=3 precision / recall: said up front, naming the set
    (it was 'a covariance needs at least 2 images, got 1', after the CLIP model had loaded and scored)."""
    def refuse(*args, **kwargs):
        raise AssertionError("CLIP was loaded before the set sizes were checked")

    patch_everywhere(monkeypatch, "ldm.eval.clip_score.ClipModel", refuse)
    one = captioned_folder(tmp_path / "one", ["a cat"])
    four = captioned_folder(tmp_path / "four", ["a cat", "a dog", "a cow", "a hen"], seed=1)
    three = captioned_folder(tmp_path / "three", ["a cat", "a dog", "a cow"], seed=5)
    for argv, message in (([one, "--ref", four], f"--images {one}: 1 image(s); a Frechet distance"),
                          ([four, "--ref", one], f"--ref {one}: 1 image(s)"),
                          ([four, "--ref", one, "--kid"], f"--ref {one}: 1 image(s)"),
                          ([four, "--ref", three, "--precision-recall"], f"--ref {three}: 3 image(s); precision"),
                          ([four, "--ref", one, "--distance", "fd_clip"], "leave out --ref")):
        code, err = run_cli(eval_main, ["--images", *argv, "--out", tmp_path / "eval"], capsys)
        assert code == 2 and message in err and not (tmp_path / "eval").exists(), (argv, err)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n")
    code, err = run_cli(eval_main, ["--model", tmp_path / "no-model", "--prompts", prompts, "--ref", four,
                                    "--out", tmp_path / "eval"], capsys)
    assert code == 2 and "(1 prompts x --n-per-prompt 1): 1 image(s)" in err, err


def test_eval_takes_reference_images_from_subfolders_as_its_error_says(tmp_path, clip_config, capsys):
    """'no images found ... use --recursive for subfolders' named a flag ldm-eval did not have (argparse refused it)."""
    captioned_folder(tmp_path / "gen", ["a cat", "a dog"])
    for sub in ("x", "y"):
        write_images(tmp_path / "ref" / sub, seed=len(sub), sizes=((16, 16),) * 2)
    argv = ["--images", tmp_path / "gen", "--ref", tmp_path / "ref", "--distance", "fd_clip", "--out", tmp_path / "o",
            "--clip-model", clip_config, "--clip-pretrained", "none"]
    code, err = run_cli(eval_main, argv, capsys)
    assert code == 2 and "use --recursive for subfolders" in err, err
    code, err = run_cli(eval_main, [*argv, "--recursive"], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert f"FD_CLIP against {tmp_path / 'ref'} (4 images)" in report["protocol"] and report["fd_clip"] > 0


@pytest.mark.parametrize("name", ["../outside.png", "sub/../../outside.png", "/etc/hostname"])
def test_metadata_cannot_read_files_outside_the_folder(tmp_path, name):
    folder = captioned_folder(tmp_path / "imgs", ["a"])
    write_images(tmp_path, seed=1, sizes=((32, 32),))
    (tmp_path / "000.png").rename(tmp_path / "outside.png")
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": name, "text": "x"}) + "\n")
    with pytest.raises(LdmError, match=r"metadata.jsonl:1: file_name .* points outside"):
        read_metadata(folder)


def test_metadata_may_name_a_symlink_inside_the_folder(tmp_path):
    folder = captioned_folder(tmp_path / "imgs", ["a"])
    (folder / "link.png").symlink_to(folder / "img 0.png")
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "link.png", "text": "a"}) + "\n")
    assert [r.path.name for r in read_metadata(folder)] == ["link.png"]


# ldm-eval: input checked before the CLIP model loads --------------------------------------------------------------


def test_eval_non_utf8_metadata_and_prompts_name_file_and_line(tmp_path, clip_config, capsys, monkeypatch):
    _no_clip(monkeypatch)
    folder = captioned_folder(tmp_path / "imgs", ["a", "b"])
    meta = folder / "metadata.jsonl"
    meta.write_bytes(meta.read_bytes() + b'{"file_name": "img 0.png", "text": "caf\xe9"}\n')
    code, err = run_cli(eval_main, ["--images", folder, "--clip-model", clip_config, "--clip-pretrained", "none",
                                 "--out", tmp_path / "out"], capsys)
    assert code == 2 and f"{meta}:3: metadata.jsonl is not UTF-8 text (byte 0xe9" in err
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"a cat\n\x00\x01\x02\xff")
    code, err = run_cli(eval_main, ["--model", "m", "--prompts", prompts, "--clip-pretrained", "none",
                                 "--out", tmp_path / "out"], capsys)
    assert code == 2 and f"{prompts}:2: prompt set is a binary file, not text" in err


@pytest.mark.parametrize("argv, message", [
    (["--guidance", "nan"], "--guidance: 'nan' is not a finite number"),
    (["--guidance", "3,inf"], "--guidance: 'inf' is not a finite number"),
    (["--samplers", "euler,plms"], "unknown sampler 'plms'"),
    (["--steps", "0"], "--steps must be a positive number"),
    (["--height", "18"], "--height 18 is not a positive multiple"),
    (["--height", "100000", "--width", "100000"], "needs about"),
])
def test_eval_model_settings_are_checked_before_clip_loads_and_nothing_is_left(
    tmp_path_factory, tmp_path, capsys, monkeypatch, argv, message
):
    model = write_tiny_sd(tmp_path / "model")
    _no_clip(monkeypatch)
    out = tmp_path / "eval"
    code, err = run_cli(eval_main, ["--model", model, "--prompts", "ldm_eval_v1", "--steps", "2", "--height", "16",
                                 "--width", "16", "--clip-pretrained", "none", *argv, "--out", out], capsys)
    assert code == 2 and message in err, err
    assert not out.exists()  # no empty samples/ left behind


@pytest.mark.parametrize("argv, message", [
    (["--guidance", "3,-1"], "--guidance -1 is negative: a guidance scale is 0 or more, and the smallest meaningful "
                             "values are 0 and 1"),
    (["--guidance", "1", "-7.5"], "--guidance -7.5 is negative"),
    # no --samplers: the sweep's sampler is the model's own, so the model used to load before the option was checked
    (["--sampler-option", "eta=-1"], "sampler option eta=-1 is out of range: eta lies in [0, inf)"),
    (["--samplers", "euler_a", "--sampler-option", "s_noise=-0.5"], "sampler option s_noise=-0.5 is out of range"),
], ids=["guidance-list", "guidance-values", "eta-without-samplers", "s_noise"])
def test_eval_negative_guidance_and_sampler_option_values_exit_2_before_the_model_loads(tmp_path, capsys, monkeypatch,
                                                                                         argv, message):
    _no_clip(monkeypatch)

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    patch_everywhere(monkeypatch, "ldm.pipeline.load.load_pipeline", refuse)
    out = tmp_path / "eval"
    code, err = run_cli(eval_main, ["--model", "default", "--prompts", "ldm_eval_v1", "--clip-pretrained", "none",
                                 *argv, "--out", out], capsys)
    assert code == 2 and err.startswith(f"error: {message}"), err
    assert not out.exists()


def test_eval_out_that_is_a_file_or_under_a_file_exits_2(tmp_path, clip_config, capsys, monkeypatch):
    _no_clip(monkeypatch)
    folder = captioned_folder(tmp_path / "imgs", ["a"])
    existing = tmp_path / "existing_file"
    existing.write_text("keep")
    for out, message in ((existing, "is a file, not a folder"), (existing / "x", "is a file, so no folder")):
        code, err = run_cli(eval_main, ["--images", folder, "--clip-model", clip_config, "--clip-pretrained", "none",
                                     "--out", out], capsys)
        assert code == 2 and message in err
    assert existing.read_text() == "keep"


# honest outputs, library manners ---------------------------------------------------------------------------------


def _red_pixels(path: Path) -> int:
    rgb = np.asarray(Image.open(path).convert("RGB")).astype(int)
    return int(((rgb[..., 0] > 200) & (rgb[..., 1] < 60) & (rgb[..., 2] < 60)).sum())


def test_tradeoff_plot_carries_the_random_weights_warning(tmp_path):
    runs = [{"settings": {"sampler": "euler", "steps": 4, "guidance": g}, "clip_score": 20 + g, "n_images": 2}
            for g in (1.0, 3.0)]
    plain = plot_tradeoff(tmp_path / "plain", runs) if (tmp_path / "plain").mkdir() is None else None
    warned = plot_tradeoff(tmp_path, runs, warning="RANDOM CLIP weights: scores are meaningless")
    assert _red_pixels(plain) == 0  # one blue line
    assert _red_pixels(warned) > 500  # the red banner text and frame


def test_a_report_that_fails_midway_never_leaves_old_and_new_files_side_by_side(tmp_path, clip_config, capsys,
                                                                                  monkeypatch):
    """report.json, index.html and tradeoff.png were each atomic but not one unit: a plot that raised left a new
    report.json beside the old tradeoff.png."""
    from matplotlib.figure import Figure

    out = tmp_path / "out"
    argv = ["--clip-model", clip_config, "--clip-pretrained", "none", "--out", out, "--device", "cpu"]
    code, err = run_cli(eval_main, ["--images", captioned_folder(tmp_path / "a", ["a cat", "a dog"]), *argv], capsys)
    assert code == 0, err
    old = {name: (out / name).read_bytes() for name in REPORT_FILES}
    # a re-run on other images whose plot fails: the previous report stays, whole
    with monkeypatch.context() as m:
        m.setattr(Figure, "savefig", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("the plot broke")))
        with pytest.raises(RuntimeError, match="the plot broke"):
            eval_main(list(map(str, ["--images", captioned_folder(tmp_path / "b", ["a red cube", "a ball"], 7),
                                     *argv])))
    assert {name: (out / name).read_bytes() for name in REPORT_FILES} == old
    assert sorted(p.name for p in out.iterdir()) == sorted(REPORT_FILES)  # no staging folder left behind
    # interrupted while the new files go in (after the first rename): none of the old files is left, no report.json
    report = json.loads(old["report.json"])
    report["runs"][0]["clip_score"] += 1.0
    real_replace, calls = os.replace, []

    def replace_once(src, dst):
        if calls:
            raise OSError("interrupted")
        calls.append(dst)
        real_replace(src, dst)

    with monkeypatch.context() as m:
        m.setattr("ldm.eval.report.os.replace", replace_once)
        with pytest.raises(OSError, match="interrupted"):
            write_report(out, report)
    assert sorted(p.name for p in out.iterdir()) == ["tradeoff.png"] and calls == [out / "tradeoff.png"]
    assert (out / "tradeoff.png").read_bytes() != old["tradeoff.png"]
    # and uninterrupted, the whole new report
    write_report(out, report)
    assert json.loads((out / "report.json").read_text())["runs"][0]["clip_score"] == report["runs"][0]["clip_score"]
    assert sorted(p.name for p in out.iterdir()) == sorted(REPORT_FILES)


def test_random_clip_weights_are_reproducible_without_touching_the_global_rng(clip_config):
    state = torch.get_rng_state()
    torch.manual_seed(1)
    a = ClipModel(str(clip_config), "none")
    after_a = torch.get_rng_state()
    torch.manual_seed(2)
    b = ClipModel(str(clip_config), "none")
    for (name, pa), pb in zip(a.net.named_parameters(), b.net.parameters()):
        assert torch.equal(pa, pb), name  # the same weights whatever the global seed
    torch.manual_seed(1)
    assert torch.equal(torch.get_rng_state(), after_a)  # building the model drew nothing from the global RNG
    ln = a.net.ln_final.weight
    assert torch.equal(ln, torch.ones_like(ln))  # constant tensors stay constant (realistic scale, not N(0, 1))
    torch.set_rng_state(state)


@pytest.mark.gpu
def test_building_random_clip_leaves_the_cuda_rng_alone(clip_config):
    # torch.manual_seed also seeds every GPU, which fork_rng(devices=[]) does not restore: the old code reseeded it
    torch.cuda.manual_seed_all(123)
    state = torch.cuda.get_rng_state()
    ClipModel(str(clip_config), "none")
    assert torch.equal(torch.cuda.get_rng_state(), state)


def _calls_in(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call):
            names.add(ast.unparse(node.func))
    return names


def test_eval_library_neither_prints_nor_reseeds_the_global_rng():
    import ldm.eval

    for path in Path(ldm.eval.__file__).parent.glob("*.py"):
        calls = _calls_in(path)
        assert "print" not in calls, f"{path.name} prints: warn through `warnings` or `logging`"
        assert not calls & {"torch.manual_seed", "torch.random.manual_seed", "np.random.seed", "random.seed"}, path


def test_eval_reuse_samples_needs_no_model_when_every_setting_exists(tmp_path, clip_config, capsys, monkeypatch):
    model = write_tiny_sd(tmp_path / "model")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    # every sweep axis given: one left out is the model's own default, which needs the model loaded to be known
    argv = ["--model", model, "--prompts", prompts, "--samplers", "euler", "--steps", "2", "--guidance", "7.5",
            "--height", "16", "--width", "16", "--clip-model", clip_config, "--clip-pretrained", "none",
            "--out", tmp_path / "eval"]
    code, err = run_cli(eval_main, argv, capsys)
    assert code == 0, err

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded although every setting's samples exist")

    patch_everywhere(monkeypatch, "ldm.pipeline.load.load_pipeline", refuse)
    code, err = run_cli(eval_main, [*argv, "--reuse-samples"], capsys)
    assert code == 0, err
    assert "generating" not in err
