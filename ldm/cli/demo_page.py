"""The ldm-demo page: gradio Blocks over the code path of ldm-txt2img, so a page's PNG is the CLI's PNG.

Every request goes through `generate_to_folder` (the CLI's settings checks, sampling and PNG writer) into a fresh
folder, and the gallery serves those files unchanged: a downloaded image carries the parameters ldm-txt2img writes.
"""
from __future__ import annotations

import copy
import html
import itertools
import os
import random
import shutil
import tempfile
import threading
from pathlib import Path

from ldm.cli.txt2img import build_parser as txt2img_parser
from ldm.diffusion.sampler_registry import SIGMA_SCHEDULES, sampler_names, samplers_without_sigmas
from ldm.errors import LdmError
from ldm.eval.prompts import load_prompts
from ldm.pipeline.cascade import use_model_defaults
from ldm.pipeline.default_model import BUNDLED
from ldm.pipeline.generate import generate_to_folder

INSTALL = "pip install -e '.[demo]'"
MAX_SEED = 2**31 - 1  # what "randomize" draws from; any integer seed works
CSS = ("#gallery img, #image-a img, #image-b img { image-rendering: pixelated; }"  # small images, enlarged crisply
       " #image-a img, #image-b img { width: 100%; height: 100%; object-fit: contain; }"
       " #gallery .thumbnail-item img { object-fit: contain; }"
       " #message { color: var(--error-text-color); font-family: var(--font-mono); }")


def import_gradio():
    """gradio with its telemetry off (set before the import reads it), or an LdmError that says how to install it."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    try:
        import gradio
    except ImportError as e:
        raise LdmError(f"ldm-demo needs gradio, an optional extra: {INSTALL} (from the ldm checkout)") from e
    return gradio


def cli_defaults() -> dict:
    """ldm-txt2img's defaults, so that a field left as it is means what leaving out the flag means."""
    parser = txt2img_parser()
    return {name: parser.get_default(name) for name in ("sampler", "steps", "guidance", "seed", "n", "sigmas")}


def example_prompts(prompt_set: str, per_category: int = 2) -> list[str]:
    """The first prompts of each category of a prompt set (a bundled name or a file)."""
    seen: dict = {}
    out = []
    for p in load_prompts(prompt_set):
        if seen.setdefault(p.category, 0) < per_category:
            seen[p.category] += 1
            out.append(p.text)
    return out


class Generator:
    """The page's two actions over one loaded pipeline (or cascade); each request writes into its own new folder."""

    def __init__(self, pipe, out_root: str | os.PathLike):
        self.pipe = pipe
        self.out_root = Path(out_root)
        self._numbers = itertools.count()
        self._lock = threading.Lock()
        self.defaults = cli_defaults()

    @property
    def stage_count(self) -> int:
        return len(getattr(self.pipe, "pipelines", [None]))

    def _folder(self) -> Path:
        with self._lock:
            return self.out_root / f"{next(self._numbers):05d}"

    def _model(self, stage_steps: list | None, aug_level: float | None):
        """The pipeline, or for a cascade a copy whose per-stage steps and augmentation level are this request's."""
        if self.stage_count == 1:
            if any(v is not None for v in stage_steps or []) or aug_level is not None:
                raise LdmError("--stage-steps, --aug-level: cascade options; start ldm-demo with --upscaler")
            return self.pipe
        cascade = copy.copy(self.pipe)
        steps = stage_steps if any(v is not None for v in stage_steps or []) else None
        cascade.options = {**self.pipe.options, "stage_steps": steps, "aug_level": aug_level}
        cascade.check_options(**cascade.options)
        return cascade

    def generate(self, prompt: str, *, negative_prompt: str | None = None, sampler: str | None = None,
                 steps: int | None = None, guidance: float | None = None, seed: int | None = None,
                 n: int | None = None, height: int | None = None, width: int | None = None,
                 stage_steps: list | None = None, aug_level: float | None = None,
                 clip_skip: int | None = None, sigmas: str | None = None) -> list[tuple[Path, dict]]:
        """(PNG path, record) per image, exactly as `ldm-txt2img` with these flags writes them (blank = its default)."""
        d = self.defaults
        folder = self._folder()
        model = self._model(stage_steps, aug_level)
        chosen = use_model_defaults(  # a blank box is the model's own default, as the flag left out
            model, sampler=sampler or d["sampler"], steps=d["steps"] if steps is None else steps,
            guidance=d["guidance"] if guidance is None else guidance)
        records = generate_to_folder(
            model, [prompt or ""], folder,
            sampler=chosen["sampler"], steps=chosen["steps"], guidance=chosen["guidance"],
            seed=d["seed"] if seed is None else seed,
            n_per_prompt=d["n"] if n is None else n, height=height, width=width,
            negative_prompt=negative_prompt or None,  # an empty box is no negative prompt, as the flag left out
            clip_skip=clip_skip or None,  # gradio sends a blank box as 0: the model's own layer, as blank
            sigmas=sigmas or d["sigmas"],  # a cleared dropdown is the flag left out: the model's own schedule
        )
        return [(folder / r["file_name"], r) for r in records]


def caption(record: dict) -> str:
    sigmas = record.get("sigmas", "model")
    return (f"seed {record['seed']} · {record['sampler']}{'' if sigmas == 'model' else f' ({sigmas} sigmas)'} · "
            f"{record['steps']} steps · guidance {record['guidance']:g}")


def _number(value, kind=int):
    """A gradio Number's value: None when blank, else `kind` (precision 0 fields still arrive as floats at times)."""
    return None if value is None or value == "" else kind(value)


def build_page(generator: Generator, *, examples: list[str] = (), title: str = "ldm-demo"):
    """The gradio Blocks: prompt, Generate, gallery; Advanced settings; a compare tab; examples."""
    gr = import_gradio()
    pipe, d = generator.pipe, generator.defaults
    cascade = generator.stage_count > 1
    samplers = sampler_names()

    def pick_seed(seed, randomize):
        return random.randint(0, MAX_SEED) if randomize else seed

    def settings(v: dict) -> dict:
        """The Generator's keyword arguments from the fields' values (a dict keyed by component)."""
        return dict(prompt=v[prompt], negative_prompt=v[negative], sampler=v[sampler], steps=_number(v[steps]),
                    guidance=_number(v[guidance], float), seed=_number(v[seed]), n=_number(v[n]),
                    width=None if cascade else _number(v[width]), height=None if cascade else _number(v[height]),
                    aug_level=_number(v[aug_level], float), stage_steps=[_number(v[s]) for s in stage_steps],
                    clip_skip=_number(v[clip_skip]), sigmas=v[sigmas])

    def run(call, outputs: int):
        """The outputs and a hidden message; on bad input the CLI's `error: ...` line and the outputs left as they were."""
        try:
            return *call(), gr.HTML("", visible=False)
        except LdmError as e:  # the page stays usable: the next request is an ordinary one
            return *[gr.skip()] * outputs, gr.HTML(f"error: {html.escape(str(e))}", visible=True)

    # gradio passes a gr.Progress only to a positional parameter; with track_tqdm it shows the sampler's tqdm bar.
    def on_generate(values: dict, progress=gr.Progress(track_tqdm=True)):
        return run(lambda: ([str(path) for path, _ in generator.generate(**settings(values))],), 1)

    def on_compare(values: dict, progress=gr.Progress(track_tqdm=True)):
        def work():
            kw = {**settings(values), "n": 1}
            (a, ra), = generator.generate(**kw)
            (b, rb), = generator.generate(**{**kw, "sampler": values[sampler_b],
                                             "guidance": _number(values[guidance_b], float)})
            return gr.Image(value=str(a), label=caption(ra)), gr.Image(value=str(b), label=caption(rb))
        return run(work, 2)

    with gr.Blocks(title=title, analytics_enabled=False) as page:
        shown = (pipe.model_name or str(BUNDLED)).replace(str(BUNDLED), "ldm/assets/default-model (bundled)")
        gr.Markdown(f"## {html.escape(title)}\nModel: `{html.escape(shown)}` · "
                    f"{pipe.default_size} px · images made by the same code as `ldm-txt2img`; each downloads as "
                    "the PNG it writes, with its parameters.")
        with gr.Row():
            with gr.Column(scale=2, min_width=360):  # the controls, left; the results, right
                prompt = gr.Textbox(label="Prompt", placeholder="an emoji of a red heart, twemoji style", lines=2,
                                    elem_id="prompt")
                generate = gr.Button("Generate", variant="primary", elem_id="generate")
                message = gr.HTML("", visible=False, elem_id="message")
                with gr.Accordion("Advanced", open=False, elem_id="advanced"):
                    negative = gr.Textbox(label="Negative prompt", elem_id="negative")
                    with gr.Row():
                        sampler = gr.Dropdown(samplers, value=d["sampler"], label="Sampler", elem_id="sampler")
                        steps = gr.Number(d["steps"], precision=0, label="Steps", elem_id="steps")
                    sigmas = gr.Dropdown(list(SIGMA_SCHEDULES), value=d["sigmas"], elem_id="sigmas",
                                         label="Sigma schedule (model: the model's scheduler config; karras, "
                                         f"exponential, beta: not for {', '.join(samplers_without_sigmas())})")
                    with gr.Row():
                        guidance = gr.Number(d["guidance"], label="Guidance (<= 1: off)", step=0.5,
                                             elem_id="guidance")
                        n = gr.Number(d["n"], precision=0, label="Number of images", elem_id="n")
                    with gr.Row():
                        seed = gr.Number(d["seed"], precision=0, label="Seed", elem_id="seed")
                        randomize = gr.Checkbox(False, label="Randomize seed", elem_id="randomize")
                    clip_skip = gr.Number(None, precision=0, label="Clip skip (blank: the model's own layer; 1 is "
                                          "A1111's 'Clip skip 2')", elem_id="clip-skip")
                    with gr.Row(visible=not cascade):
                        width = gr.Number(pipe.default_size, precision=0, label="Width", elem_id="width")
                        height = gr.Number(pipe.default_size, precision=0, label="Height", elem_id="height")
                    with gr.Column(visible=cascade):
                        stage_steps = [gr.Number(None, precision=0, label=f"Steps, stage {k + 1} (blank: Steps)",
                                                 elem_id=f"stage-steps-{k + 1}") for k in range(generator.stage_count)]
                        aug_level = gr.Number(None, label="Augmentation level, 0..1 (blank: each stage's own)",
                                              elem_id="aug-level")
                if examples:
                    gr.Examples([[e] for e in examples], inputs=[prompt], label="Examples", cache_examples=False)
            with gr.Column(scale=3):
                with gr.Tab("Images"):
                    gallery = gr.Gallery(label="Images", columns=3, fit_columns=False, height="auto",
                                         object_fit="contain", format="png", buttons=["download", "fullscreen"],
                                         elem_id="gallery")
                with gr.Tab("Compare", elem_id="compare-tab"):
                    gr.Markdown("The same prompt and seed twice: A with the Advanced settings, B with another sampler "
                                "or guidance scale.")
                    with gr.Row():
                        sampler_b = gr.Dropdown(samplers, value="euler" if d["sampler"] != "euler" else samplers[0],
                                                label="Sampler B", elem_id="sampler-b")
                        guidance_b = gr.Number(d["guidance"], label="Guidance B", step=0.5, elem_id="guidance-b")
                    compare = gr.Button("Compare", elem_id="compare")
                    with gr.Row():
                        image_a, image_b = (gr.Image(label=side, type="filepath", format="png", height=300,
                                                     buttons=["download"], elem_id=f"image-{side.lower()}")
                                            for side in ("A", "B"))
        fields = {prompt, negative, sampler, steps, guidance, seed, width, height, n, aug_level, clip_skip, sigmas,
                  *stage_steps}

        # The seed is drawn first and shown, so a failed request leaves the seed box as it was.
        for event in (generate.click, prompt.submit):
            event(pick_seed, [seed, randomize], [seed], queue=False).then(
                on_generate, fields, [gallery, message], concurrency_limit=1, concurrency_id="sampling")
        compare.click(pick_seed, [seed, randomize], [seed], queue=False).then(
            on_compare, fields | {sampler_b, guidance_b}, [image_a, image_b, message], concurrency_limit=1,
            concurrency_id="sampling")
    # One request samples at a time (one model in memory, Generate and Compare share the "sampling" slot); the
    # others wait their turn in gradio's queue.
    page.queue(default_concurrency_limit=1)
    return page


def launch(page, *, host: str = "127.0.0.1", port: int = 7860, share: bool = False, block: bool = True):
    """Serve the page locally: no share link unless asked, no server-side rendering (it would need node)."""
    try:
        page.launch(server_name=host, server_port=port, share=share, show_error=True, inbrowser=False,
                    prevent_thread_lock=not block, ssr_mode=False, pwa=False, mcp_server=False, quiet=True,
                    footer_links=["settings"], css=CSS)
    except OSError as e:
        raise LdmError(f"cannot serve on {host}:{port} ({e}); choose another --port or --host") from e
    return page


def output_root() -> Path:
    """A private folder for the page's images, removed by `remove_output_root` when the server stops."""
    return Path(tempfile.mkdtemp(prefix="ldm-demo-"))


def remove_output_root(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
