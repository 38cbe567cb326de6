"""The chat page in a real browser: headless Debian Chromium, driven by Selenium, against `pykimi serve`.

The test starts the real server on a free loopback port with the demo checkpoint, opens the page, attaches a
demo scene through the file input, asks "How many shapes are there?", waits (bounded) for the streamed answer
and checks it against the scene, opens the inspector, checks that the routing heat map and the attention map
draw something and change when another answer token is selected, and saves a screenshot in tmp_path.
With PYKIMI_WEBPAGE_SCREENSHOT=PATH it also writes the screenshot there (how docs/webpage.png is made).
Outside CI a machine without chromium / chromedriver / selenium skips; under CI=true it must run.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from pykimi import scenes
from pykimi.testing import free_port, http_get

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHROMIUM = os.environ.get("PYKIMI_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("PYKIMI_CHROMEDRIVER", "/usr/bin/chromedriver")
IN_CI = os.environ.get("CI", "").lower() == "true"


def _need_browser():
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not (os.path.isfile(p) and os.access(p, os.X_OK))]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium package")
    if missing:
        msg = "the browser test needs " + ", ".join(missing) + " (Debian: apt install chromium chromium-driver)"
        if IN_CI:
            pytest.fail("CI=true: " + msg)
        pytest.skip(msg)


@pytest.fixture
def browser_ok():
    _need_browser()


@pytest.fixture
def server(browser_ok, tmp_path):
    """`pykimi serve` on a free 127.0.0.1 port with the demo checkpoint; stopped (and reaped) afterwards."""
    port = free_port()
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "pykimi.cli", "serve", "--host", "127.0.0.1", "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(tmp_path))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"pykimi serve exited with {proc.returncode}: {(tmp_path / 'serve.log').read_text()[-2000:]}")
            try:
                if http_get(url + "/health")[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("pykimi serve did not answer /health within 120 s")
            time.sleep(0.25)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()


def make_driver(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              "--no-first-run", "--disable-default-apps", "--disable-extensions", "--mute-audio",
              f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1400,1000",
              "--force-device-scale-factor=1"):
        opts.add_argument(a)
    service = Service(executable_path=CHROMEDRIVER, log_output=str(tmp_path / "chromedriver.log"))
    return webdriver.Chrome(service=service, options=opts)


# canvas statistics in the page: (pixels, distinct colours among a sample, its data URL)
CANVAS_STATS = """
const c = document.querySelector(arguments[0]);
if (!c || !c.width || !c.height) return null;
const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
const seen = new Set();
for (let i = 0; i < d.length; i += 4 * 7) seen.add((d[i] << 16) | (d[i + 1] << 8) | d[i + 2]);
return [c.width * c.height, seen.size, c.toDataURL()];
"""


# a drop on the page or a paste into the prompt, carrying a small PNG drawn on a canvas
SYNTHETIC_FILE_EVENT = """
const kind = arguments[0];
const c = document.createElement('canvas'); c.width = 30; c.height = 20;
const g = c.getContext('2d'); g.fillStyle = '#f00'; g.fillRect(5, 5, 10, 10);
c.toBlob((blob) => {
  const dt = new DataTransfer();
  dt.items.add(new File([blob], 'x.png', {type: 'image/png'}));
  const ev = kind === 'drop' ? new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true})
                             : new ClipboardEvent('paste', {clipboardData: dt, bubbles: true, cancelable: true});
  (kind === 'drop' ? document.body : document.getElementById('prompt')).dispatchEvent(ev);
}, 'image/png');
"""


def drive(driver, url: str, scene_path: str, tmp_path, point=None, big_path=None, timeout: float = 120.0) -> dict:
    """The user's path through the page; returns what it saw. Every wait is bounded by ``timeout``.
    point: (x, y) in image pixels to click on the vision attention map (its query patch); big_path: a large
    image to ask about and stop before the answer comes."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    def tid(name):
        return driver.find_element(By.CSS_SELECTOR, f'[data-testid="{name}"]')

    wait = WebDriverWait(driver, timeout, poll_frequency=0.1)
    driver.set_page_load_timeout(timeout)
    driver.get(url + "/")
    wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, '[data-testid="prompt"]')))
    assert not tid("inspector").is_displayed()
    # drag and drop, then paste, of a PNG file made in the page (synthetic events carrying a real File)
    n_thumbs = "return document.querySelectorAll('#attachments img').length"
    for kind in ("drop", "paste"):
        driver.execute_script(SYNTHETIC_FILE_EVENT, kind)
        wait.until(lambda d: d.execute_script(n_thumbs) == 1)
        seen_kind = driver.execute_script("return document.querySelector('#attachments img').src.slice(0, 22)")
        assert seen_kind == "data:image/png;base64,", (kind, seen_kind)
        driver.find_element(By.CSS_SELECTOR, "#attachments .remove").click()
        wait.until(lambda d: d.execute_script(n_thumbs) == 0)
    tid("image-input").send_keys(scene_path)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#attachments img"))
    prompt = tid("prompt")
    prompt.send_keys("How many")
    prompt.send_keys(Keys.SHIFT, Keys.ENTER)                      # Shift+Enter: a new line, nothing sent
    assert "\n" in prompt.get_attribute("value") and not driver.find_elements(By.CSS_SELECTOR, ".msg")
    prompt.send_keys(Keys.BACKSPACE, " shapes are there?")
    assert prompt.get_attribute("value") == scenes.QUESTION_COUNT
    prompt.send_keys(Keys.ENTER)                                  # Enter sends
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, '[data-testid="answer"]'))
    wait.until(lambda d: not tid("send").get_attribute("disabled") and tid("stop").get_attribute("disabled"))
    answer = tid("answer").text
    meta = driver.find_element(By.CSS_SELECTOR, '[data-testid="answer-meta"]').text
    seen = {"answer": answer, "meta": meta}

    driver.find_element(By.ID, "inspect-btn").click()
    wait.until(lambda d: tid("inspector").is_displayed())
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#tokens .tok")) > 1
               and d.find_element(By.ID, "attention-map").get_attribute("data-token") == "0")
    wait.until(lambda d: (driver.execute_script(CANVAS_STATS, "#attention-map") or [0, 0])[1] > 8)  # preview drawn
    toks = driver.find_elements(By.CSS_SELECTOR, "#tokens .tok")
    seen["tokens"] = [t.text for t in toks]
    seen["top0"] = tid("top-tokens").text
    seen["routing0"] = driver.execute_script(CANVAS_STATS, '[data-testid="routing-heatmap"]')
    seen["attention0"] = driver.execute_script(CANVAS_STATS, '[data-testid="attention-map"]')
    seen["vision0"] = driver.execute_script(CANVAS_STATS, '[data-testid="vision-attention-map"]')
    # select the token that says the count (the digit), else the second token
    pick = next((i for i, t in enumerate(seen["tokens"]) if t.strip().isdigit()), 1)
    toks[pick].click()
    wait.until(lambda d: d.find_element(By.ID, "attention-map").get_attribute("data-token") == str(pick))
    seen["pick"] = pick
    seen["top1"] = tid("top-tokens").text
    seen["routing1"] = driver.execute_script(CANVAS_STATS, '[data-testid="routing-heatmap"]')
    seen["attention1"] = driver.execute_script(CANVAS_STATS, '[data-testid="attention-map"]')
    if point is not None:                         # pick the vision query patch under ``point``
        from selenium.webdriver.common.action_chains import ActionChains

        cv = tid("vision-attention-map")
        w, pw = driver.execute_script("return [arguments[0].getBoundingClientRect().width, "
                                      "arguments[0].width]", cv)
        padded = driver.execute_script("return state.insp.image.padded[0]")
        css = w / padded                                        # CSS px per image px
        ActionChains(driver).move_to_element_with_offset(
            cv, point[0] * css - w / 2, point[1] * css - cv.size["height"] / 2).click().perform()
        wait.until(lambda d: d.execute_script("return state.insp.vision_attention.patch") is not None)
        seen["vision_patch"] = driver.execute_script("return state.insp.vision_attention.patch")
        seen["vision1"] = driver.execute_script(CANVAS_STATS, '[data-testid="vision-attention-map"]')
    shot = tmp_path / "webpage.png"
    driver.save_screenshot(str(shot))
    seen["screenshot"] = shot

    # New chat empties the conversation; markup typed by the user is shown as text, never parsed
    driver.find_element(By.CSS_SELECTOR, '[data-testid="new-chat"]').click()
    wait.until(lambda d: not d.find_elements(By.CSS_SELECTOR, ".msg") and not tid("inspector").is_displayed())
    html = '<img src="x" onerror="window.__pwned=1"><b>hi</b>'
    tid("prompt").send_keys(html, Keys.ENTER)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, '[data-testid="answer"]')
               and not tid("send").get_attribute("disabled"))
    seen["html_text"] = driver.find_element(By.CSS_SELECTOR, ".msg.user .text").text
    seen["html_nodes"] = len(driver.find_elements(By.CSS_SELECTOR, ".msg .text *"))
    seen["pwned"] = driver.execute_script("return window.__pwned || 0")

    # Stop: a large picture (4096 patches, ~1000 LM tokens) keeps the server busy for seconds before the first
    # token; Stop aborts the request, the page says so and stays usable (checked by the next answer)
    if big_path is not None:
        tid("image-input").send_keys(big_path)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#attachments img"))
        tid("prompt").send_keys(scenes.QUESTION_COUNT, Keys.ENTER)
        wait.until(lambda d: not tid("stop").get_attribute("disabled"))
        t_stop = time.monotonic()
        tid("stop").click()
        wait.until(lambda d: not tid("send").get_attribute("disabled") and tid("stop").get_attribute("disabled"))
        seen["stop_seconds"] = time.monotonic() - t_stop
        seen["stop_meta"] = driver.find_elements(By.CSS_SELECTOR, ".msg.assistant .meta")[-1].text
        driver.find_element(By.CSS_SELECTOR, '[data-testid="new-chat"]').click()
        tid("image-input").send_keys(scene_path)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#attachments img"))
        tid("prompt").send_keys(scenes.QUESTION_COUNT, Keys.ENTER)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, '[data-testid="answer-meta"]')
                   and not tid("send").get_attribute("disabled"))
        seen["after_stop"] = tid("answer").text
    return seen


def test_chat_and_inspector_in_chromium(server, tmp_path):
    img, shapes = scenes.random_scene(np.random.default_rng(2026), n_shapes=3)
    scene = tmp_path / "scene.png"
    img.save(scene)
    driver = make_driver(tmp_path)
    try:
        s0 = shapes[0]
        y, x = np.mgrid[0:896, 0:896]
        big = tmp_path / "big.png"
        Image.fromarray(np.stack([x % 256, y % 256, (x + y) % 256], -1).astype(np.uint8)).save(big)
        seen = drive(driver, server, str(scene), tmp_path, point=(s0.cx, s0.cy), big_path=str(big))
        logs = driver.get_log("browser") if hasattr(driver, "get_log") else []
    finally:
        driver.quit()
    assert seen["answer"] == scenes.count_answer(shapes), seen
    assert "tok/s" in seen["meta"], seen["meta"]
    assert "".join(seen["tokens"]).strip() == seen["answer"].strip(), seen["tokens"]
    assert seen["tokens"][seen["pick"]].strip() == str(len(shapes))
    # the selected digit's top candidate is the count the model gave
    assert seen["top1"].splitlines()[0].startswith(f'"{len(shapes)}"'), seen["top1"]
    for k in ("routing0", "attention0", "vision0"):
        px, colours, _ = seen[k]
        assert px > 100 and colours > 4, (k, px, colours)           # drawn, not a blank canvas
    assert seen["routing0"][2] != seen["routing1"][2], "the routing heat map did not change with the token"
    assert seen["attention0"][2] != seen["attention1"][2], "the attention map did not change with the token"
    assert seen["top0"] != seen["top1"]
    gw = -(-img.size[0] // 28) * 2                                  # patches per row after padding
    assert seen["vision_patch"] == int(s0.cy // 14) * gw + int(s0.cx // 14), seen["vision_patch"]
    assert seen["vision1"][2] != seen["vision0"][2], "the vision map did not change with the query patch"
    assert seen["html_text"] == '<img src="x" onerror="window.__pwned=1"><b>hi</b>'
    assert seen["html_nodes"] == 0 and seen["pwned"] == 0
    assert "stopped" in seen["stop_meta"] and seen["stop_seconds"] < 5, (seen["stop_meta"], seen["stop_seconds"])
    assert seen["after_stop"] == scenes.count_answer(shapes)
    severe = [e for e in logs if e.get("level") == "SEVERE"]
    assert not severe, severe                                       # no JavaScript errors, no failed loads
    shot = seen["screenshot"]
    assert shot.stat().st_size > 10_000
    dest = os.environ.get("PYKIMI_WEBPAGE_SCREENSHOT")
    if dest:
        _save_small_png(shot, dest)


def _save_small_png(src, dest, max_width: int = 1100) -> None:
    """The committed README screenshot: the test's screenshot, downscaled and palette-quantised (small PNG)."""
    from PIL import Image

    im = Image.open(src).convert("RGB")
    if im.width > max_width:
        im = im.resize((max_width, round(im.height * max_width / im.width)), Image.Resampling.LANCZOS)
    im = im.quantize(colors=128, method=Image.Quantize.MEDIANCUT)
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    im.save(dest, optimize=True)
