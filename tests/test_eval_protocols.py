"""The protocols of papers' evaluations: caption files (.tsv), statistics files other FID tools read and write, the
resizer to Inception's 299 px, the one-line protocol statement; and bad input refused before any generation."""
import json
from collections import Counter

import numpy as np
import pytest
import torch
from helpers import captioned_folder, run_cli, write_images
from PIL import Image

from ldm.cli.eval import main
from ldm.cli.fid import main as fid_main
from ldm.errors import LdmError
from ldm.eval.frechet import GaussianStats, load_stats, save_stats
from ldm.eval.imagefolder import describe_sizes
from ldm.eval.inception import EXTRACTOR_NAME, InceptionExtractor
from ldm.eval.prompts import Prompt, load_prompts
from ldm.pipeline.pipeline import Pipeline


def _gen_argv(model, clip, prompts, out, *extra):
    return ["--model", str(model), "--prompts", str(prompts), "--samplers", "ddim", "--steps", "2", "--guidance", "3",
            "--height", "16", "--width", "16", "--clip-model", str(clip), "--clip-pretrained", "none",
            "--out", str(out), *map(str, extra)]


def test_tsv_prompts_take_the_caption_column(tmp_path):
    path = tmp_path / "coco.tsv"
    path.write_text("image_id\tcaption\tcategory\n1\tA man riding a horse.\tanimals\n\n2\t  two cats  \t\n")
    assert load_prompts(path) == [Prompt("A man riding a horse.", "animals"), Prompt("two cats")]


@pytest.mark.parametrize("text, message", [
    ("image_id\tcaption\n", "header but no captions"),
    ("image_id\turl\n1\thttp://x\n", "no caption column in the header (image_id, url)"),
    ("caption\n\t\n1\n", None),
])
def test_tsv_without_captions_is_an_error(tmp_path, text, message):
    path = tmp_path / "p.tsv"
    path.write_text(text)
    if message is None:  # a row whose caption is blank is named by its line
        path.write_text("id\tcaption\n7\t \n")
        message = "p.tsv:2: no caption in column 2"
    with pytest.raises(LdmError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_prompts(path)


def test_a_prompt_file_without_captions_fails_before_the_model_loads(tiny_clip_config, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("# only a comment\n\n")
    code, err = run_cli(main, _gen_argv(tmp_path / "no-model-here", tiny_clip_config, prompts, tmp_path / "o"), capsys)
    assert code == 2 and "holds no captions" in err
    assert not (tmp_path / "o" / "samples").exists()


def test_saved_statistics_read_as_pytorch_fid_and_clean_fid_read_them(tmp_path):
    stats = GaussianStats(mu=np.arange(3.0), sigma=np.diag([1.0, 2.0, 3.0]), n=5, extractor=EXTRACTOR_NAME)
    save_stats(tmp_path / "ours.npz", stats)
    with np.load(tmp_path / "ours.npz") as f:  # pytorch-fid: f["mu"][:], f["sigma"][:]; clean-fid: the same keys
        np.testing.assert_array_equal(f["mu"][:], stats.mu)
        np.testing.assert_array_equal(f["sigma"][:], stats.sigma)
    # theirs: float32 or float64 mu and sigma only (clean-fid's downloadable stats files hold just these)
    np.savez(tmp_path / "theirs.npz", mu=np.ones(3, np.float32), sigma=np.eye(3, dtype=np.float32))
    back = load_stats(tmp_path / "theirs.npz")
    assert back.mu.dtype == np.float64 and back.sigma.tolist() == np.eye(3).tolist() and back.extractor == ""


@pytest.mark.slow
def test_the_resizer_is_configurable_and_named_in_the_statistics(random_weights, tmp_path, capsys):
    tf = InceptionExtractor(random_weights)
    pil = InceptionExtractor(random_weights, resizer="pil-bicubic")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 40, 3), dtype=np.uint8))
    assert tuple(tf.prepare(image).shape) == (3, 32, 40)  # the network's own TF1 bilinear resize follows
    assert tuple(pil.prepare(image).shape) == (3, 299, 299) and pil.prepare(image).dtype == torch.uint8
    assert (tf.name, pil.name) == (EXTRACTOR_NAME, EXTRACTOR_NAME + "+pil-bicubic")
    assert not torch.equal(tf(tf.prepare(image)[None]), pil(pil.prepare(image)[None]))
    with pytest.raises(LdmError, match="unknown resizer"):
        InceptionExtractor(random_weights, resizer="nearest")
    folder = write_images(tmp_path / "a", seed=0)
    args = ["--inception-weights", str(random_weights), "--num-workers", "0", "--device", "cpu"]
    assert fid_main([str(folder), "--save-stats", str(tmp_path / "a.npz"), "--resizer", "pil-bicubic", *args]) == 0
    assert load_stats(tmp_path / "a.npz").extractor == EXTRACTOR_NAME + "+pil-bicubic"
    # statistics of one resizer are not compared with features of the other
    code, err = run_cli(fid_main, [str(tmp_path / "a.npz"), str(folder), *args], capsys)
    assert code == 2 and "+pil-bicubic'" in err and "--resizer tf-bilinear" in err


@pytest.mark.slow
def test_the_report_states_the_protocol_in_one_line(random_weights, tiny_clip_config, tmp_path):
    images = captioned_folder(tmp_path / "gen", ["a red circle", "a blue square", "a cat", "a dog"], seed=0)
    ref = write_images(tmp_path / "ref", seed=1, sizes=((32, 32),) * 4)
    out = tmp_path / "out"
    assert main(["--images", str(images), "--ref", str(ref), "--inception-weights", str(random_weights),
                 "--clip-model", str(tiny_clip_config), "--clip-pretrained", "none", "--out", str(out),
                 "--device", "cpu", "--kid", "--precision-recall"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["protocol"] == (f"4 images at 32x32; FID against {ref} (4 images); features {EXTRACTOR_NAME}, "
                                  "resizer tf-bilinear to 299; CLIP score with clip:ldm-test-tiny-clip:none")
    assert report["resizer"] == "tf-bilinear" and report["fid"] > 0
    pr = report["precision_recall"]
    assert pr["k"] == 3 and 0.0 <= pr["precision"] <= 1.0 and 0.0 <= pr["recall"] <= 1.0
    assert report["protocol"] in (out / "index.html").read_text()


def test_the_protocol_line_states_every_size_of_a_mixed_folder(tiny_clip_config, tmp_path, capsys):
    """It said "4 images at 16x24" for a folder of one 16x24 and three 32x32 images: the first image's size only."""
    folder = write_images(tmp_path / "gen", seed=0, sizes=((16, 24), (32, 32), (32, 32), (32, 32)))
    (folder / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"{i:03d}.png", "text": t}) + "\n"
                                                   for i, t in enumerate(["a", "b", "c", "d"])))
    out = tmp_path / "out"
    code, err = run_cli(main, ["--images", folder, "--clip-model", tiny_clip_config, "--clip-pretrained", "none",
                               "--out", out, "--device", "cpu"], capsys)
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    line = "4 images, sizes: 32x32 (3), 16x24 (1); CLIP score with clip:ldm-test-tiny-clip:none"
    assert report["protocol"] == report["runs"][0]["protocol"] == line
    assert f"protocol: {line}" in err and line in (out / "index.html").read_text()


def test_image_sizes_are_described_whole():
    assert describe_sizes(Counter({(512, 512): 30})) == "30 images at 512x512"
    assert describe_sizes(Counter({(256, 256): 2, (512, 512): 10})) == "12 images, sizes: 512x512 (10), 256x256 (2)"
    many = Counter({(256 + 64 * i, 192 + 32 * i): 1 for i in range(6)})
    many[(512, 512)] = 30
    assert describe_sizes(many) == ("36 images in 7 sizes, widths 256-576, heights 192-512, "
                                    "most often 512x512 (30)")


def test_a_reference_of_another_dimension_fails_before_generating(tiny_sd_folder, tiny_clip_config, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\na blue square\n")  # two images: a covariance (one is refused first)
    ref = tmp_path / "clip_stats.npz"  # CLIP-space statistics, but 7-d: the tiny CLIP's image features are 16-d
    save_stats(ref, GaussianStats(mu=np.zeros(7), sigma=np.eye(7), n=10, extractor="clip:ldm-test-tiny-clip:none"))
    out = tmp_path / "o"
    code, err = run_cli(main, _gen_argv(tiny_sd_folder, tiny_clip_config, prompts, out, "--ref", ref, "--distance",
                                        "fd_clip"), capsys)
    assert code == 2 and "7-d statistics" in err and "(16-d)" in err
    assert not list((out / "samples").rglob("*.png")) if (out / "samples").exists() else True


def test_a_batch_size_that_cannot_fit_is_refused_with_one_that_does(tiny_sd_folder, tiny_clip_config, tmp_path,
                                                                    capsys, monkeypatch):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    one_image = 40 * 2**20
    monkeypatch.setattr("ldm.pipeline.eval_images.available_bytes", lambda device: one_image)
    monkeypatch.setattr("ldm.pipeline.eval_images.generation_bytes",
                        lambda pipe, h, w, n, guidance: 2**20 * (10 + 20 * n))  # 30 MiB for one, 50 for two
    code, err = run_cli(main, _gen_argv(tiny_sd_folder, tiny_clip_config, prompts, tmp_path / "o",
                                        "--batch-size", 64), capsys)
    assert code == 2 and "--batch-size 64" in err and "use --batch-size 1" in err
    assert not list((tmp_path / "o").rglob("*.png"))


def test_an_out_of_memory_error_names_the_batch_size_and_keeps_the_images(tiny_sd_folder, tiny_clip_config, tmp_path,
                                                                         capsys, monkeypatch):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")

    def out_of_memory(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(Pipeline, "batch", out_of_memory)
    code, err = run_cli(main, _gen_argv(tiny_sd_folder, tiny_clip_config, prompts, tmp_path / "o",
                                        "--batch-size", 8), capsys)
    assert code == 2 and "(--batch-size 8)" in err and "--batch-size 4 to continue" in err
    assert "Traceback" not in err


def test_sampler_options_reach_every_image_and_bad_ones_are_refused(tiny_sd_folder, tiny_clip_config, tmp_path,
                                                                    capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    out = tmp_path / "o"
    assert main(_gen_argv(tiny_sd_folder, tiny_clip_config, prompts, out, "--sampler-option", "eta=0.5")) == 0
    folder = out / "samples" / "ddim-steps2-cfg3"
    record = json.loads((folder / "metadata.jsonl").read_text().splitlines()[0])
    assert record["sampler_options"] == {"eta": 0.5}
    assert json.loads((out / "report.json").read_text())["settings"]["sampler_options"] == {"eta": 0.5}
    code, err = run_cli(main, _gen_argv(tiny_sd_folder, tiny_clip_config, prompts, tmp_path / "o2",
                                        "--sampler-option", "s_churn=1"), capsys)
    assert code == 2 and "s_churn" in err


def test_a_pytorch_fid_file_is_default_resizer_statistics_and_is_read_before_inception_loads(tmp_path, capsys,
                                                                                            monkeypatch):
    """A .npz without a feature-space name (pytorch-fid's, clean-fid's, TF's) holds tf-bilinear Inception statistics:
    ldm-fid compared it silently with pil-bicubic features (and read a bad .npz only after the images' features)."""
    from helpers import patch_everywhere

    def refuse(*args, **kwargs):
        raise AssertionError("Inception was loaded before the statistics files were checked")

    patch_everywhere(monkeypatch, "ldm.eval.inception.InceptionExtractor", refuse)
    folder = write_images(tmp_path / "a", seed=0, sizes=((32, 32),) * 2)
    plain, small, cut = tmp_path / "pytorch_fid.npz", tmp_path / "dims768.npz", tmp_path / "cut.npz"
    np.savez(plain, mu=np.zeros(2048), sigma=np.eye(2048))
    np.savez(small, mu=np.zeros(768), sigma=np.eye(768))  # pytorch-fid --dims 768: not ldm's 2048-d pool features
    cut.write_bytes(plain.read_bytes()[:300])
    for argv, message in (([folder, plain, "--resizer", "pil-bicubic"], "--resizer pil-bicubic"),
                          ([plain, folder, "--resizer", "pil-bicubic"], "--resizer pil-bicubic"),
                          ([folder, small], "holds 768-d statistics"),
                          ([folder, cut], "not a .npz archive")):
        code, err = run_cli(fid_main, argv, capsys)
        assert code == 2 and message in err and "Traceback" not in err, (argv, err)
    code, err = run_cli(fid_main, [plain, tmp_path / "named.npz"], capsys)  # two files: no network needed
    assert code == 2 and "no such statistics file" in err
    save_stats(tmp_path / "named.npz", GaussianStats(np.zeros(2048), np.eye(2048), 5, EXTRACTOR_NAME + "+pil-bicubic"))
    code, err = run_cli(fid_main, [plain, tmp_path / "named.npz"], capsys)
    assert code == 2 and "different feature extractors" in err and "resizer" in err
    assert fid_main([str(plain), str(plain)]) == 0 and capsys.readouterr().out.strip() == "0"


def test_in_training_fid_takes_a_pytorch_fid_file_as_default_resizer_statistics(tiny_clip):
    from ldm.eval.in_training import evaluate_generations

    class Extractor:  # stands in for an InceptionExtractor with another resizer
        name, dim, device = EXTRACTOR_NAME + "+pil-bicubic", 4, torch.device("cpu")

        def prepare(self, image):
            return torch.from_numpy(np.array(image, dtype=np.float64)).permute(2, 0, 1)

        def __call__(self, batch):
            return batch.mean(dim=(2, 3)).repeat(1, 2)[:, :4] / 255

    images = [Image.new("RGB", (8, 8), (40 * i, 100, 200 - 30 * i)) for i in range(3)]
    plain = GaussianStats(mu=np.zeros(4), sigma=np.eye(4))  # as load_stats reads a pytorch-fid .npz
    with pytest.raises(LdmError, match="different feature extractors"):
        evaluate_generations(lambda ps: images, ["a", "b", "c"], tiny_clip, ref_stats=plain, fid_extractor=Extractor())
    Extractor.name = EXTRACTOR_NAME  # the default resizer: the file's own space
    metrics, _ = evaluate_generations(lambda ps: images, ["a", "b", "c"], tiny_clip, ref_stats=plain,
                                      fid_extractor=Extractor())
    assert metrics["fid"] > 0
