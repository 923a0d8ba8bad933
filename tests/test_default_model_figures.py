"""tools/plot_default_model.py: the bundled model's figures from tiny synthetic sample folders, score files and logs."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldm.errors import LdmError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
try:
    import eval_default_model as evaluate
    import plot_default_model as plot
finally:
    sys.path.pop(0)

TILE = 8


def gen_dir(folder: Path, n: int, guidance=5.0, prompt="p{}") -> Path:
    """A folder as `eval_default_model.py generate` writes it: image i is filled with grey level i."""
    folder.mkdir(parents=True)
    rows = []
    for i in range(n):
        Image.new("RGB", (TILE, TILE), (i, i, i)).save(folder / f"{i:05d}.png")
        g = guidance(i) if callable(guidance) else guidance
        rows.append(json.dumps({"file_name": f"{i:05d}.png", "text": prompt.format(i), "seed": i, "guidance": g}))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return folder


def test_sample_grid_puts_image_i_at_row_i_div_30_column_i_mod_30(tmp_path):
    grid = plot.sample_grid(gen_dir(tmp_path / "cfg5", 90))
    assert grid.size == (30 * TILE, 3 * TILE)
    pixels = np.asarray(grid)
    for i in (0, 29, 30, 47, 89):
        r, c = divmod(i, 30)
        assert (pixels[r * TILE:(r + 1) * TILE, c * TILE:(c + 1) * TILE] == i).all()


@pytest.mark.parametrize("n", [89, 91])
def test_sample_grid_refuses_a_folder_with_the_wrong_count(tmp_path, n):
    folder = gen_dir(tmp_path / "cfg5", n)
    with pytest.raises(LdmError, match=f"holds {n} images, the figure needs exactly 90"):
        plot.sample_grid(folder)
    out = tmp_path / "grid.png"
    assert plot.main(["samples", str(folder), "--out", str(out)]) == 2 and not out.exists()


def test_sample_grid_refuses_images_of_several_sizes(tmp_path):
    folder = gen_dir(tmp_path / "cfg5", 6)
    Image.new("RGB", (TILE * 2, TILE)).save(folder / "00003.png")
    with pytest.raises(LdmError, match="several sizes"):
        plot.sample_grid(folder, rows=2, cols=3)


def test_samples_cli_writes_the_grid_losslessly(tmp_path):
    folder = gen_dir(tmp_path / "cfg5", 6)
    out = tmp_path / "grid.png"
    assert plot.main(["samples", str(folder), "--rows", "2", "--cols", "3", "--out", str(out)]) == 0
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(plot.sample_grid(folder, 2, 3)))


def test_guidance_rows_stack_the_first_row_of_each_folder_with_a_label(tmp_path):
    folders = [gen_dir(tmp_path / f"cfg{g}", 90, guidance=g) for g in (1, 3, 5, 7)]
    image = plot.guidance_rows(folders, cols=30, label_width=80)
    assert image.size == (80 + 30 * TILE, 4 * TILE)
    pixels = np.asarray(image)
    assert (pixels[:, 80 + 29 * TILE:] == 29).all()  # the 30th image of every folder, not the 31st
    labels = pixels[:, :80].min(axis=2)
    for row in range(4):  # each row's label column holds dark text
        assert labels[row * TILE:(row + 1) * TILE].min() < 100


def test_guidance_rows_refuse_folders_with_other_prompts_or_mixed_guidance(tmp_path):
    a = gen_dir(tmp_path / "cfg1", 30, guidance=1)
    b = gen_dir(tmp_path / "cfg3", 30, guidance=3, prompt="other {}")
    with pytest.raises(LdmError, match="first 30 prompts differ"):
        plot.guidance_rows([a, b])
    mixed = gen_dir(tmp_path / "mixed", 30, guidance=lambda i: 1 + i % 2)
    with pytest.raises(LdmError, match=r"expected one numeric \"guidance\" on every line"):
        plot.guidance_rows([mixed])


def score_file(path: Path, fd: bool = True, guidance=(1, 3, 5, 7)) -> Path:
    runs = [{"images": f"gen/val/cfg{g}", "guidance": g, "n": 10, "prompts": 10, "clip_score": 30 + g,
             "clip_score_shuffled": 8.0, "retrieval_top1": 0.1 * g / 7, "retrieval_top5": 0.5,
             **({"fd_clip": 10.0 - g} if fd else {})} for g in reversed(guidance)]
    path.write_text(json.dumps({"clip": {}, "runs": runs}))
    return path


def test_guidance_plot_reads_runs_sorted_by_guidance_and_draws_fd_only_when_every_run_has_it(tmp_path):
    scores = score_file(tmp_path / "new.json")
    assert [r["guidance"] for r in plot.read_scores(scores)] == [1, 3, 5, 7]
    with_fd = plot.guidance_plot(scores, compare=score_file(tmp_path / "old.json"))
    without_fd = plot.guidance_plot(scores, compare=score_file(tmp_path / "grid.json", fd=False))
    assert with_fd.size == (1100, 350) and without_fd.size == (750, 350)
    out = tmp_path / "g.png"
    assert plot.main(["guidance", str(scores), "--out", str(out)]) == 0
    assert Image.open(out).size == (1100, 350) and Image.open(out).mode == "P"  # a drawing: 256-colour palette


def test_guidance_plot_refuses_a_score_file_without_guidance(tmp_path):
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"runs": [{"images": "gen/val/cfg5", "clip_score": 1.0}]}))
    with pytest.raises(LdmError, match='has no "guidance"'):
        plot.read_scores(path)
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(LdmError, match="not a tools/eval_default_model.py score file"):
        plot.read_scores(tmp_path / "bad.json")


LOG = """\
  0%|          | 0/100
step 50 loss 0.0281 lr 0.0001 img/s 952.0 skipped 0 peak_mem_gib 3.74
step 100 loss 0.0289 lr 0.0002 img/s 1362.3 skipped 0 peak_mem_gib 3.74
model written to /tmp/run/emoji
"""


def test_curves_from_a_console_log(tmp_path):
    log = tmp_path / "unet-train.log"
    log.write_text(LOG)
    assert plot.read_curve(log) == {"loss": [(50, 0.0281), (100, 0.0289)], "lr": [(50, 1e-4), (100, 2e-4)]}
    (tmp_path / "empty.log").write_text("nothing logged\n")
    with pytest.raises(LdmError, match="no loss and lr values"):
        plot.read_curve(tmp_path / "empty.log")


def test_curves_from_tensorboard_events_match_what_was_logged(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    run = tmp_path / "logs" / "ldm-train"
    writer = SummaryWriter(str(run))
    for step in (50, 100, 150):
        writer.add_scalar("loss", 0.01 * step, step)
        writer.add_scalar("lr", 1e-6 * step, step)
        writer.add_scalar("img_per_s", 1000.0, step)
    writer.close()
    curve = plot.read_curve(tmp_path / "logs")
    assert [s for s, _ in curve["loss"]] == [50, 100, 150]
    assert [v for _, v in curve["loss"]] == pytest.approx([0.5, 1.0, 1.5], rel=1e-6)  # float32 in the file
    assert [v for _, v in curve["lr"]] == pytest.approx([5e-5, 1e-4, 1.5e-4], rel=1e-6)
    log = tmp_path / "unet-train.log"
    log.write_text(LOG)
    out = tmp_path / "curves.png"
    assert plot.main(["curves", "--run", str(tmp_path / "logs"), "1500", "--run", str(log), "3000",
                      "--out", str(out)]) == 0
    assert Image.open(out).size == (1000, 320)


def test_curves_refuse_event_files_of_several_runs_and_a_bad_offset(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    for name in ("a", "b"):
        with SummaryWriter(str(tmp_path / "logs" / name)) as writer:
            writer.add_scalar("loss", 1.0, 1)
    with pytest.raises(LdmError, match="found them in 2 folders"):
        plot.read_curve(tmp_path / "logs")
    with pytest.raises(LdmError, match="neither a folder"):
        plot.read_curve(tmp_path / "missing")
    assert plot.main(["curves", "--run", str(tmp_path / "logs" / "a"), "x", "--out", str(tmp_path / "c.png")]) == 2


def test_score_records_the_guidance_that_every_metadata_line_names(tmp_path):
    assert evaluate.guidance_of(gen_dir(tmp_path / "cfg5", 3, guidance=5.0)) == {"guidance": 5.0}
    assert evaluate.guidance_of(gen_dir(tmp_path / "mixed", 3, guidance=lambda i: i)) == {}
