"""int8 models made from a checkpoint (``r2unet export --int8``): calibrated, their masks checked against float32's,
and run in the checkpoint's place where it would run in float32 on a CPU, with the same bytes from predict and
serve."""

import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from r2unet import create_model
from r2unet.commands.cli import main
from r2unet.data.imageio import is_image_file
from r2unet.engine import int8
from r2unet.engine.checkpoint import save_checkpoint
from r2unet.engine.config import TrainConfig
from r2unet.engine.inference import Segmenter, _to_input
from r2unet.engine.onnx import OnnxModel, export_onnx

onnx = pytest.importorskip("onnx", reason="the export extra (onnx, onnxruntime) is not installed")
pytest.importorskip("onnxruntime", reason="the export extra (onnx, onnxruntime) is not installed")


def _run(folder, seed: int = 0):
    """A run folder with a tiny R2U-Net trained in float32 (amp off: it runs in float32 on any CPU)."""
    torch.manual_seed(seed)
    model = create_model("R2U_Net", t=2, base_channels=4)
    with torch.no_grad():  # BatchNorm statistics that make the outputs vary with the input
        model.train()
        for _ in range(3):
            model(torch.randn(4, 3, 32, 32) * 2 + 0.3)
    cfg = TrainConfig(model_type="R2U_Net", t=2, base_channels=4, image_size=32, amp="off", device="cpu",
                      threshold=0.38, data_path=str(folder / "nowhere"))  # the threshold: masks not all background
    save_checkpoint(folder / "checkpoints" / "best.pt", model=model.eval(), config=cfg.to_dict(), epoch=1)
    return folder, model, cfg


def _photos(folder, n: int, seed: int = 5):
    """Smooth random photos (blobs, not noise: masks with regions and edges), of several sizes."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        h, w = 60 + 7 * i, 80 + 5 * i
        small = rng.integers(0, 255, (4, 5, 3), dtype=np.uint8)
        Image.fromarray(small).resize((w, h), Image.BILINEAR).save(folder / f"p{i}.png")
    return folder


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("int8")
    run, model, cfg = _run(root / "run")
    photos = _photos(root / "photos", 8)
    assert main(["export", "--checkpoint", str(run), "--int8", "--calibration", str(photos)]) == 0
    return run, model, cfg, photos


def _meta(path) -> dict:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def test_export_int8_writes_a_quantised_model_with_its_measured_mask_agreement(exported):
    run, model, cfg, photos = exported
    path = run / "model.int8.onnx"  # the default output: the run folder
    graph = onnx.load(str(path)).graph
    assert any(n.op_type == "QuantizeLinear" for n in graph.node)  # activations in 8 bits...
    assert any(t.data_type == onnx.TensorProto.INT8 for t in graph.initializer)  # ...and weights
    meta = _meta(path)
    assert meta[int8.PRECISION] == "int8" and meta[int8.SOURCE] == int8.file_digest(run / "checkpoints" / "best.pt")
    # the agreement it records is the share of equal mask pixels at the images' sizes, as predict makes them:
    # recomputed here from the two models' predictions on the images it was checked on (every other one)
    checks = sorted(photos.iterdir())[1::2]
    equal = total = foreground = 0
    quantised = Segmenter(path, log=lambda *_: None, postprocess="none")
    reference = Segmenter.of(model, cfg)
    for (_, _, a), (_, _, b) in zip(reference.predict(checks), quantised.predict(checks)):
        equal += int(((a > 0.38) == (b > 0.38)).sum())  # the run's threshold
        foreground += int((a > 0.38).sum())
        total += a.size
    assert 0.2 < foreground / total < 0.8  # masks with regions and edges, where int8 can differ
    assert float(meta[int8.AGREED]) == pytest.approx(equal / total, abs=1e-6)
    assert meta[int8.CHECKED_ON] == f"4 images of {photos}"
    assert 0.9 < equal / total < 1  # this tiny, barely trained network differs on a few edge pixels


def _with_agreement(path, value: float, to):
    """A copy of the int8 model ``path`` at ``to`` whose recorded agreement is ``value``."""
    proto = onnx.load(str(path))
    for p in proto.metadata_props:
        if p.key == int8.AGREED:
            p.value = str(value)
    onnx.save(proto, str(to))
    return to


def _copy(run, folder):
    """A copy of the run's checkpoint in a run folder of its own, so the shared one keeps its files."""
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "checkpoints" / "best.pt").write_bytes((run / "checkpoints" / "best.pt").read_bytes())
    return folder


def test_a_checked_int8_model_runs_in_place_of_a_checkpoint_that_would_run_in_float32(exported, tmp_path, cpu_like):
    cpu_like("AVX2")
    run, model, cfg, _ = exported
    other = _copy(run, tmp_path / "run")
    target = other / "model.int8.onnx"
    lines = []

    def member_model(**options):
        lines.clear()
        return Segmenter(other, log=lines.append, **options).members[0].model

    _with_agreement(run / "model.int8.onnx", 0.9995, target)
    chosen = member_model()
    assert isinstance(chosen, OnnxModel) and chosen.path == target
    assert any("in place of" in line and "99.95 %" in line for line in lines)
    assert not isinstance(member_model(runtime="torch"), OnnxModel)  # asked for the checkpoint itself
    assert not isinstance(member_model(amp="off"), OnnxModel)  # float32 asked for: not int8
    assert not isinstance(member_model(image_size=64), OnnxModel)  # checked at 32 px only

    _with_agreement(run / "model.int8.onnx", "n/a", target)  # an agreement that is no number: none
    assert not isinstance(member_model(), OnnxModel)
    _with_agreement(run / "model.int8.onnx", 0.9985, target)  # masks too far from float32's: not by default
    assert not isinstance(member_model(), OnnxModel)
    assert any("99.850 % of the pixels only" in line and "--output" in line for line in lines)  # and what instead
    target.unlink()
    assert not isinstance(member_model(), OnnxModel)
    assert any("--int8' writes" in line for line in lines)  # the note that says how to make one

    _with_agreement(run / "model.int8.onnx", 0.9995, target)
    assert main(["export", "--checkpoint", str(other), "--output", str(other / "model.onnx")]) == 0
    assert isinstance(member_model(), OnnxModel) and member_model().path == target  # int8 before float
    assert member_model(amp="off").path == other / "model.onnx"  # float32 asked for: the float export
    target.unlink()

    proto = onnx.load(str(_with_agreement(run / "model.int8.onnx", 0.9995, target)))
    del proto.graph.node[: len(proto.graph.node) // 2]  # a damaged file (its metadata intact): named, not fatal
    onnx.save(proto, str(target))
    assert not isinstance(member_model(), OnnxModel)
    assert any(line.startswith("warning: ") and str(target) in line for line in lines)
    target.unlink()

    _run(other, seed=1)  # a new best.pt: the files made from the old one are nobody's
    assert not isinstance(member_model(), OnnxModel)


def test_on_a_cpu_with_native_bf16_a_checked_int8_model_runs_but_not_a_float32_export(exported, tmp_path,
                                                                                    cpu_like):
    """bf16 PyTorch outran onnxruntime's float32 there, and int8 outran bf16 (benchmarks/README.md)."""
    cpu_like("AMX")
    run, _, _, _ = exported
    other = _copy(run, tmp_path / "run")
    assert main(["export", "--checkpoint", str(other), "--output", str(other / "model.onnx")]) == 0
    segmenter = Segmenter(other, amp="auto", log=lambda *_: None)  # the checkpoint's own setting would be float32
    assert not isinstance(segmenter.members[0].model, OnnxModel)
    assert segmenter.members[0].precision.dtype == torch.bfloat16
    _with_agreement(run / "model.int8.onnx", 0.9995, other / "model.int8.onnx")
    assert Segmenter(other, amp="auto", log=lambda *_: None).members[0].model.path == other / "model.int8.onnx"
    assert not isinstance(Segmenter(other, amp="bf16", log=lambda *_: None).members[0].model, OnnxModel)


def test_predict_and_serve_give_the_same_bytes_through_the_int8_model(exported, tmp_path):
    pytest.importorskip("fastapi", reason="the serve extra (fastapi, uvicorn) is not installed")
    from r2unet.commands.serve import Service

    run, _, _, photos = exported
    target = _with_agreement(run / "model.int8.onnx", 0.9995, tmp_path / "model.int8.onnx")
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "best.pt").write_bytes((run / "checkpoints" / "best.pt").read_bytes())
    assert main(["predict", "--checkpoint", str(tmp_path), "--input", str(photos), "--output",
                 str(tmp_path / "masks")]) == 0
    segmenter = Segmenter(tmp_path, log=lambda *_: None)
    assert isinstance(segmenter.members[0].model, OnnxModel) and segmenter.members[0].model.path == target
    service = Service(segmenter, max_bytes=1_000_000)
    assert service.info()["runs"] == ["model.int8.onnx (onnxruntime, int8)"]  # the server says what computes
    for image in sorted(photos.iterdir()):
        answer = service.segment(image.read_bytes(), image.name)
        assert answer["mask_png"] == (tmp_path / "masks" / f"{image.stem}_segmentation.png").read_bytes()


def test_int8_without_images_to_calibrate_on_says_what_to_pass(tmp_path, capsys):
    run, _, _ = _run(tmp_path / "run")
    assert main(["export", "--checkpoint", str(run), "--int8"]) == 2
    err = capsys.readouterr().err
    assert "--calibration DIR" in err and not (run / "model.int8.onnx").exists()
    assert main(["export", "--checkpoint", str(run)]) == 2
    assert "--output" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(run), "--output", str(tmp_path / "m.onnx"), "--calibration",
                 str(tmp_path)]) == 2
    assert "goes with --int8" in capsys.readouterr().err and not (tmp_path / "m.onnx").exists()
    onnx_file = tmp_path / "model.onnx"
    onnx_file.write_bytes(b"not read")
    for flags in (["--int8"], ["--output", str(tmp_path / "again.onnx")]):
        assert main(["export", "--checkpoint", str(onnx_file), *flags]) == 2
        assert "is an ONNX file already" in capsys.readouterr().err


def test_a_label_map_model_is_quantised_and_its_class_maps_checked(tmp_path):
    torch.manual_seed(1)
    model = create_model("U_Net", base_channels=4, output_ch=3)
    with torch.no_grad():
        model.train()
        for _ in range(3):
            model(torch.randn(4, 3, 32, 32) * 2 + 0.3)
    cfg = TrainConfig(model_type="U_Net", base_channels=4, image_size=32, num_classes=3, amp="off", device="cpu")
    photos = _photos(tmp_path / "photos", 6, seed=7)
    with torch.no_grad():  # logits that vary, centred on these photos per class: every class wins somewhere
        x = torch.cat([_to_input(np.asarray(Image.open(p).convert("RGB")), 32, 3) for p in sorted(photos.iterdir())])
        model.Conv_1x1.weight *= 50
        model.Conv_1x1.bias *= 50
        model.Conv_1x1.bias -= model.eval()(x).mean((0, 2, 3))
    save_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt", model=model.eval(), config=cfg.to_dict(), epoch=1)
    assert main(["export", "--checkpoint", str(tmp_path / "run"), "--int8", "--calibration", str(photos)]) == 0
    path = tmp_path / "run" / "model.int8.onnx"
    checks = sorted(photos.iterdir())[1::2]
    equal = total = 0
    classes = set()
    quantised = Segmenter(path, log=lambda *_: None, postprocess="none")
    assert quantised.task.classes == 3  # the class count travels in its metadata
    for (_, _, a), (_, _, b) in zip(Segmenter.of(model, cfg).predict(checks), quantised.predict(checks)):
        equal += int((a == b).sum())  # class maps, pixel by pixel
        classes |= set(np.unique(a).tolist())
        total += a.size
    assert len(classes) >= 2 and float(_meta(path)[int8.AGREED]) == pytest.approx(equal / total, abs=1e-6)


def test_a_folder_of_runs_gets_an_int8_model_in_each_run(exported, tmp_path, capsys):
    """Cross-validation folds or seeds: each run's file, so an ensemble runs int8 model by model."""
    run, _, _, photos = exported
    for k in range(2):
        _copy(run, tmp_path / "folds" / f"fold_{k}")
    assert main(["export", "--checkpoint", str(tmp_path / "folds"), "--int8", "--calibration", str(photos)]) == 0
    assert capsys.readouterr().out.count("wrote ") == 2
    for k in range(2):
        meta = _meta(tmp_path / "folds" / f"fold_{k}" / "model.int8.onnx")
        assert meta[int8.SOURCE] == int8.file_digest(run / "checkpoints" / "best.pt")


def _train(tmp_path, data, **settings):
    from r2unet.engine.trainer import fit

    lines = []
    cfg = TrainConfig(model_type="R2U_Net", t=2, base_channels=4, image_size=32, batch_size=4, num_epochs=2,
                      num_epochs_decay=1, lr=2e-3, amp="off", num_workers=0, device="cpu", data_path=str(data),
                      output_dir=str(tmp_path / "run"), seed=1, **settings)
    fit(cfg, log=lambda *a, **k: lines.append(" ".join(map(str, a))))
    return tmp_path / "run", "\n".join(lines)


@pytest.mark.parametrize("bar", [0.0, 1.5], ids=["int8-agrees", "int8-refused"])
def test_train_with_int8_on_ends_with_a_checked_int8_model_of_its_kept_checkpoint(tmp_path, tiny_data, monkeypatch,
                                                                                 bar):
    """The bar an int8 model's masks must reach is moved so that either outcome is tested whatever this 2-epoch
    model's agreement is: refused, the run also gets a float32 export, which then runs in the checkpoint's place
    where PyTorch would run float32."""
    monkeypatch.setattr(int8, "AGREEMENT", bar)
    run, log = _train(tmp_path, tiny_data, int8="on")
    path = run / "model.int8.onnx"
    meta = _meta(path)
    assert meta[int8.PRECISION] == "int8" and meta[int8.SOURCE] == int8.file_digest(run / "checkpoints" / "best.pt")
    valid = [p for p in (tiny_data / "valid").iterdir() if is_image_file(p)]  # checked on the validation images
    assert meta[int8.CHECKED_ON] == f"{min(len(valid), int8.CHECK_IMAGES)} validation images of {tiny_data}"
    assert 0 <= float(meta[int8.AGREED]) <= 1 and f"wrote {path} (int8)" in log
    assert (run / "results.json").is_file()  # the scores came first
    found = int8.companion(run, image_size=32)
    if bar == 0.0:  # agrees: the int8 model is the run's companion, and no float export is made
        assert found[0] == path and not (run / "model.onnx").exists()
    else:
        assert found[0] == run / "model.onnx" and _meta(run / "model.onnx").get(int8.PRECISION) is None
        assert "a float32 export runs in its place on CPUs without native bf16" in log
        assert f"wrote {run / 'model.onnx'} (opset" in log and "max |diff|" in log  # checked against PyTorch
        assert _meta(run / "model.onnx")[int8.SOURCE] == meta[int8.SOURCE]  # made from the same checkpoint


def test_train_with_int8_on_but_no_onnxruntime_finishes_and_says_how_to_make_it_later(tmp_path, tiny_data,
                                                                                        monkeypatch):
    for name in ("onnxruntime", "onnxruntime.quantization", "onnxruntime.quantization.shape_inference"):
        monkeypatch.setitem(__import__("sys").modules, name, None)  # an import of it fails, as where it is missing
    assert not int8.runnable()
    run, log = _train(tmp_path, tiny_data, int8="on")
    assert log.index("--int8 on needs onnx and onnxruntime") < log.index("epoch")  # said before training, and after:
    assert "warning: --int8 on: no int8 model written (int8 quantisation needs onnx and onnxruntime" in log
    assert f"r2unet export --checkpoint {run} --int8" in log
    assert (run / "results.json").is_file() and not (run / "model.int8.onnx").exists()


# What onnxruntime computes with the kernels it picks on an AVX2-only CPU, run here under qemu's user-mode emulation:
# cpuid answers as that CPU, and the emulator computes each instruction exactly (its speed says nothing).
EMULATED_AVX2 = ["qemu-x86_64", "-cpu", "EPYC-Rome"]  # an AMD EPYC of the Zen 2 generation: AVX2, no AVX-512
_RUN_FILES = """import sys, numpy as np, onnxruntime as ort
x = np.load(sys.argv[1])
for f in sys.argv[2:]:
    s = ort.InferenceSession(f, providers=["CPUExecutionProvider"])
    np.save(f + ".logits.npy", s.run(None, {s.get_inputs()[0].name: x})[0])
"""


def _logits(path, x: np.ndarray) -> np.ndarray:
    return OnnxModel(path)(torch.from_numpy(x)).numpy()


@pytest.mark.skipif(shutil.which(EMULATED_AVX2[0]) is None or platform.machine() != "x86_64",
                    reason="needs qemu-x86_64 on an x86-64 machine to run onnxruntime's AVX2 kernels (Debian's "
                           "qemu-user; .ci/run installs it)")
def test_the_int8_file_computes_on_an_avx2_only_cpu_what_it_computed_where_its_masks_were_checked(exported,
                                                                                                 tmp_path):
    """There onnxruntime adds two uint8 x int8 products into a saturating int16 (vpmaddubsw) where VNNI and AMX CPUs
    sum in int32: the 7-bit weights ``export --int8`` writes keep every such pair in range."""
    run, model, cfg, photos = exported
    images = [_to_input(np.asarray(Image.open(p).convert("RGB")), cfg.image_size, 3) for p in sorted(photos.iterdir())]
    x = torch.cat(images).numpy()
    np.save(tmp_path / "x.npy", x)
    shipped = tmp_path / "model.int8.onnx"
    shipped.write_bytes((run / "model.int8.onnx").read_bytes())
    float_file = tmp_path / "model.onnx"  # for contrast: the same quantisation with 8-bit weights
    export_onnx(model, float_file, image_size=cfg.image_size)
    eight_bit = int8.quantize_int8(float_file, tmp_path / "model.8bit.onnx", (im.numpy() for im in images[0::2]),
                                   reduce_range=False)
    here = {f: _logits(f, x) for f in (shipped, eight_bit)}
    done = subprocess.run([*EMULATED_AVX2, sys.executable, "-c", _RUN_FILES, str(tmp_path / "x.npy"), str(shipped),
                           str(eight_bit)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    there = {f: np.load(f"{f}.logits.npy") for f in (shipped, eight_bit)}
    scale = float(np.abs(here[shipped]).max())
    masks = torch.sigmoid(torch.from_numpy(here[shipped])) > cfg.threshold
    assert masks.any() and not masks.all()  # masks with regions and edges
    np.testing.assert_allclose(there[shipped], here[shipped], rtol=0, atol=1e-5 * scale)  # bit-equal where seen
    if any(flag in Path("/proc/cpuinfo").read_text() for flag in ("avx512_vnni", "avx_vnni", "amx_int8")):
        # this CPU sums without saturating, so the comparison sees what 8-bit weights would do there
        assert np.abs(there[eight_bit] - here[eight_bit]).max() > 1e-2 * scale
