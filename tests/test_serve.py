"""`r2unet serve` on a free localhost port: the API against `predict`'s files, concurrent clients, bad input, and the
page driven in a headless Chromium.

The README's picture of the page comes from this test: ``R2UNET_SCREENSHOT=docs/serve_page.png`` saves the page there,
and ``R2UNET_SERVE_RUN=runs/demo/run`` serves that run (the demo's) instead of the small model trained here."""

import base64
import json
import os
import re
import shutil
import socket
import threading
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the serve extra (fastapi, uvicorn) is not installed")
uvicorn = pytest.importorskip("uvicorn", reason="the serve extra (fastapi, uvicorn) is not installed")

from conftest import prepared_synthetic  # noqa: E402

from r2unet.cli import main  # noqa: E402
from r2unet.predict import Predictor  # noqa: E402
from r2unet.serve import Segmenter, create_app  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A trained tiny model served on a free port: (base URL, the run folder, the test images)."""
    root = tmp_path_factory.mktemp("serve")
    data = prepared_synthetic(root, 30, seed=4, max_side=180)
    run = Path(os.environ.get("R2UNET_SERVE_RUN", root / "run"))
    if not (run / "checkpoints" / "best.pt").is_file():
        assert main(["train", "--data_path", str(data), "--output_dir", str(run), "--model_type", "U_Net",
                     "--base_channels", "4", "--image_size", "32", "--batch_size", "4", "--num_epochs", "2",
                     "--amp", "off", "--num_workers", "0", "--device", "cpu"]) == 0
    segmenter = Segmenter(Predictor(run, device="cpu", log=lambda *_: None), max_bytes=200_000)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(segmenter), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.05)
    yield url, run, sorted((data / "test").iterdir())
    server.should_exit = True
    thread.join(timeout=10)


def _post(url: str, files: list[tuple[str, str, bytes]]) -> tuple[int, bytes, str]:
    """A multipart POST of (field, file name, bytes); (status, body, content type)."""
    boundary = uuid.uuid4().hex
    body = b"".join(f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{name}"\r\n'
                    f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n"
                    for field, name, data in files) + f"--{boundary}--\r\n".encode()
    request = urllib.request.Request(url, body, {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return r.status, r.read(), r.headers.get("Content-Type", "")
    except urllib.error.HTTPError as err:
        return err.code, err.read(), err.headers.get("Content-Type", "")


def test_the_api_answers_with_predicts_files_byte_for_byte(served, tmp_path):
    url, run, images = served
    assert main(["predict", "--checkpoint", str(run), "--input", str(images[0].parent), "--output",
                 str(tmp_path / "masks"), "--device", "cpu"]) == 0
    for image in images:
        status, body, kind = _post(f"{url}/predict", [("file", image.name, image.read_bytes())])
        assert status == 200 and kind == "image/png"
        assert body == (tmp_path / "masks" / f"{image.stem}_segmentation.png").read_bytes(), image.name
    status, body, _ = _post(f"{url}/predict?format=json", [("file", images[0].name, images[0].read_bytes())])
    answer = json.loads(body)
    assert status == 200 and answer["file"] == images[0].name and 0 <= answer["area_percent"] <= 100
    assert 0 <= answer["probability"]["mean"] <= answer["probability"]["max"] <= 1
    with urllib.request.urlopen(f"{url}/health") as r:
        health = json.loads(r.read())
    assert health["model_type"] and health["input_size"] >= 32 and health["classes"][1] == "lesion"
    status, body, _ = _post(f"{url}/predict/batch", [("files", p.name, p.read_bytes()) for p in images[:3]])
    batch = json.loads(body)
    assert status == 200 and [a["file"] for a in batch] == [p.name for p in images[:3]]
    assert all(base64.b64decode(a["mask_png"]) == (tmp_path / "masks" / f"{p.stem}_segmentation.png").read_bytes()
               for a, p in zip(batch, images))


def test_fifty_requests_from_eight_clients_each_get_their_own_answer(served):
    url, _, images = served
    expected = {p.name: _post(f"{url}/predict", [("file", p.name, p.read_bytes())])[1] for p in images}
    jobs = [images[i % len(images)] for i in range(50)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda p: (p.name, _post(f"{url}/predict", [("file", p.name, p.read_bytes())])),
                                jobs))
    assert len(answers) == 50
    assert all(status == 200 and body == expected[name] for name, (status, body, _) in answers)


@pytest.mark.parametrize("name,data,status,said", [
    ("empty.jpg", b"", 400, "empty.jpg: empty file"),
    ("notes.txt", b"just some text, not a picture", 415, "notes.txt: not an image file"),
    ("cut.jpg", None, 400, "cut.jpg: unreadable or truncated image"),
    ("huge.png", b"\x89PNG" + b"\0" * 300_000, 413, "over the limit"),
])
def test_bad_input_gets_a_4xx_that_says_why_and_the_server_goes_on(served, name, data, status, said):
    url, _, images = served
    if data is None:
        data = images[0].read_bytes()[:-600]  # a JPEG whose end is missing
    got, body, _ = _post(f"{url}/predict", [("file", name, data)])
    assert got == status and said in json.loads(body)["detail"], body
    again, _, _ = _post(f"{url}/predict", [("file", images[0].name, images[0].read_bytes())])
    assert again == 200


def test_the_page_segments_an_uploaded_image_in_a_headless_chromium(served, tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium (the dev extra) is not installed")
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver_path:
        pytest.skip("Debian's chromium and chromium-driver are not installed (.ci/run installs them)")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, _, images = served
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1100,700"):
        options.add_argument(flag)
    from selenium.common.exceptions import WebDriverException

    try:
        browser = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver_path))
    except WebDriverException as exc:  # installed, but it cannot start on this machine
        pytest.skip(f"chromium does not start here: {str(exc).splitlines()[0][:200]}")
    try:
        browser.get(url)
        browser.find_element(By.ID, "files").send_keys(str(images[0]))
        WebDriverWait(browser, 60).until(lambda b: b.find_elements(By.CSS_SELECTOR, "img.overlay"))
        WebDriverWait(browser, 10).until(lambda b: b.execute_script(
            "return [...document.images].every(i => i.complete && i.naturalWidth > 0)"))
        area = browser.find_element(By.CSS_SELECTOR, ".area").text
        link = browser.find_element(By.CSS_SELECTOR, "a.download")
        assert link.get_attribute("download") == f"{images[0].stem}_segmentation.png"
        downloaded = base64.b64decode(browser.execute_async_script(
            "const done = arguments[arguments.length - 1];"
            "fetch(arguments[0]).then(r => r.arrayBuffer()).then(b => {"
            "  let s = ''; new Uint8Array(b).forEach(x => s += String.fromCharCode(x)); done(btoa(s)); });",
            link.get_attribute("href")))
        browser.save_screenshot(str(tmp_path / "serve_page.png"))
    finally:
        browser.quit()
    status, body, _ = _post(f"{url}/predict?format=json", [("file", images[0].name, images[0].read_bytes())])
    api = json.loads(body)
    shown = re.match(r"area: (\d+) pixels, ([\d.]+)% of the (\d+)x(\d+) image", area)
    assert shown and (int(shown[1]), float(shown[2]), int(shown[3]), int(shown[4])) == \
        (api["area_pixels"], api["area_percent"], api["width"], api["height"]), area
    assert downloaded == _post(f"{url}/predict", [("file", images[0].name, images[0].read_bytes())])[1]
    if os.environ.get("R2UNET_SCREENSHOT"):  # the README's picture of the page
        shutil.copyfile(tmp_path / "serve_page.png", os.environ["R2UNET_SCREENSHOT"])


def test_an_exported_onnx_model_is_served_too(served, tmp_path):
    pytest.importorskip("onnxruntime", reason="the export extra (onnxruntime) is not installed")
    import io

    import numpy as np
    from PIL import Image

    _, run, images = served
    assert main(["export", "--checkpoint", str(run), "--output", str(tmp_path / "m.onnx")]) == 0
    from_onnx = Segmenter(Predictor(tmp_path / "m.onnx", log=lambda *_: None))
    assert from_onnx.info()["input_size"] == Predictor(run, device="cpu", log=lambda *_: None).image_size
    assert main(["predict", "--checkpoint", str(run), "--input", str(images[0].parent), "--output",
                 str(tmp_path / "masks"), "--device", "cpu", "--amp", "off"]) == 0
    for image in images:
        got = np.asarray(Image.open(io.BytesIO(from_onnx.segment(image.read_bytes(), image.name)["mask_png"])))
        want = np.asarray(Image.open(tmp_path / "masks" / f"{image.stem}_segmentation.png"))
        assert got.shape == want.shape and (got == want).mean() > 0.999  # onnxruntime's float32 rounding aside
