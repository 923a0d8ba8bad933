"""A killed ldm-eval sweep continues where it stopped: complete images are kept, truncated ones and leftovers of atomic
writes are redone, the index only ever names complete files, and a resume with other settings is refused."""
import json

import pytest

from ldm.cli import eval as eval_cli
from ldm.cli.eval import main
from ldm.pipeline.eval_images import image_seed, is_complete
from ldm.pipeline.pipeline import Pipeline

pytestmark = pytest.mark.slow


def _argv(model, clip, prompts, out, *extra):
    return ["--model", str(model), "--prompts", str(prompts), "--samplers", "euler_a", "--steps", "2",
            "--guidance", "3", "--height", "16", "--width", "16", "--n-per-prompt", "2", "--clip-model", str(clip),
            "--clip-pretrained", "none", "--out", str(out), *map(str, extra)]


@pytest.fixture()
def prompts(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a red circle\na blue square\na green triangle\n")
    return path


def _listed(folder):
    return [json.loads(line)["file_name"] for line in (folder / "metadata.jsonl").read_text().splitlines()]


def test_a_killed_run_continues_and_equals_an_uninterrupted_one(tiny_sd_folder, tiny_clip_config, prompts, tmp_path,
                                                                monkeypatch):
    whole = tmp_path / "whole"
    assert main(_argv(tiny_sd_folder, tiny_clip_config, prompts, whole, "--batch-size", 4)) == 0
    folder = whole / "samples" / "euler_a-steps2-cfg3"
    names = sorted(p.name for p in folder.glob("*.png"))
    assert len(names) == 6 and _listed(folder) == names

    calls = []
    real_batch = Pipeline.batch

    def killed_after_two_batches(self, prompts, seeds, *args, **kwargs):
        calls.append(len(prompts))
        if len(calls) > 2:
            raise KeyboardInterrupt  # the kill, between two batches
        return real_batch(self, prompts, seeds, *args, **kwargs)

    monkeypatch.setattr(Pipeline, "batch", killed_after_two_batches)
    out = tmp_path / "resumed"
    assert main(_argv(tiny_sd_folder, tiny_clip_config, prompts, out, "--batch-size", 2)) == 130
    part = out / "samples" / "euler_a-steps2-cfg3"
    assert sorted(p.name for p in part.glob("*.png")) == names[:4]
    assert not (part / "metadata.jsonl").exists()  # no index yet: it never names a file that is not there
    (part / names[3]).write_bytes((part / names[3]).read_bytes()[:200])  # a truncated file (a damaged disk)
    (part / f".{names[4]}.abcd1234.tmp").mkdir()  # what a kill inside an atomic write leaves

    calls.clear()
    monkeypatch.setattr(Pipeline, "batch", lambda self, prompts, seeds, *a, **k: (calls.append(len(prompts)),
                                                                                   real_batch(self, prompts, seeds,
                                                                                              *a, **k))[1])
    assert main(_argv(tiny_sd_folder, tiny_clip_config, prompts, out, "--batch-size", 3)) == 0
    assert calls == [3]  # the truncated image and the two never made; the three complete ones are kept
    assert not list(part.glob(".*.tmp"))
    for name in names:
        assert (part / name).read_bytes() == (folder / name).read_bytes(), name
    assert _listed(part) == names
    records = [json.loads(line) for line in (part / "metadata.jsonl").read_text().splitlines()]
    assert [(r["index"], r["seed"], r["base_seed"]) for r in records] == [(i, image_seed(0, i), 0) for i in range(6)]
    for r in records:
        assert is_complete(part / r["file_name"], r)
    assert json.loads((out / "report.json").read_text())["clip_score"] == \
        json.loads((whole / "report.json").read_text())["clip_score"]


def test_a_resume_with_other_settings_is_refused_before_generating(tiny_sd_folder, tiny_clip_config, prompts,
                                                                    tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(_argv(tiny_sd_folder, tiny_clip_config, prompts, out, "--batch-size", 6)) == 0
    folder = out / "samples" / "euler_a-steps2-cfg3"
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    capsys.readouterr()
    assert main(_argv(tiny_sd_folder, tiny_clip_config, prompts, out, "--seed", 5)) == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "base_seed: folder 0, now 5" in err and "another --out" in err
    prompts.write_text("a red circle\n")
    assert main(_argv(tiny_sd_folder, tiny_clip_config, prompts, out)) == 2
    assert "prompts_sha256" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before  # nothing was touched


def test_a_folder_of_unknown_images_is_refused(tiny_sd_folder, tiny_clip_config, prompts, tmp_path, capsys):
    out = tmp_path / "eval"
    folder = out / "samples" / "euler_a-steps2-cfg3"
    folder.mkdir(parents=True)
    (folder / "000000-a-red-circle.png").write_bytes(b"not ours")
    assert main(_argv(tiny_sd_folder, tiny_clip_config, prompts, out)) == 2
    assert "no settings.json" in capsys.readouterr().err


def test_compile_is_on_for_gpus_by_default_and_reaches_the_loaded_pipeline(tiny_sd_folder, tiny_clip_config, prompts,
                                                                           tmp_path, monkeypatch):
    cpu, cuda = eval_cli.torch.device("cpu"), eval_cli.torch.device("cuda")
    assert eval_cli.compile_mode("auto", cpu) is None and eval_cli.compile_mode("auto", cuda) == "reduce-overhead"
    assert eval_cli.compile_mode("off", cuda) is None and eval_cli.compile_mode("max-autotune", cpu) == "max-autotune"
    calls = []
    monkeypatch.setattr(eval_cli, "compile_pipeline", lambda pipe, mode: calls.append((type(pipe), mode)) or pipe)
    assert main(_argv(tiny_sd_folder, tiny_clip_config, prompts, tmp_path / "eval", "--compile", "default")) == 0
    assert calls == [(Pipeline, "default")]
