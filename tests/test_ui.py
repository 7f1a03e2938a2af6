"""The web UI in a real browser: Debian's Chromium (installed by .ci/run), driven by Playwright, against `vidsynth ui`
on tiny local models. A screenshot of the finished page is kept as a test artefact."""
from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest

from tiny_files import write_tiny_controlnet, write_tiny_files
from vidsynth.render import read_recipe
from vidsynth.video_io import video_info

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("VIDSYNTH_TEST_ARTIFACTS", REPO / "test-artifacts"))

pytest.importorskip("gradio", reason="the web UI's optional dependency: pip install '.[ui]'")
playwright = pytest.importorskip("playwright.sync_api", reason="test dependency: pip install '.[test]'")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from vidsynth.ui import launch

    root = tmp_path_factory.mktemp("ui")
    files = write_tiny_files(root / "models" / "tiny")
    files["controlnet"] = write_tiny_controlnet(root / "models" / "tiny" / "control_tiny_sd15_tile.pth")
    (root / "models" / "junk.safetensors").write_bytes(b"not a model")  # skipped by the pickers, not an error
    port = free_port()
    app = launch(root / "models", root / "outputs", port=port, device="cpu", dtype="float32", block=False)
    yield f"http://127.0.0.1:{port}", root, files
    app.close()


@pytest.fixture(scope="module")
def page():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"Chromium is not installed at {CHROMIUM}: apt-get install chromium (.ci/run does)")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1300})
        yield page
        browser.close()


def set_number(page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id} input")
    box.fill(str(value))
    box.press("Tab")


def pick(page, elem_id: str, option: str) -> None:
    page.locator(f"#{elem_id} input").click()
    page.get_by_role("option", name=option, exact=True).click()


def fill_form(page, url: str, prompt: str, frames: int, steps: int, seed: int) -> None:
    """Open the page and fill in the tiny models, the prompt and a 64x64 size."""
    page.goto(url)
    page.wait_for_selector("#generate")
    pick(page, "base", "tiny/tiny_sd15.safetensors")
    pick(page, "motion", "tiny/tiny_mm_v2.ckpt")
    page.locator("#prompt textarea").fill(prompt)
    for elem_id, value in {"width": 64, "height": 64, "frames": frames, "steps": steps, "seed": seed}.items():
        set_number(page, elem_id, value)


def test_generate_in_the_browser(server, page):
    url, root, files = server
    fill_form(page, url, "a red fox running in the snow", frames=4, steps=5, seed=11)
    page.locator("#generate").click()
    # the sampler's steps show as a progress bar on the page while it runs
    page.wait_for_function("() => /denoising/.test(document.querySelector('#result').innerText)", timeout=300_000)
    page.wait_for_selector("#result video", timeout=300_000)
    playable = page.wait_for_function(
        "() => { const v = document.querySelector('#result video'); return v && v.readyState >= 2 && v.duration > 0 }",
        timeout=60_000)
    assert playable
    page.wait_for_timeout(500)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "ui_generate.png"), full_page=True)

    (video,) = sorted((root / "outputs").glob("*.mp4"))
    info = video_info(video)
    assert (info["frames"], info["width"], info["height"]) == (4, 64, 64)
    recipe = read_recipe(video)
    assert (recipe.prompt, recipe.seed, recipe.steps, recipe.base.name) == (
        "a red fox running in the snow", 11, 5, "tiny_sd15.safetensors")
    assert "seed: 11" in page.locator("#recipe textarea").input_value()
    assert page.locator("#gallery").get_by_text("a red fox running in the snow").count() >= 1


def test_controlnet_unit_follows_an_uploaded_video(server, page, tmp_path):
    """A ControlNet from the models folder, its preprocessor and scale, and a control video uploaded in the page:
    the video is rendered with them (recorded in its recipe) and has the control video's frame count."""
    import numpy as np

    from vidsynth import save_video

    url, root, files = server
    guide = save_video(np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8),
                       tmp_path / "guide.mp4", fps=8)
    before = set((root / "outputs").glob("*.mp4"))
    fill_form(page, url, "a fox following the lines", frames=3, steps=2, seed=5)
    page.get_by_text("ControlNet", exact=True).first.click()  # open the accordion
    pick(page, "controlnet", "tiny/control_tiny_sd15_tile.pth")
    pick(page, "processor", "tile")
    page.locator("#control_video input[type=file]").set_input_files(str(guide))
    page.wait_for_selector("#control_video video", timeout=60_000)
    page.locator("#generate").click()
    page.wait_for_function(
        "n => document.querySelectorAll('#gallery img, #gallery video').length > n", arg=len(before),
        timeout=300_000)
    (video,) = set((root / "outputs").glob("*.mp4")) - before
    recipe = read_recipe(video)
    assert [(ref.name, ref.processor, ref.alpha) for ref in recipe.controlnets] == [
        ("control_tiny_sd15_tile.pth", "tile", 1.0)]
    assert recipe.control_frames is not None and video_info(video)["frames"] == 3
    page.screenshot(path=str(ARTIFACTS / "ui_controlnet.png"), full_page=True)


def test_errors_are_messages_not_tracebacks(server, page):
    url, root, _ = server
    page.goto(url)
    page.wait_for_selector("#generate")
    page.locator("#prompt textarea").fill("a fox")
    set_number(page, "width", 60)  # not a multiple of 8
    page.locator("#generate").click()
    message = page.get_by_text("multiples of 8")
    message.first.wait_for(timeout=120_000)
    assert page.get_by_text("Traceback").count() == 0
    page.screenshot(path=str(ARTIFACTS / "ui_error.png"), full_page=True)
