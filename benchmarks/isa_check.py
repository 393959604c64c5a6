"""Do predict's masks hold on a CPU without AVX-512 and VNNI? The same models, inputs and ``predict`` run on this
machine and under ``qemu-x86_64 -cpu EPYC-Rome`` (an AVX2-only AMD EPYC, Zen 2), then compared.

User-mode emulation runs this machine's own Python and packages, but ``cpuid`` answers as the emulated CPU, so
onnxruntime, oneDNN and PyTorch pick the kernels they would pick there: for int8, AVX2's ``vpmaddubsw``, which adds
two uint8 x int8 products into a *saturating* int16, where a VNNI or AMX CPU sums in int32. The emulator computes each
instruction exactly (its speed says nothing about the real CPU: no timing is printed), so what differs between the
two halves is what the other CPU's kernels compute differently.

What is compared (the default: a fresh R2U-Net t=2, base 16 at 128 px, the laptop preset's network, with batch-norm
statistics of a trained network's scale; ``--checkpoint`` for a run of yours):

- the logits of each exported file on the same network inputs (made once, here): the float32 ONNX export, the int8
  file ``r2unet export --int8`` writes (weights in 7 bits, so that no pair of products can saturate int16), and for
  contrast the same quantisation with 8-bit weights;
- ``predict``'s mask files at the photos' own sizes, byte for byte, and each side's share of pixels equal to float32
  PyTorch's masks on the same CPU (what ``export --int8`` checks before letting the file run by default): its
  default (what each CPU's policy picks: the int8 file where its masks passed that check, else PyTorch in the
  precision native there), the int8 file itself (``--checkpoint run/model.int8.onnx``), and float32 PyTorch
  (``--runtime torch --amp off``).

    apt-get install qemu-user                      # Debian's package: qemu-x86_64 (7.2 emulates AVX2 and FMA)
    python benchmarks/isa_check.py                 # about 5 minutes on a 2-core machine
    python benchmarks/isa_check.py --checkpoint runs/small --input photos/ --cpu EPYC-Rome

Prints a table (``--json``: one JSON object). The tests run its first comparison on a tiny model
(``tests/test_int8.py``); this script, with its minutes of emulation, is run by hand.
"""

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from r2unet.commands.bench_predict import synthetic_photos
from r2unet.commands.predict import run_predict
from r2unet.engine import int8
from r2unet.engine.checkpoint import save_checkpoint
from r2unet.engine.config import TrainConfig
from r2unet.engine.export import export_checkpoint
from r2unet.engine.inference import Segmenter
from r2unet.engine.onnx import load_onnx
from r2unet.engine.runtime import cpu_info
from r2unet.models import create_model

FILES = {"onnx fp32": "contrast/model.onnx", "int8, 7-bit weights (export --int8)": "run/model.int8.onnx",
         "int8, 8-bit weights": "contrast/model.int8-8bit.onnx"}
# predict's runs: what --checkpoint names (under the work folder) and its flags
PREDICTS = {"predict (default)": ("run", {}), "predict --checkpoint run/model.int8.onnx": ("run/model.int8.onnx", {}),
            "predict --runtime torch --amp off": ("run", {"runtime": "torch", "amp": "off"})}
FP32 = "predict --runtime torch --amp off"


def make(work: Path, checkpoint: str | None, photos: str | None, num_images: int, log) -> None:
    """This machine's half, first step: the run folder (checkpoint and its int8 file), the contrast files, the
    photos and the network inputs of the photos, all under ``work``."""
    run = work / "run"
    (run / "checkpoints").mkdir(parents=True)
    if checkpoint:
        shutil.copy(int8.checkpoint_file(checkpoint), run / "checkpoints" / "best.pt")
    else:
        torch.manual_seed(0)
        model = create_model("R2U_Net", t=2, base_channels=16)
        with torch.no_grad():  # batch-norm statistics of a trained network's scale: outputs that vary
            model.train()
            for _ in range(2):
                model(torch.randn(2, 3, 64, 64))
        save_checkpoint(run / "checkpoints" / "best.pt", model=model, epoch=0, config=TrainConfig(
            model_type="R2U_Net", t=2, base_channels=16, image_size=128).to_dict())
    if photos:
        (work / "photos").symlink_to(Path(photos).resolve())
    else:
        synthetic_photos(work / "photos", num_images)
    quiet = lambda *_: None  # noqa: E731
    log("exporting: float32 ONNX, int8 with 7-bit weights (the product's), int8 with 8-bit weights")
    export_checkpoint(run, work / FILES["onnx fp32"], log=quiet)
    export_checkpoint(run, work / FILES["int8, 7-bit weights (export --int8)"], quantize=True,
                      calibration=work / "photos", log=quiet)
    fp32 = Segmenter(run, amp="off", runtime="torch", log=quiet)
    member = fp32.members[0]
    calibrate, check, _ = int8.sample_images(member.cfg, work / "photos")
    int8.quantize_int8(work / FILES["onnx fp32"], work / FILES["int8, 8-bit weights"],
                       (member.inputs([fp32.decode(p)[1]]).numpy() for p in calibrate), reduce_range=False)
    inputs = np.concatenate([member.inputs([fp32.decode(p)[1]]).contiguous().numpy() for p in check])
    np.save(work / "inputs.npy", inputs)


def compute(work: Path, side: str, log) -> None:
    """One half's results under ``work/side``: each file's logits on the shared inputs, and predict's masks."""
    out = work / side
    out.mkdir()
    inputs = torch.from_numpy(np.load(work / "inputs.npy"))
    logits = {}
    for name, file in FILES.items():
        model, _ = load_onnx(work / file, log=lambda *_: None)
        with torch.inference_mode():
            logits[name] = model(inputs).numpy()
        log(f"  [{side}] {name}: logits on {len(inputs)} inputs")
    np.savez(out / "logits.npz", **logits)
    runs = {}
    for name, (checkpoint, options) in PREDICTS.items():
        folder = out / _folder(name)
        segmenter = Segmenter(work / checkpoint, log=lambda *_: None, **options)
        runs[name] = segmenter.members[0].runs
        with torch.inference_mode():
            run_predict(segmenter, work / "photos", folder, progress=False, log=lambda *_: None)
        log(f"  [{side}] {name}: {len(list(folder.glob('*_segmentation.png')))} masks, by {runs[name]}")
    info = cpu_info()
    (out / "side.json").write_text(json.dumps({"cpu": info.label, "native_bf16": info.native_bf16,
                                               "torch_capability": torch.backends.cpu.get_cpu_capability(),
                                               "runs": runs}))


def _folder(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name)


def _masks(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)) > 0 for p in sorted(folder.glob("*_segmentation.png"))}


def _equal_share(a: dict, b: dict) -> float:
    return sum(int((a[k] == b[k]).sum()) for k in a) / sum(b[k].size for k in a)


def compare(work: Path) -> dict:
    """Host against emulated: each file's logits (largest difference, equal mask pixels at the network size) and
    each predict's mask files (byte-identical files, equal pixels, and equal pixels against float32 PyTorch's masks
    on the same CPU)."""
    host, emu = (np.load(work / s / "logits.npz") for s in ("host", "emulated"))
    sides = {s: json.loads((work / s / "side.json").read_text()) for s in ("host", "emulated")}
    files = []
    for name in FILES:
        a, b = host[name], emu[name]
        files.append({"file": name, "max_abs_logit_diff": float(np.abs(a - b).max()),
                      "logit_scale": float(np.abs(a).max()), "mask_pixels_equal": float(((a > 0) == (b > 0)).mean()),
                      "bit_identical": bool(np.array_equal(a, b))})
    predicts = []
    masks = {s: {n: _masks(work / s / _folder(n)) for n in PREDICTS} for s in ("host", "emulated")}
    for name in PREDICTS:
        folder_a, folder_b = (work / s / _folder(name) for s in ("host", "emulated"))
        names = sorted(p.name for p in folder_a.glob("*_segmentation.png"))
        same = sum((folder_a / n).read_bytes() == (folder_b / n).read_bytes() for n in names)
        predicts.append({"predict": name, "files": len(names), "files_byte_identical": same,
                         "pixels_equal": _equal_share(masks["emulated"][name], masks["host"][name]),
                         "host_vs_host_fp32": _equal_share(masks["host"][name], masks["host"][FP32]),
                         "emulated_vs_emulated_fp32": _equal_share(masks["emulated"][name], masks["emulated"][FP32]),
                         "runs": {s: sides[s]["runs"][name] for s in sides}})
    meta = load_onnx(work / FILES["int8, 7-bit weights (export --int8)"], log=lambda *_: None)[0].metadata
    return {"sides": {s: {k: v for k, v in sides[s].items() if k != "runs"} for s in sides},
            "int8_agreement": float(meta[int8.AGREED]),
            "files": files, "predicts": predicts}


def report(result: dict, cpu: str) -> str:
    host, emu = result["sides"]["host"], result["sides"]["emulated"]
    lines = [f"this machine: {host['cpu']} (PyTorch kernels {host['torch_capability']}); emulated: qemu -cpu {cpu}: "
             f"{emu['cpu']} (PyTorch kernels {emu['torch_capability']})",
             f"the int8 file's masks matched float32's on {result['int8_agreement']:.3%} of the pixels when it was "
             f"made (it runs by default from {int8.AGREEMENT:.1%})",
             f"  {'same inputs, onnxruntime':<42}{'max |logit diff|':>17}{'of |logits| up to':>19}"
             f"{'mask pixels equal':>19}"]
    for f in result["files"]:
        lines.append(f"  {f['file']:<42}{f['max_abs_logit_diff']:17.3g}{f['logit_scale']:19.3g}"
                     f"{f['mask_pixels_equal']:19.4%}" + ("  (bit-identical)" if f["bit_identical"] else ""))
    lines.append(f"  {'predict, photos at their own size':<42}{'same files':>17}{'pixels equal':>19}"
                 f"{'= fp32 here / there':>22}")
    for p in result["predicts"]:
        lines.append(f"  {p['predict']:<42}{p['files_byte_identical']:>11} of {p['files']:<3}"
                     f"{p['pixels_equal']:19.4%}  {p['host_vs_host_fp32']:9.4%} / {p['emulated_vs_emulated_fp32']:.4%}")
    lines.append("what ran:")
    for p in result["predicts"]:
        runs = p["runs"]
        lines.append(f"  {p['predict']}: " + (runs["host"] if runs["host"] == runs["emulated"]
                                              else f"here {runs['host']}; there {runs['emulated']}"))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", default="EPYC-Rome", help="qemu's CPU model (qemu-x86_64 -cpu help lists them)")
    parser.add_argument("--checkpoint", help="a run folder or checkpoint (default: a fresh network)")
    parser.add_argument("--input", help="a folder of photos (default: synthetic photos of dermoscopy sizes)")
    parser.add_argument("--images", type=int, default=8, help="synthetic photos (half calibrate, half are checked)")
    parser.add_argument("--workdir", help="keep everything here (default: a temporary folder)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--side", choices=("host", "emulated"), help=argparse.SUPPRESS)  # the emulated half's call
    args = parser.parse_args()
    log = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    if args.side:
        compute(Path(args.workdir), args.side, log)
        return
    qemu = shutil.which("qemu-x86_64")
    if qemu is None:
        sys.exit("isa_check: needs qemu-x86_64 (Debian: apt-get install qemu-user)")
    tmp = None if args.workdir else tempfile.TemporaryDirectory(prefix="r2unet-isa-")
    work = Path(args.workdir or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        make(work, args.checkpoint, args.input, args.images, log)
        compute(work, "host", log)
        log(f"the same under qemu-x86_64 -cpu {args.cpu} (minutes: every instruction is emulated)")
        said = []
        with subprocess.Popen([qemu, "-cpu", args.cpu, sys.executable, __file__, "--side", "emulated",
                               "--workdir", str(work), "--json"], stderr=subprocess.PIPE, text=True) as child:
            for line in child.stderr:  # its progress as it comes, less qemu's list of CPU features it lacks
                if "TCG doesn't support" not in line:
                    said.append(line.rstrip())
                    log(said[-1])
        if child.returncode:
            sys.exit("isa_check: the emulated half failed:\n" + "\n".join(said[-20:]))
        result = {"cpu": args.cpu, "seconds": time.perf_counter() - t0, **compare(work)}
        print(json.dumps(result, indent=1) if args.json else report(result, args.cpu))
    finally:
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    main()
