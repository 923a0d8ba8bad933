"""The README's picture of ldm-demo: the page with the bundled model's images, taken in headless Debian chromium.

    python tools/demo_screenshot.py --out docs/images/demo-page.png

Serves the page as `ldm-demo` does (bundled model unless --model), types the prompt, asks for four images and
waits for them, then photographs the page. Needs the demo extra, playwright and /usr/bin/chromium.
"""
from __future__ import annotations

import argparse
import socket
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm.cli.demo import build_parser as demo_parser  # noqa: E402
from ldm.cli.demo import load_model  # noqa: E402
from ldm.cli.demo_page import Generator, build_page, example_prompts, launch, output_root  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("docs/images/demo-page.png"))
    p.add_argument("--model", default=None)
    p.add_argument("--prompt", default="an emoji of a red heart, twemoji style")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--chromium", default="/usr/bin/chromium")
    args = p.parse_args()

    from playwright.sync_api import sync_playwright

    demo_args = demo_parser().parse_args(["--device", "cpu"] + (["--model", args.model] if args.model else []))
    page = build_page(Generator(load_model(demo_args), output_root()), examples=example_prompts("ldm_eval_v1"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launch(page, port=port, block=False)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
        tab = browser.new_page(viewport={"width": 1100, "height": 900})
        tab.set_default_timeout(300_000)
        tab.goto(f"http://127.0.0.1:{port}/")
        tab.locator("#prompt textarea").fill(args.prompt)
        tab.locator("#advanced").click()
        for name, value in (("steps", args.steps), ("guidance", args.guidance), ("seed", args.seed), ("n", args.n)):
            tab.locator(f"#{name} input").fill(str(value))
            tab.locator(f"#{name} input").press("Tab")
        tab.locator("#generate").click()
        tab.locator("#gallery img").nth(args.n - 1).wait_for()
        tab.wait_for_timeout(500)  # let the thumbnails finish painting
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tab.screenshot(path=str(args.out), full_page=True)
        browser.close()
    page.close()
    print(args.out)


if __name__ == "__main__":
    main()
