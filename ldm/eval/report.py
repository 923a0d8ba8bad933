"""Evaluation outputs: report.json, an index.html grid of images with prompts and scores, and trade-off plots.

`write_report` writes the three as one unit: all rendered and staged before any is put in place, the old ones removed
first and `report.json` put in place last, so a failure never leaves old files beside new ones.
"""

from __future__ import annotations

import html
import io
import json
import os
import shutil
import tempfile
import urllib.parse
from collections import defaultdict
from pathlib import Path

from ldm.atomic import atomic_write_bytes, atomic_write_text

DISTANCES = ("fid", "fd_clip")  # the first one present in a run is plotted
# The files of one report, in the order write_report puts them in place: report.json last, as the mark of a whole one.
REPORT_FILES = ("tradeoff.png", "index.html", "report.json")


def report_json_text(report: dict) -> str:
    return json.dumps(report, indent=2, allow_nan=True) + "\n"


def write_report_json(out_dir: str | os.PathLike, report: dict) -> Path:
    """Write `report.json` atomically (alone: `write_report` writes the whole report)."""
    path = Path(out_dir) / "report.json"
    atomic_write_text(path, report_json_text(report))
    return path


def setting_text(value) -> str:
    """A setting's value as text: a number as `:g` writes it; a cascade's values per stage joined by '+' (25+8)."""
    if isinstance(value, (list, tuple)):
        return "+".join(setting_text(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def _label(settings: dict) -> str:
    label = ", ".join(f"{k}={setting_text(v) if isinstance(v, (list, tuple)) else v}" for k, v in settings.items()
                      if v is not None and k != "images")
    return label or str(settings.get("images", ""))


def _metrics(run: dict) -> list[tuple[str, str]]:
    """(name, value) of every metric a run has, in the order the table shows them."""
    out = [("CLIP score", f"{run['clip_score']:.2f}")]
    out += [(k.upper(), f"{run[k]:.3f}") for k in DISTANCES if run.get(k) is not None]
    out += [(k.upper(), f"{run[k]['mean']:.4g} ± {run[k]['std']:.2g}") for k in ("kid", "kid_clip") if run.get(k)]
    if run.get("precision_recall"):
        pr = run["precision_recall"]
        out += [(f"precision (k={pr['k']})", f"{pr['precision']:.3f}"), (f"recall (k={pr['k']})", f"{pr['recall']:.3f}")]
    return out


def _metrics_line(run: dict) -> str:
    parts = [f"{name} {value}" for name, value in _metrics(run)]
    return " &middot; ".join(html.escape(p) for p in parts) + f" &middot; {run['n_images']} images"


def _table(runs: list[dict]) -> str:
    """The sweep as one HTML table: a row per setting, a column per metric."""
    names = list(dict.fromkeys(name for run in runs for name, _ in _metrics(run)))
    rows = ["<table><tr><th>setting</th>" + "".join(f"<th>{html.escape(n)}</th>" for n in names) + "</tr>"]
    for run in runs:
        values = dict(_metrics(run))
        rows.append(f"<tr><td>{html.escape(_label(run['settings']))}</td>"
                    + "".join(f"<td>{html.escape(values.get(n, ''))}</td>" for n in names) + "</tr>")
    return "\n".join(rows) + "</table>"


def index_html_text(out_dir: str | os.PathLike, report: dict) -> str:
    """`index.html` for a report in `out_dir`: per run a heading with settings and metrics, then the images with
    prompts and scores (paths relative to `out_dir`)."""
    out_dir = Path(out_dir)
    model = report["clip_model"]
    head = f"CLIP model {model['name']} / {model['pretrained']}" + (
        " (RANDOM weights: scores are meaningless)" if model.get("random_weights") else ""
    )
    parts = [
        "<!doctype html>\n<html><head><meta charset='utf-8'><title>ldm evaluation</title><style>"
        "body{font-family:sans-serif;margin:1em} .grid{display:flex;flex-wrap:wrap;gap:8px}"
        "figure{margin:0;width:200px} figure img{width:200px;height:auto} figcaption{font-size:12px}"
        "table{border-collapse:collapse} td,th{border:1px solid #ccc;padding:2px 6px}"
        "</style></head><body>",
        f"<h1>ldm evaluation</h1><p>{html.escape(head)}</p>",
        _table(report["runs"]),
        "<p><img src='tradeoff.png' alt='trade-off plot' style='width:600px'></p>",
    ]
    for run in report["runs"]:
        parts.append(f"<h2>{html.escape(_label(run['settings']))}</h2><p>{_metrics_line(run)}</p>")
        if run.get("protocol"):
            parts.append(f"<p><small>protocol: {html.escape(run['protocol'])}</small></p>")
        parts.append("<div class='grid'>")
        for item in run["per_image"]:
            rel = os.path.relpath(Path(run["settings"]["images"]) / item["file_name"], out_dir)
            src = urllib.parse.quote(Path(rel).as_posix(), safe="/")
            text = html.escape(item["text"])
            parts.append(
                f"<figure><img src='{src}' alt='{text}' loading='lazy'>"
                f"<figcaption>{text}<br>CLIP {item['clip_score']:.2f}</figcaption></figure>"
            )
        parts.append("</div>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def write_index_html(out_dir: str | os.PathLike, report: dict) -> Path:
    """Write `index.html` atomically (alone: `write_report` writes the whole report)."""
    path = Path(out_dir) / "index.html"
    atomic_write_text(path, index_html_text(out_dir, report))
    return path


def tradeoff_png(runs: list[dict], warning: str | None = None) -> bytes:
    """`tradeoff.png` as PNG bytes: FID (or FD_CLIP) against CLIP score, one line per sampler, step count (and SR augmentation
    level and start strength) over guidance.

    Without a reference distance it plots CLIP score against guidance scale instead. A `warning` (such as random
    CLIP weights) is printed across the plot, so that the image cannot be shown without it.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    distance = next((k for k in DISTANCES if all(r.get(k) is not None for r in runs)), None)
    lines = defaultdict(list)
    for i, run in enumerate(runs):
        s = run["settings"]
        key = (setting_text(s.get("sampler", "images"))
               + (f", {setting_text(s['steps'])} steps" if s.get("steps") is not None else "")
               + (f", aug {s['aug_level']:g}" if s.get("aug_level") is not None else "")
               + (f", start {s['upscale_strength']:g}" if s.get("upscale_strength") is not None else ""))
        lines[key].append((s.get("guidance") if s.get("guidance") is not None else i, run))
    # a cascade's guidance per stage is plotted at its base stage's scale and labelled with every stage's
    lines = {key: [(g[0] if isinstance(g, (list, tuple)) else g, setting_text(g), run) for g, run in points]
             for key, points in lines.items()}
    fig = Figure(figsize=(6, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for key, points in lines.items():
        points.sort(key=lambda p: p[0])
        if distance is not None:
            xs = [r["clip_score"] for _, _, r in points]
            ys = [r[distance] for _, _, r in points]
        else:
            xs = [g for g, _, _ in points]
            ys = [r["clip_score"] for _, _, r in points]
        ax.plot(xs, ys, marker="o", label=key)
        if distance is not None:
            for (_, label, _), x, y in zip(points, xs, ys):
                ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if distance is not None:
        ax.set_xlabel("CLIP score (higher is better)")
        ax.set_ylabel(f"{distance.upper()} (lower is better)")
        ax.set_title("Guidance trade-off (labels: guidance scale)")
    else:
        ax.set_xlabel("guidance scale")
        ax.set_ylabel("CLIP score")
        ax.set_title("CLIP score against guidance (no reference given)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    if warning:  # after tight_layout: a banner over the axes, in red, that layout cannot push aside
        fig.text(0.5, 0.5, warning, ha="center", va="center", color="red", fontsize=13, weight="bold", alpha=0.8,
                 wrap=True, bbox={"facecolor": "white", "edgecolor": "red", "alpha": 0.85})
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def plot_tradeoff(out_dir: str | os.PathLike, runs: list[dict], warning: str | None = None) -> Path:
    """Write `tradeoff.png` atomically (alone: `write_report` writes the whole report); see `tradeoff_png`."""
    path = Path(out_dir) / "tradeoff.png"
    atomic_write_bytes(path, tradeoff_png(runs, warning))
    return path


def write_report(out_dir: str | os.PathLike, report: dict, warning: str | None = None) -> list[Path]:
    """Write `report.json`, `index.html` and `tradeoff.png` (of `report["runs"]`) into `out_dir` as one unit.

    All three are rendered in memory and staged in a hidden folder there (fsynced) before any is put in place, so
    that a failure while rendering or staging (a plot that raises, a full disk) leaves the previous report whole.
    Then the previous files are removed, `report.json` first, and the new ones renamed in with `report.json` last:
    an interruption in between leaves some of the new files and none of the old, and never a `report.json` without
    the files it goes with.
    """
    out_dir = Path(out_dir)
    rendered = {
        "tradeoff.png": tradeoff_png(report["runs"], warning),
        "index.html": index_html_text(out_dir, report).encode("utf-8"),
        "report.json": report_json_text(report).encode("utf-8"),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".report.", suffix=".tmp", dir=out_dir))
    try:
        for name in REPORT_FILES:
            with open(stage / name, "wb") as f:
                f.write(rendered[name])
                f.flush()
                os.fsync(f.fileno())
        for name in reversed(REPORT_FILES):  # report.json first: without it, what is left is not a report
            (out_dir / name).unlink(missing_ok=True)
        paths = []
        for name in REPORT_FILES:  # report.json last
            os.replace(stage / name, out_dir / name)
            paths.append(out_dir / name)
        return paths
    finally:
        shutil.rmtree(stage, ignore_errors=True)
