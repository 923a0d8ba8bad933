"""ldm-demo: a local web page to generate and compare images with any model ldm loads (gradio, offline)."""
from __future__ import annotations

if __name__ == "__main__":  # python -m ldm.cli.demo: imported again inside the Ctrl-C guard (scripts.py)
    from ldm.cli.scripts import run_as_main

    run_as_main("ldm.cli.demo")

import argparse
import signal
import sys

from ldm.cli.common import add_single_file_options, cli_main
from ldm.cli.demo_page import Generator, build_page, example_prompts, import_gradio, launch, output_root, \
    remove_output_root
from ldm.models.attention import set_attention_backend
from ldm.pipeline.cascade import load_cascade
from ldm.pipeline.load import load_pipeline


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ldm-demo", description=__doc__)
    p.add_argument("--model", default=None, help="a native/diffusers folder, an original .safetensors/.ckpt, or a hub id "
                   "(default: the bundled model)")
    p.add_argument("--upscaler", action="append", default=[], metavar="MODEL",
                   help="a super-resolution stage run after the model, repeatable (an Imagen cascade)")
    p.add_argument("--port", type=_port, default=7860, help="1-65535")
    p.add_argument("--host", default="127.0.0.1", help="the address to listen on (0.0.0.0: every interface)")
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link (needs the internet)")
    p.add_argument("--examples", default="ldm_eval_v1", metavar="SET",
                   help="the example prompts: a bundled prompt set's name or a prompt file")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="fp32, fp16 or bf16 (default: fp16 on GPU, fp32 on CPU)")
    p.add_argument("--attention", default="sdpa", choices=["sdpa", "xformers", "math"])
    p.add_argument("--allow-pickle", action="store_true", help="allow legacy pickled .ckpt files (trusted files only)")
    add_single_file_options(p, "--model")
    return p


def _port(text: str) -> int:
    """An argparse type: a TCP port, refused before the model loads rather than by the server after it."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port (1-65535)")
    return port


def load_model(args):
    """The pipeline (or cascade) the page serves, loaded as ldm-txt2img loads it: a model that fails stops start-up."""
    set_attention_backend(args.attention)
    pipe = load_pipeline(args.model, device=args.device, dtype=args.dtype, allow_pickle=args.allow_pickle, ema=args.ema,
                         config=args.config, prediction_type=args.prediction_type)
    if args.upscaler:
        pipe = load_cascade(pipe, args.upscaler, device=args.device, dtype=args.dtype, allow_pickle=args.allow_pickle)
    return pipe


def _stop(signum, frame):
    """SIGTERM (a service manager, `kill`) stops the server as Ctrl-C does, so its image folder is removed."""
    raise KeyboardInterrupt


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import_gradio()  # before the model loads: a missing extra is said at once
    examples = example_prompts(args.examples)
    pipe = load_model(args)
    root = output_root()
    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        page = build_page(Generator(pipe, root), examples=examples)
        print(f"ldm-demo: serving {pipe.model_name or 'the bundled model'} on http://{args.host}:{args.port} "
              f"(Ctrl-C stops it; until then its images are in {root})", file=sys.stderr)
        launch(page, host=args.host, port=args.port, share=args.share)
    finally:
        signal.signal(signal.SIGTERM, previous)
        remove_output_root(root)
    return 0
