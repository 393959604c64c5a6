"""``r2unet serve``: a trained model behind a web page and an HTTP API (the ``serve`` extra: FastAPI + uvicorn).

FastAPI because it is the well-kept standard for a small typed HTTP API: request validation, multipart uploads and an
OpenAPI page (``/docs``) come with it, and uvicorn runs it. The page is one HTML file with its own script: nothing
is fetched from a CDN, so it works on a machine without a network connection.

Every request runs ``predict.run_predict`` (through ``Predictor``) on the uploaded bytes in a temporary folder: the
code path of ``r2unet predict``, so the mask the API returns is, byte for byte, the file ``predict`` writes for the
same image and flags. The model is loaded once; requests wait for it in turn behind a lock (FastAPI runs each in a
worker thread), so concurrent requests neither crash nor mix up their results. Bad input (an empty body, a file that
is not an image, a truncated one, one over the size limit) is a 4xx with the reason, and the server goes on.
"""

import base64
import io
import tempfile
import threading
from pathlib import Path

import numpy as np
from PIL import Image

from .data.io import IMAGE_EXTENSIONS, DataError
from .predict import OUTPUT_SUFFIXES, Predictor

PAGE = Path(__file__).with_name("serve_page.html")
_FORMATS = {"PNG": ".png", "JPEG": ".jpg", "BMP": ".bmp", "TIFF": ".tif", "MPO": ".jpg"}


class BadInput(ValueError):
    """An upload the server refuses: ``status`` (400, 413 or 415) and the reason."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class Segmenter:
    """One model for the server's life, and what a request asks of it: ``segment(data, name)``."""

    def __init__(self, predictor: Predictor, tta: bool = False, max_bytes: int = 50 * 2**20):
        self.predictor, self.tta, self.max_bytes = predictor, tta, max_bytes
        self.lock = threading.Lock()

    def info(self) -> dict:
        cfg = self.predictor.cfg
        return {"status": "ok", "model_type": cfg.model_type, "num_classes": max(1, cfg.num_classes),
                "classes": (["background", "lesion"] if cfg.num_classes <= 1
                            else ["background"] + [f"class {k}" for k in range(1, cfg.num_classes)]),
                "input_size": self.predictor.image_size, "threshold": self.predictor.threshold,
                "tta": self.tta, "device": str(self.predictor.device), "max_bytes": self.max_bytes}

    def segment(self, data: bytes, name: str, overlay: bool = False, probabilities: bool = False) -> dict:
        """The mask PNG (and the overlay JPEG) of one uploaded image, as ``predict`` writes them, and its area;
        ``probabilities``: a summary of the probability map too (binary models)."""
        if not data:
            raise BadInput(400, f"{name}: empty file")
        if len(data) > self.max_bytes:
            raise BadInput(413, f"{name}: {len(data) / 2**20:.1f} MiB is over the limit of "
                                f"{self.max_bytes / 2**20:.0f} MiB (r2unet serve --max_mb)")
        suffix = _image_suffix(data, name)
        probabilities = probabilities and self.predictor.cfg.num_classes <= 1
        with tempfile.TemporaryDirectory(prefix="r2unet-serve-") as tmp:
            src, out = Path(tmp) / f"upload{suffix}", Path(tmp) / "out"
            src.write_bytes(data)
            try:
                with self.lock:
                    self.predictor.run(src, out, log=lambda *_: None, tta=self.tta, save_overlay=overlay,
                                       save_probs=probabilities, progress=False)
            except DataError as exc:  # the message names the temporary copy: name the upload instead
                message = str(exc).replace(str(src), name).split("\n  ")[-1]
                raise BadInput(413 if "too large" in message else 400, message) from None
            mask = (out / f"upload{OUTPUT_SUFFIXES[0]}").read_bytes()
            result = {"file": name, "mask_png": mask, **self._area(mask)}
            if overlay:
                result["overlay_jpg"] = (out / f"upload{OUTPUT_SUFFIXES[2]}").read_bytes()
            if probabilities:
                result["probability"] = _summary(out / f"upload{OUTPUT_SUFFIXES[1]}", self.predictor.threshold)
        return result

    def _area(self, mask_png: bytes) -> dict:
        with Image.open(io.BytesIO(mask_png)) as img:
            values = np.asarray(img)
        h, w = values.shape
        if self.predictor.cfg.num_classes <= 1:
            fg = int(np.count_nonzero(values))
            return {"width": w, "height": h, "area_pixels": fg, "area_percent": round(100 * fg / (h * w), 3)}
        counts = np.bincount(values.ravel(), minlength=self.predictor.cfg.num_classes)
        return {"width": w, "height": h, "area_pixels": int(counts[1:].sum()),
                "area_percent": round(100 * float(counts[1:].sum()) / (h * w), 3),
                "classes": {f"class {k}": {"area_pixels": int(c), "area_percent": round(100 * int(c) / (h * w), 3)}
                            for k, c in enumerate(counts) if k > 0}}


def _summary(prob_png: Path, threshold: float) -> dict:
    """The probability map (``predict --save_probs``, 8-bit) in a few numbers."""
    with Image.open(prob_png) as img:
        probs = np.asarray(img, dtype=np.float64) / 255
    inside = probs[probs > threshold]
    return {"mean": round(float(probs.mean()), 4), "max": round(float(probs.max()), 4),
            "mean_inside_mask": round(float(inside.mean()), 4) if inside.size else None,
            "uncertain_percent": round(100 * float(((probs > 0.25) & (probs < 0.75)).mean()), 3)}


def _image_suffix(data: bytes, name: str) -> str:
    """The file suffix ``predict`` reads the upload by: the name's, else the format found in the bytes."""
    suffix = Path(name).suffix.lower()
    if suffix in IMAGE_EXTENSIONS:
        return suffix
    try:
        with Image.open(io.BytesIO(data)) as img:
            return _FORMATS.get(img.format or "", ".png")
    except Exception:  # noqa: BLE001 - whatever PIL cannot identify is not an image
        raise BadInput(415, f"{name}: not an image file (cannot identify its format; JPEG, PNG, BMP or TIFF "
                            "expected)") from None


def create_app(segmenter: Segmenter):
    """The FastAPI application: the page at ``/``, ``POST /predict``, ``POST /predict/batch``, ``GET /health``."""
    from typing import Annotated

    from fastapi import FastAPI, File, HTTPException, Query, UploadFile
    from fastapi.responses import HTMLResponse, JSONResponse, Response

    app = FastAPI(title="r2unet", description="Segment images with a trained R2U-Net family model. POST an image "
                  "to /predict: the mask PNG at the image's size (as `r2unet predict` writes it).")

    def read(file: UploadFile) -> tuple[bytes, str]:
        return file.file.read(segmenter.max_bytes + 1), file.filename or "upload"

    def run(file: UploadFile, overlay: bool = False, probabilities: bool = False) -> dict:
        data, name = read(file)
        try:
            return segmenter.segment(data, name, overlay, probabilities)
        except BadInput as exc:
            raise HTTPException(exc.status, str(exc)) from None

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> str:
        return PAGE.read_text()

    @app.get("/health")
    def health() -> dict:
        """The model served: its name, classes, input size, threshold and device."""
        return segmenter.info()

    @app.post("/predict", responses={200: {"content": {"image/png": {}}}})
    def predict(file: Annotated[UploadFile, File()], format: Annotated[str, Query(pattern="^(png|json)$")] = "png",
                images: Annotated[bool, Query(description="json: the mask PNG and overlay JPEG too (base64)")] = False):
        """The mask PNG at the image's original size; ``format=json``: its area and size and a summary of the
        probabilities (``images=true``: the mask and the overlay too, as base64 - what the page shows)."""
        result = run(file, overlay=format == "json" and images, probabilities=format == "json")
        if format == "png":
            return Response(result["mask_png"], media_type="image/png")
        return JSONResponse(_json(result, images))

    @app.post("/predict/batch")
    def predict_batch(files: Annotated[list[UploadFile], File()]) -> list[dict]:
        """Several images in one request: per file its area and mask PNG (base64), or its error."""
        answers = []
        for file in files:
            data, name = read(file)
            try:
                answers.append(_json(segmenter.segment(data, name), images=True))
            except BadInput as exc:
                answers.append({"file": name, "error": str(exc), "status": exc.status})
        return answers

    return app


def _json(result: dict, images: bool) -> dict:
    out = {k: v for k, v in result.items() if not k.endswith(("_png", "_jpg"))}
    if images:
        out.update({k: base64.b64encode(v).decode() for k, v in result.items() if k.endswith(("_png", "_jpg"))})
    return out


def serve(checkpoint: str | Path, host: str = "127.0.0.1", port: int = 8000, device: str = "auto",
          tta: bool = False, max_mb: float = 50, log=print, **predictor_options) -> None:
    """``r2unet serve``: load the checkpoint, then serve until Ctrl-C."""
    try:
        import uvicorn
    except ImportError:
        raise ValueError("serve needs FastAPI and uvicorn: pip install 'r2unet[serve]'") from None
    segmenter = Segmenter(Predictor(checkpoint, device=device, log=log, **predictor_options), tta=tta,
                          max_bytes=int(max_mb * 2**20))
    log(f"serving {segmenter.info()['model_type']} on http://{host}:{port}/ (the page; API: POST /predict, docs: "
        f"/docs)" + ("; only this machine can reach it: --host 0.0.0.0 serves the network (put it behind a proxy "
                     "with TLS and authentication first)" if host in ("127.0.0.1", "localhost") else ""))
    uvicorn.run(create_app(segmenter), host=host, port=port, log_level="warning")
