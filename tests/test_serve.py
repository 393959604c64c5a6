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

from r2unet.commands.cli import main  # noqa: E402
from r2unet.commands.serve import Service, create_app  # noqa: E402
from r2unet.engine.inference import Segmenter  # noqa: E402

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
    segmenter = Service(Segmenter(run, device="cpu", log=lambda *_: None), max_bytes=200_000)
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
    from_onnx = Service(Segmenter(tmp_path / "m.onnx", log=lambda *_: None))
    assert from_onnx.info()["input_size"] == Segmenter(run, device="cpu", log=lambda *_: None).image_size
    assert main(["predict", "--checkpoint", str(run), "--input", str(images[0].parent), "--output",
                 str(tmp_path / "masks"), "--device", "cpu", "--amp", "off"]) == 0
    for image in images:
        got = np.asarray(Image.open(io.BytesIO(from_onnx.segment(image.read_bytes(), image.name)["mask_png"])))
        want = np.asarray(Image.open(tmp_path / "masks" / f"{image.stem}_segmentation.png"))
        assert got.shape == want.shape and (got == want).mean() > 0.999  # onnxruntime's float32 rounding aside


# ------------------------------------------------------------------------ a server others can reach, bounded
def _asgi(app, method: str, path: str, headers: dict, chunks) -> tuple[int, dict, int]:
    """One request straight through the ASGI application, its body from the iterator ``chunks`` as the server asks
    for it: (status, JSON answer, body bytes the server read)."""
    import asyncio

    chunks = iter(chunks)
    read = {"bytes": 0}
    sent: list = []

    async def receive():
        chunk = next(chunks, None)
        if chunk is None:
            return {"type": "http.request", "body": b"", "more_body": False}
        read["bytes"] += len(chunk)
        return {"type": "http.request", "body": chunk, "more_body": True}

    async def send(message):
        sent.append(message)

    path, _, query = path.partition("?")
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": query.encode(), "root_path": "",
             "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 5000),
             "headers": [(k.lower().encode(), v.encode()) for k, v in {"host": "127.0.0.1:8000", **headers}.items()]}
    try:
        asyncio.run(app(scope, receive, send))
    except Exception:  # noqa: BLE001 - Starlette re-raises a 500's cause after sending it, for the server's log
        if not sent:
            raise
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    try:
        answer = json.loads(body)
    except ValueError:
        answer = {"raw": body}
    return status, answer, read["bytes"]


def _multipart(files: list[tuple[str, str, bytes]], boundary: str = "b0undary") -> tuple[dict, bytes]:
    body = b"".join(f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{name}"\r\n'
                    "Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n"
                    for field, name, data in files) + f"--{boundary}--\r\n".encode()
    return {"content-type": f"multipart/form-data; boundary={boundary}"}, body


@pytest.fixture(scope="module")
def small_limits(served):
    """The served model behind limits small enough to test: 100 KB a file, 300 KB a request, 4 files a batch."""
    _, run, images = served
    return Service(Segmenter(run, device="cpu", log=lambda *_: None), max_bytes=100_000,
                     max_request_bytes=300_000, max_files=4), images


def test_a_body_over_the_limit_is_refused_before_more_than_the_limit_is_read_or_kept(small_limits, served):
    import tracemalloc

    segmenter, images = small_limits
    app = create_app(segmenter)
    headers, _ = _multipart([])
    # declared too large: refused on the header, not a byte of the body read
    status, answer, read = _asgi(app, "POST", "/predict", {**headers, "content-length": str(2 * 2**30)},
                                 iter(lambda: b"\0" * 65536, None))
    assert status == 413 and read == 0 and "nothing was read" in answer["detail"]
    # no length (chunked), 2 GB on offer: reading stops at the limit, and memory stays near it
    start = b'--b0undary\r\nContent-Disposition: form-data; name="file"; filename="big.png"\r\n\r\n'
    for part_limit in (False, True):
        chunk = b"\0" * 65536
        offer = (start if i == 0 else chunk for i in range(2 * 2**30 // 65536))
        if part_limit:  # one file over the per-file limit inside a request under the request's limit
            segmenter.max_request_bytes = 10 * 2**20
        tracemalloc.start()
        status, answer, read = _asgi(app, "POST", "/predict", headers, offer)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        segmenter.max_request_bytes = 300_000
        limit = segmenter.max_bytes if part_limit else 300_000
        assert status == 413 and "over the limit" in answer["detail"], answer
        assert read <= limit + 2 * 65536 + len(start)  # what was read: the limit and a chunk, not 2 GB
        assert peak < limit + 2 * 2**20, peak  # what was held
    # a batch of more files than allowed
    small = images[0].read_bytes()
    assert len(small) < 60_000
    headers, body = _multipart([("files", f"{i}.jpg", small) for i in range(5)])
    status, answer, _ = _asgi(app, "POST", "/predict/batch", headers, [body])
    assert status == 413 and "more than 4 files" in answer["detail"]
    headers, body = _multipart([("files", f"{i}.jpg", small) for i in range(4)])
    status, answer, _ = _asgi(app, "POST", "/predict/batch", headers, [body])
    assert status == 200 and len(answer) == 4 and all("mask_png" in a for a in answer)
    # and over a real socket (uvicorn): a declared 2 GB body is refused at once
    url = served[0]
    import http.client

    conn = http.client.HTTPConnection(url.split("//")[1], timeout=30)
    conn.putrequest("POST", "/predict")
    conn.putheader("Content-Type", "multipart/form-data; boundary=b0undary")
    conn.putheader("Content-Length", str(2 * 2**30))
    conn.endheaders()
    response = conn.getresponse()
    assert response.status == 413 and "nothing was read" in json.loads(response.read())["detail"]
    conn.close()


def test_cross_site_and_renamed_host_requests_are_refused(small_limits):
    segmenter, images = small_limits
    headers, body = _multipart([("file", images[0].name, images[0].read_bytes())])
    app = create_app(segmenter)
    cases = {  # (extra headers, status)
        "a script (curl: no Origin)": ({}, 200),
        "the server's own page": ({"origin": "http://127.0.0.1:8000", "sec-fetch-site": "same-origin"}, 200),
        "a page elsewhere": ({"origin": "https://evil.example"}, 403),
        "a page elsewhere, Origin stripped": ({"sec-fetch-site": "cross-site"}, 403),
        "a sandboxed page": ({"origin": "null"}, 403),
        "DNS rebinding": ({"host": "evil.example:8000", "origin": "http://evil.example:8000"}, 403),
    }
    for what, (extra, want) in cases.items():
        status, answer, _ = _asgi(app, "POST", "/predict?format=json", {**headers, **extra}, [body])
        assert status == want, (what, answer)
        if want == 403:
            assert "refused" in answer["detail"] and ("--allowed_origins" in answer["detail"]
                                                      or "--allowed_hosts" in answer["detail"]), what
    status, _, _ = _asgi(app, "GET", "/health", {"host": "evil.example"}, [])
    assert status == 403  # a renamed host reads nothing either
    allowed = create_app(segmenter, origins={"https://lab.example"})
    status, answer, _ = _asgi(allowed, "POST", "/predict?format=json", {**headers, "origin": "https://lab.example"},
                              [body])
    assert status == 200 and answer["file"] == images[0].name


def test_no_upload_touches_the_disk_and_a_server_failure_is_json(small_limits, monkeypatch):
    import tempfile

    segmenter, images = small_limits
    app = create_app(segmenter)

    def no_disk(*args, **kwargs):
        raise AssertionError("an upload reached a temporary file")

    monkeypatch.setattr(tempfile, "_mkstemp_inner", no_disk)  # under every temporary file and spooled upload
    monkeypatch.setattr(tempfile, "mkdtemp", no_disk)
    before = set(os.listdir(tempfile.gettempdir()))
    for image in images[:3]:
        headers, body = _multipart([("file", image.name, image.read_bytes())])
        status, answer, _ = _asgi(app, "POST", "/predict?format=json&images=true", headers, [body])
        assert status == 200 and answer["mask_png"] and answer["overlay_jpg"]
    headers, body = _multipart([("files", p.name, p.read_bytes()) for p in images[:2]])
    assert _asgi(app, "POST", "/predict/batch", headers, [body])[0] == 200
    assert set(os.listdir(tempfile.gettempdir())) == before

    def broken(*args, **kwargs):
        raise RuntimeError("the device fell off the bus")

    monkeypatch.setattr(segmenter.segmenter, "forward", broken)
    headers, body = _multipart([("file", images[0].name, images[0].read_bytes())])
    status, answer, _ = _asgi(app, "POST", "/predict", headers, [body])
    assert status == 500 and "RuntimeError: the device fell off the bus" in answer["detail"]


def test_an_image_over_the_pixel_limit_is_refused_by_the_server_too(small_limits, monkeypatch):
    import io

    import numpy as np
    from PIL import Image

    segmenter, _ = small_limits
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((120, 120), np.uint8)).save(buffer, "PNG")  # 14 400 pixels, a few hundred bytes
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # Pillow would only warn between 10 000 and 20 000
    headers, body = _multipart([("file", "tall.png", buffer.getvalue())])
    status, answer, _ = _asgi(create_app(segmenter), "POST", "/predict", headers, [body])
    assert status == 413 and "tall.png: too large to decode safely" in answer["detail"]


@pytest.mark.parametrize("flag", [["--max_mb", "-1"], ["--max_mb", "0"], ["--max_mb", "nan"], ["--max_files", "0"],
                                  ["--max_request_mb", "inf"]])
def test_limits_that_refuse_everything_are_refused(flag, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--checkpoint", "model.pt", *flag])
    assert exit_.value.code == 2 and flag[0] in capsys.readouterr().err
