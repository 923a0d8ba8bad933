"""ldm-demo in a real browser: Debian's chromium, headless, driven by playwright against one local server.

The page's PNG equals ldm-txt2img's for the same settings (pixels and metadata), the Advanced sampler and sigma
schedule reach the PNG's metadata, bad input (a sampler without the sigma schedule too) shows the CLI's message and the
page stays usable, two requests at once both finish, compare mode puts A and B side by side, and the page asks nothing
of any host but 127.0.0.1.
"""
import io
import json
import os
import re
import shutil
import socket
from urllib.parse import urlsplit

import numpy as np
import pytest
from PIL import Image

from helpers import write_tiny_sd

from ldm.cli import txt2img
from ldm.cli.demo import build_parser, load_model
from ldm.cli.demo_page import Generator, build_page, example_prompts, launch

gradio = pytest.importorskip("gradio", reason="the demo extra is not installed: pip install -e '.[demo]'")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed: pip install playwright")
CHROMIUM = os.environ.get("LDM_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip("no chromium on PATH (Debian: apt-get install chromium; or set LDM_CHROMIUM)", allow_module_level=True)

pytestmark = pytest.mark.slow  # one server and one browser for the module: about a minute on 2 cores
FAST = {"steps": "2", "width": "16", "height": "16", "guidance": "3"}  # tiny images, two steps: the browser is the test
TIMEOUT_MS = 120_000  # generation on a loaded 2-core machine; a hang still fails


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_tiny_sd(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="module")
def server(model, tmp_path_factory):
    """One page on 127.0.0.1 for the module, made as ldm-demo makes it; the hosts the server itself resolves."""
    resolved = []
    real_getaddrinfo = socket.getaddrinfo

    def recording_getaddrinfo(host, *args, **kwargs):
        resolved.append(host)
        return real_getaddrinfo(host, *args, **kwargs)

    socket.getaddrinfo = recording_getaddrinfo
    pipe = load_model(build_parser().parse_args(["--model", str(model), "--device", "cpu"]))
    page = build_page(Generator(pipe, tmp_path_factory.mktemp("demo-out")), examples=example_prompts("ldm_eval_v1"))
    port = free_port()
    launch(page, port=port, block=False)
    try:
        yield {"url": f"http://127.0.0.1:{port}/", "resolved": resolved}
    finally:
        page.close()
        socket.getaddrinfo = real_getaddrinfo


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield browser
        browser.close()


def open_tab(browser, url: str):
    """A fresh browser context's tab on the page, once the page has drawn; every URL it requests is kept in
    `tab.requested`."""
    tab = browser.new_context().new_page()
    tab.set_default_timeout(TIMEOUT_MS)
    tab.set_default_navigation_timeout(TIMEOUT_MS)
    tab.requested = []
    tab.on("request", lambda request: tab.requested.append(request.url))
    tab.goto(url)
    tab.locator("#prompt textarea").wait_for()
    return tab


@pytest.fixture
def page(browser, server):
    tab = open_tab(browser, server["url"])
    yield tab
    tab.context.close()


def fill(tab, **fields):
    """Type into the Advanced panel's fields (opening it once): steps, seed, width, height, guidance, n, negative."""
    if not tab.locator("#steps").is_visible():
        tab.locator("#advanced").click()
    for name, value in fields.items():
        box = tab.locator(f"#{name} textarea" if name == "negative" else f"#{name} input")
        box.select_text()
        box.press_sequentially(str(value))  # typed over the old value key by key, as a person does
        box.press("Tab")  # gradio takes a number when the box loses focus
        sync_api.expect(box).to_have_value(str(value))


def choose(tab, dropdown: str, option: str):
    tab.locator(f"#{dropdown} input").click()
    tab.get_by_role("option", name=option, exact=True).click()


def generate(tab, prompt: str) -> list[bytes]:
    """Type the prompt, press Generate, wait for the gallery to change, and read each image back over HTTP."""
    before = tab.locator("#gallery img").evaluate_all("imgs => imgs.map(i => i.src)")
    tab.locator("#prompt textarea").fill(prompt)
    tab.locator("#generate").click()
    tab.wait_for_function(
        "before => { const s = [...document.querySelectorAll('#gallery img')].map(i => i.src);"
        " return s.length > 0 && s.join() !== before.join(); }", arg=before)
    sources = tab.locator("#gallery img").evaluate_all("imgs => [...new Set(imgs.map(i => i.src))]")
    return [tab.request.get(src, timeout=TIMEOUT_MS).body() for src in sources]


def png(data: bytes) -> tuple[np.ndarray, dict]:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB")), json.loads(image.text["ldm"])


def cli_png(model, tmp_path, prompt: str, *flags) -> bytes:
    out = tmp_path / "cli"
    assert txt2img.main([prompt, "--model", str(model), "--device", "cpu", "--out", str(out), *flags]) == 0
    (path,) = sorted(out.glob("*.png"))
    return path.read_bytes()


def test_typed_prompt_gives_the_clis_png(page, model, tmp_path):
    fill(page, seed=5, **FAST)
    (served,) = generate(page, "a red circle")
    expected = cli_png(model, tmp_path, "a red circle", "--seed", "5", "--steps", "2", "--width", "16",
                       "--height", "16", "--guidance", "3")
    pixels, metadata = png(served)
    cli_pixels, cli_metadata = png(expected)
    assert pixels.shape == (16, 16, 3) and pixels.std() > 0
    assert np.array_equal(pixels, cli_pixels)
    assert metadata == cli_metadata  # file name, prompt, seed, sampler, steps, guidance, size, model
    assert served == expected  # the gallery serves the very file the pipeline wrote


def test_sampler_from_advanced_and_randomized_seed_reach_the_png(page):
    fill(page, **FAST)
    choose(page, "sampler", "euler")
    page.locator("#randomize input").check()
    (served,) = generate(page, "a blue square")
    _, metadata = png(served)
    assert metadata["sampler"] == "euler"
    shown = int(page.locator("#seed input").input_value())
    assert metadata["seed"] == shown and metadata["text"] == "a blue square"


@pytest.mark.parametrize("fields, prompt, message", [
    ({"steps": "0"}, "a cat", "--steps must be a positive number of sampling steps, got 0"),
    ({"steps": "2", "height": "18"}, "a cat", "--height 18 is not a positive multiple of the model's factor"),
    ({"steps": "2", "guidance": "7.5"}, "", "with an empty prompt and no negative prompt"),
], ids=["steps-0", "size", "empty-prompt-with-guidance"])
def test_bad_input_shows_the_cli_message_and_the_page_stays_usable(page, model, tmp_path, capsys, fields, prompt,
                                                                     message):
    flags = [f"--{k}={v}" for k, v in fields.items()]
    assert txt2img.main([prompt, "--model", str(model), "--device", "cpu", "--out", str(tmp_path / "o"), *flags]) == 2
    (cli_line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert message in cli_line  # the CLI says it so ...
    fill(page, **{"width": "16", "height": "16", **fields})
    page.locator("#prompt textarea").fill(prompt)
    page.locator("#generate").click()
    sync_api.expect(page.locator("#message")).to_have_text(cli_line)  # ... and the page says the same
    fill(page, **FAST)
    assert len(generate(page, "a cat")) == 1  # the next request works
    sync_api.expect(page.locator("#message")).to_be_hidden()


def test_sigma_schedule_from_advanced_reaches_the_png_and_a_sampler_without_it_is_the_clis_message(page, model,
                                                                                                  tmp_path, capsys):
    assert txt2img.main(["a cat", "--model", str(model), "--sampler", "ddim", "--sigmas", "karras",
                         "--out", str(tmp_path / "o")]) == 2
    (cli_line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    fill(page, **FAST)
    choose(page, "sampler", "ddim")
    choose(page, "sigmas", "karras")
    page.locator("#prompt textarea").fill("a cat")
    page.locator("#generate").click()
    sync_api.expect(page.locator("#message")).to_have_text(cli_line)  # refused on the page, as on the command line
    choose(page, "sampler", "euler")
    (served,) = generate(page, "a cat")
    _, metadata = png(served)
    assert (metadata["sampler"], metadata["sigmas"]) == ("euler", "karras")
    sync_api.expect(page.locator("#message")).to_be_hidden()


def test_a_progress_bar_follows_the_sampler_steps(page):
    fill(page, steps=300, width=16, height=16, guidance=1)
    page.locator("#prompt textarea").fill("a red circle")
    page.locator("#generate").click()
    page.locator("#gallery .progress-bar").wait_for()  # gradio's bar, fed by the sampler's tqdm (track_tqdm)
    page.locator("#gallery").get_by_text(re.compile(r"\b\d+/300 steps")).wait_for()
    page.locator("#gallery img").first.wait_for()


def test_two_requests_at_once_both_finish(browser, server):
    tabs = []
    for prompt in ("a red circle", "a green triangle"):
        tab = open_tab(browser, server["url"])
        fill(tab, n=2, **FAST)
        tab.locator("#prompt textarea").fill(prompt)
        tabs.append(tab)
    for tab in tabs:  # both clicks before either finishes: the second waits in gradio's queue
        tab.locator("#generate").click()
    for tab, prompt in zip(tabs, ("a red circle", "a green triangle")):
        tab.locator("#gallery img").nth(1).wait_for()
        sources = tab.locator("#gallery img").evaluate_all("imgs => [...new Set(imgs.map(i => i.src))]")
        metadata = [png(tab.request.get(src, timeout=TIMEOUT_MS).body())[1] for src in sources]
        assert [(m["text"], m["batch_index"]) for m in metadata] == [(prompt, 0), (prompt, 1)]
        tab.context.close()


def test_compare_mode_and_no_request_leaves_127_0_0_1(page, server):
    fill(page, seed=3, **FAST)
    page.locator("#prompt textarea").fill("a yellow star")
    page.get_by_role("tab", name="Compare").click()
    choose(page, "sampler-b", "ddim")
    page.locator("#compare").click()
    images = []
    for side in ("#image-a", "#image-b"):
        page.locator(f"{side} img").wait_for()
        src = page.locator(f"{side} img").get_attribute("src")
        images.append(png(page.request.get(src, timeout=TIMEOUT_MS).body()))
    (a, meta_a), (b, meta_b) = images
    assert (meta_a["sampler"], meta_b["sampler"]) == ("dpmpp_2m", "ddim")
    assert meta_a["seed"] == meta_b["seed"] == 3 and meta_a["text"] == meta_b["text"] == "a yellow star"
    assert not np.array_equal(a, b)
    page.get_by_text("a wooden rocking chair on a porch").first.click()  # an example fills the prompt box
    sync_api.expect(page.locator("#prompt textarea")).to_have_value("a wooden rocking chair on a porch")
    hosts = {urlsplit(url).hostname for url in page.requested if urlsplit(url).scheme in ("http", "https", "ws", "wss")}
    assert hosts == {"127.0.0.1"}, f"the page asked other hosts: {sorted(hosts - {'127.0.0.1'})}"
    assert page.requested and all(url.split(":")[0] in ("http", "data", "blob") for url in page.requested)
    assert set(server["resolved"]) <= {"127.0.0.1", "localhost"}, f"the server looked up {set(server['resolved'])}"
