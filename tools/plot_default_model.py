"""The bundled model's figures (docs/default-model.md) from its sample folders, score files and training logs.

    python tools/plot_default_model.py samples GEN/grid/cfg5 --out docs/images/default-model-samples.png
    python tools/plot_default_model.py guidance-samples GEN/grid/cfg1 GEN/grid/cfg3 GEN/grid/cfg5 GEN/grid/cfg7 \
        --out docs/images/default-model-guidance-samples.png
    python tools/plot_default_model.py guidance SCORES.json --compare OLD.json --out docs/images/default-model-guidance.png
    python tools/plot_default_model.py curves --run RUN1/logs 1500 --run RUN2/logs 3000 --out CURVES.png

samples: the images of a folder written by `tools/eval_default_model.py generate` (metadata.jsonl order, which is
the prompt order) as rows x cols tiles; the folder must hold exactly rows x cols images.
guidance-samples: the first `cols` images of each folder, one labelled row per guidance scale (from metadata.jsonl).
guidance: CLIP score (own / shuffled prompts), retrieval top-1 / top-5 and FD_CLIP against the guidance scale, from
`tools/eval_default_model.py score --out` files (each run names its guidance); `--compare` is drawn dashed.
curves: U-Net loss and learning rate against the global step, from a run's TensorBoard event files (a folder) or
its console log (a file with `step N loss X lr Y ...` lines), each run shifted by the steps trained before it.
"""

from __future__ import annotations

import argparse
import io
import json
import re
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm.atomic import atomic_write_bytes  # noqa: E402
from ldm.cli.common import cli_main  # noqa: E402
from ldm.errors import LdmError  # noqa: E402
from ldm.eval.imagefolder import load_rgb, read_metadata  # noqa: E402
from ldm.textfiles import read_text  # noqa: E402

from eval_default_model import guidance_of  # noqa: E402  (tools/ is on the path: this script's folder)

LOG_LINE = re.compile(r"^step (\d+) loss (\S+) lr (\S+)")


def save_png(image: Image.Image, path: str | Path, palette: bool = False) -> None:
    """Write a PNG atomically with zlib's best effort; `palette` (256 colours) only for drawings, never samples."""
    if palette:
        image = image.convert("RGB").quantize(256, dither=Image.Dither.NONE)
    buf = io.BytesIO()
    image.save(buf, format="png", optimize=True)
    atomic_write_bytes(path, buf.getvalue())


def folder_guidance(folder: str | Path) -> float:
    """The one guidance scale that every row of `folder/metadata.jsonl` names."""
    found = guidance_of(folder)
    if not found:
        raise LdmError(f"{Path(folder) / 'metadata.jsonl'}: expected one numeric \"guidance\" on every line; write the "
                       "folder with tools/eval_default_model.py generate")
    return float(found["guidance"])


def load_tiles(folder: str | Path, count: int | None = None, exactly: bool = False) -> tuple[list[Image.Image], list[str]]:
    """The first `count` images of a generated folder (all when None) and their prompts, all of one size."""
    rows = read_metadata(folder)
    if count is not None and (len(rows) < count or (exactly and len(rows) != count)):
        raise LdmError(f"{folder}: holds {len(rows)} images, the figure needs {'exactly ' if exactly else ''}{count}; "
                       "pass the folder of the prompt set it was made for (or --rows/--cols)")
    rows = rows[:count]
    tiles = [load_rgb(r.path) for r in rows]
    sizes = {t.size for t in tiles}
    if len(sizes) != 1:
        raise LdmError(f"{folder}: images of several sizes {sorted(sizes)}; a grid needs one size")
    return tiles, [r.text for r in rows]


def paste_grid(tiles: list[Image.Image], cols: int, left: int = 0) -> Image.Image:
    """Tiles row by row, `cols` a row, with `left` white pixels before each row (for labels)."""
    w, h = tiles[0].size
    rows = -(-len(tiles) // cols)
    grid = Image.new("RGB", (left + cols * w, rows * h), "white")
    for i, tile in enumerate(tiles):
        grid.paste(tile, (left + (i % cols) * w, (i // cols) * h))
    return grid


def sample_grid(folder: str | Path, rows: int = 3, cols: int = 30) -> Image.Image:
    """All `rows * cols` images of a folder; the default is the 90 prompts of docs/default-model-prompts.txt."""
    tiles, _ = load_tiles(folder, rows * cols, exactly=True)
    return paste_grid(tiles, cols)


def guidance_rows(folders: list[str | Path], cols: int = 30, label_width: int = 80) -> Image.Image:
    """The first `cols` images of each folder, one row per folder, labelled with its guidance scale."""
    tiles, labels, first = [], [], None
    for folder in folders:
        row, texts = load_tiles(folder, cols)
        if first is not None and texts != first:
            raise LdmError(f"{folder}: its first {cols} prompts differ from {folders[0]}'s; rows must show the same "
                           "prompts at different guidance scales")
        first = texts
        tiles += row
        labels.append(f"guidance {folder_guidance(folder):g}")
    grid = paste_grid(tiles, cols, left=label_width)
    h = tiles[0].size[1]
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default(size=max(10, h // 5))
    for i, label in enumerate(labels):
        draw.text((4, i * h + h // 2), label, fill="black", font=font, anchor="lm")
    return grid


def read_scores(path: str | Path) -> list[dict]:
    """The runs of a score file, sorted by guidance; each must name its guidance scale."""
    try:
        runs = json.loads(read_text(path, "score file"))["runs"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise LdmError(f"{path}: not a tools/eval_default_model.py score file ({e})") from e
    for run in runs:
        if not isinstance(run.get("guidance"), (int, float)):
            raise LdmError(f"{path}: run {run.get('images', '?')} has no \"guidance\"; score the folders again with "
                           "tools/eval_default_model.py score (it records the scale from metadata.jsonl)")
    return sorted(runs, key=lambda r: r["guidance"])


def figure():
    """A pyplot-free matplotlib Figure (no global backend state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(dpi=100)
    FigureCanvasAgg(fig)
    return fig


def rendered(fig) -> Image.Image:
    """The figure as a PIL image."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return Image.open(buf).convert("RGB")


def guidance_plot(scores: str | Path, compare: str | Path | None = None, label: str = "this model",
                  compare_label: str = "previous") -> Image.Image:
    """CLIP score, retrieval and FD_CLIP against guidance; the comparison model dashed, in the same colours."""
    series = [(read_scores(scores), label, "-", "o")]
    if compare is not None:
        series.append((read_scores(compare), compare_label, "--", "s"))
    has_fd = all("fd_clip" in r for runs, *_ in series for r in runs)
    fig = figure()
    fig.set_size_inches(11 if has_fd else 7.5, 3.5)
    axes = fig.subplots(1, 3 if has_fd else 2)
    n = series[0][0][0]["prompts"]
    panels = [(axes[0], "CLIP score (bundled CLIP)", [("clip_score", "own prompt", 1), ("clip_score_shuffled",
               "shuffled prompt", 1)]),
              (axes[1], f"own prompt among {n} prompts (%)", [("retrieval_top1", "top-1", 100),
                                                                ("retrieval_top5", "top-5", 100)])]
    if has_fd:
        panels.append((axes[2], "Frechet distance in CLIP space\n(to the real images; not FID)",
                       [("fd_clip", "FD_CLIP", 1)]))
    for ax, title, metrics in panels:
        for first, (runs, name, style, marker) in enumerate(series):
            for colour, (key, what, scale) in enumerate(metrics):
                ax.plot([r["guidance"] for r in runs], [scale * r[key] for r in runs], linestyle=style, marker=marker,
                        color=f"C{colour}", label=what if first == 0 else None)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("guidance scale")
        ax.set_xticks(sorted({r["guidance"] for runs, *_ in series for r in runs}))
        ax.grid(alpha=0.3)
        if len(metrics) > 1:
            ax.legend(fontsize=8)
    # The models by line style in one legend above the panels; the metrics by colour in each panel's own.
    from matplotlib.lines import Line2D

    fig.legend(handles=[Line2D([], [], color="black", linestyle=style, marker=marker, label=name)
                        for _, name, style, marker in series], loc="upper center", ncol=len(series), fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    return rendered(fig)


def read_curve(source: str | Path) -> dict[str, list[tuple[int, float]]]:
    """(step, value) of `loss` and `lr`: from TensorBoard event files under a folder, or from a console log file."""
    source = Path(source)
    if source.is_file():
        curve = {"loss": [], "lr": []}
        for line in read_text(source, "training log").splitlines():
            m = LOG_LINE.match(line.strip())
            if m:
                curve["loss"].append((int(m[1]), float(m[2])))
                curve["lr"].append((int(m[1]), float(m[3])))
    elif source.is_dir():
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        folders = sorted({f.parent for f in source.rglob("events.out.tfevents*")})
        if len(folders) != 1:
            raise LdmError(f"{source}: expected the event files of one run, found them in {len(folders)} folders "
                           f"{[str(f) for f in folders]}; pass the run's own folder")
        events = EventAccumulator(str(folders[0]), size_guidance={"scalars": 0}).Reload()  # 0: keep every point
        tags = events.Tags()["scalars"]
        curve = {tag: [(e.step, e.value) for e in events.Scalars(tag)] if tag in tags else [] for tag in ("loss", "lr")}
    else:
        raise LdmError(f"{source}: neither a folder of TensorBoard event files nor a training log")
    if not curve["loss"] or not curve["lr"]:
        raise LdmError(f"{source}: no loss and lr values found (TensorBoard scalars 'loss'/'lr', or log lines "
                       "'step N loss X lr Y')")
    return curve


def curves_plot(runs: list[tuple[str | Path, int]], title: str = "U-Net") -> Image.Image:
    """Loss and learning rate against the global step, one colour per run, each shifted by its `offset`."""
    fig = figure()
    fig.set_size_inches(10, 3.2)
    loss_ax, lr_ax = fig.subplots(1, 2)
    for i, (source, offset) in enumerate(runs):
        curve = read_curve(source)
        last = offset + curve["loss"][-1][0]
        for ax, tag in ((loss_ax, "loss"), (lr_ax, "lr")):
            steps, values = zip(*curve[tag])
            ax.plot([offset + s for s in steps], values, color=f"C{i}", marker=".",
                    label=f"steps {offset:,}-{last:,}")
            ax.axvline(offset, color="grey", linestyle=":", linewidth=1)
    loss_ax.set_title(f"{title}: training loss (mean since the previous point)", fontsize=10)
    lr_ax.set_title(f"{title}: learning rate", fontsize=10)
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    for ax in (loss_ax, lr_ax):
        ax.set_xlabel("global step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return rendered(fig)


@cli_main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tools/plot_default_model.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="figure", required=True)
    s = sub.add_parser("samples", help="a generated folder as a grid")
    s.add_argument("folder")
    s.add_argument("--rows", type=int, default=3)
    s.add_argument("--cols", type=int, default=30)
    g = sub.add_parser("guidance-samples", help="the first row of several folders, labelled by guidance")
    g.add_argument("folders", nargs="+")
    g.add_argument("--cols", type=int, default=30)
    q = sub.add_parser("guidance", help="scores against the guidance scale")
    q.add_argument("scores")
    q.add_argument("--label", default="this model")
    q.add_argument("--compare", default=None, help="a second score file, drawn dashed")
    q.add_argument("--compare-label", default="previous")
    c = sub.add_parser("curves", help="loss and lr against the global step")
    c.add_argument("--run", nargs=2, action="append", required=True, metavar=("LOGS", "OFFSET"),
                   help="TensorBoard folder or console log, and the steps trained before it (repeat per run)")
    for parser in (s, g, q, c):
        parser.add_argument("--out", required=True, help=".png to write")
    args = p.parse_args(argv)
    if args.figure == "samples":
        save_png(sample_grid(args.folder, args.rows, args.cols), args.out)
    elif args.figure == "guidance-samples":
        save_png(guidance_rows(args.folders, args.cols), args.out)
    elif args.figure == "guidance":
        save_png(guidance_plot(args.scores, args.compare, args.label, args.compare_label), args.out, palette=True)
    else:
        try:
            runs = [(source, int(offset)) for source, offset in args.run]
        except ValueError as e:
            raise LdmError(f"--run LOGS OFFSET: the offset must be a whole number of steps ({e})") from e
        save_png(curves_plot(runs), args.out, palette=True)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
