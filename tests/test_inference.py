"""The inference core: one Segmenter under predict, serve and evaluate; several models as one (an ensemble); requests
that arrive together run as one batch, each answer the bytes predict writes."""

import json
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from r2unet import create_model
from r2unet.commands.cli import main
from r2unet.data.imageio import InMemory
from r2unet.engine.checkpoint import save_checkpoint
from r2unet.engine.config import TrainConfig
from r2unet.engine.inference import Segmenter


def _trained_like(seed: int, model_type: str = "U_Net", **settings) -> torch.nn.Module:
    """A small network with non-trivial BatchNorm statistics, so its outputs depend on the input."""
    torch.manual_seed(seed)
    model = create_model(model_type, base_channels=4, output_ch=settings.get("num_classes", 1),
                         t=settings.get("t", 2))
    with torch.no_grad():
        model.train()
        for _ in range(3):
            model(torch.randn(4, 3, 32, 32) * 2 + 0.3)
    return model.eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two binary checkpoints (one U-Net at 32 px, one R2U-Net at 48 px) in a folder of runs, and a few photos."""
    root = tmp_path_factory.mktemp("ensemble")
    paths = []
    for k, (model_type, size) in enumerate((("U_Net", 32), ("R2U_Net", 48))):
        cfg = TrainConfig(model_type=model_type, t=2, base_channels=4, image_size=size, amp="off")
        run = root / "runs" / f"run{k}"
        save_checkpoint(run / "checkpoints" / "best.pt", model=_trained_like(k, model_type), config=cfg.to_dict(),
                        epoch=1)
        paths.append(run)
    photos = root / "photos"
    photos.mkdir()
    g = np.random.default_rng(0)
    for i, (h, w) in enumerate(((40, 60), (75, 50), (64, 64))):
        Image.fromarray(g.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(photos / f"p{i}.png")
    return root, paths, photos


def test_an_ensemble_predicts_the_mean_of_its_models_probabilities(models, tmp_path):
    root, paths, photos = models
    ensemble = Segmenter(paths, device="cpu", log=lambda *_: None)
    assert len(ensemble.members) == 2 and Segmenter(root / "runs", device="cpu", log=lambda *_: None).names == \
        ensemble.names  # a folder of runs is the same ensemble
    singles = [Segmenter(p, device="cpu", log=lambda *_: None) for p in paths]
    for path in sorted(photos.iterdir()):
        (_, image, mean), = ensemble.predict([path])
        by_hand = []
        for s in singles:  # each model at its own size, its logits resized back, then the sigmoid
            member = s.members[0]
            logits = member.model(member.inputs([image])).float()
            up = F.interpolate(logits, size=image.shape[:2], mode="bilinear", align_corners=False)
            by_hand.append(torch.sigmoid(up)[0, 0].detach().numpy())
        assert np.allclose(mean, (by_hand[0] + by_hand[1]) / 2, atol=1e-6), path.name
        assert not np.allclose(by_hand[0], by_hand[1], atol=1e-3)  # the two models really differ
    # predict writes the ensemble's masks: the mean probability at the threshold
    assert main(["predict", "--checkpoint", str(paths[0]), "--checkpoint", str(paths[1]), "--input", str(photos),
                 "--output", str(tmp_path / "out"), "--device", "cpu"]) == 0
    for path, _, mean in ensemble.predict(sorted(photos.iterdir())):
        written = np.asarray(Image.open(tmp_path / "out" / f"{path.stem}_segmentation.png")) > 0
        assert np.array_equal(written, mean > 0.5)


def test_evaluate_reports_an_ensemble_s_scores(models, tmp_path, capsys):
    from conftest import prepared_synthetic

    from r2unet.data.cache import split_cache
    from r2unet.data.dataset import DeviceTransform, make_loader
    from r2unet.engine.metrics import MetricAccumulator

    root, paths, _ = models
    data = prepared_synthetic(tmp_path, 14, seed=2, max_side=100)
    assert main(["evaluate", "--checkpoint", str(root / "runs"), "--data_path", str(data), "--device", "cpu",
                 "--resolution", "original", "--json"]) == 0  # models of two sizes: each image at its own size
    scored = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    by_hand = MetricAccumulator()
    ensemble = Segmenter(paths, device="cpu", log=lambda *_: None)
    from r2unet.data.imageio import read_mask

    for image, mask in zip(sorted((data / "test").iterdir()), sorted((data / "test_GT").iterdir())):
        (_, _, mean), = ensemble.predict([image])
        by_hand.update(torch.from_numpy(mean)[None, None], torch.from_numpy(read_mask(mask))[None, None].float())
    assert scored["num_images"] == by_hand.num_images and scored["JS"] == pytest.approx(by_hand.compute()["JS"])
    # at the training size, models of one size are averaged in one network
    same_size = tmp_path / "same"
    for k in range(2):
        cfg = TrainConfig(model_type="U_Net", base_channels=4, image_size=32, amp="off")
        save_checkpoint(same_size / f"r{k}" / "checkpoints" / "best.pt", model=_trained_like(10 + k),
                        config=cfg.to_dict(), epoch=1)
    assert main(["evaluate", "--checkpoint", str(same_size), "--data_path", str(data), "--device", "cpu",
                 "--json"]) == 0
    scored = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    acc = MetricAccumulator()
    cache = split_cache(data, "test", 32, log=lambda *_: None, progress=False)
    transform = DeviceTransform(32, torch.device("cpu"), None)
    members = [Segmenter(same_size / f"r{k}", device="cpu", log=lambda *_: None).members[0].model for k in range(2)]
    with torch.no_grad():
        for batch in make_loader(cache, 16, train=False, drop_last=False):
            x, y = transform(batch)
            acc.update(sum(torch.sigmoid(m(x)) for m in members) / 2, y)
    assert scored["JS"] == pytest.approx(acc.compute()["JS"], abs=1e-6)
    # models of two sizes cannot share training-size inputs: said, with the way out
    assert main(["evaluate", "--checkpoint", str(root / "runs"), "--data_path", str(data), "--device", "cpu"]) == 2
    assert "--resolution original" in capsys.readouterr().err


def test_an_ensemble_of_label_map_models_averages_their_class_probabilities(tmp_path):
    cfg = TrainConfig(model_type="U_Net", base_channels=4, image_size=32, num_classes=3, amp="off")
    paths = []
    for k in range(2):
        path = tmp_path / f"m{k}.pt"
        save_checkpoint(path, model=_trained_like(20 + k, num_classes=3), config=cfg.to_dict(), epoch=1)
        paths.append(path)
    image = np.random.default_rng(1).integers(0, 255, (45, 30, 3), dtype=np.uint8)
    ensemble = Segmenter(paths, device="cpu", log=lambda *_: None)
    (_, _, classes), = ensemble.predict([image])  # arrays are images too
    probs = []
    for member in ensemble.members:
        up = F.interpolate(member.model(member.inputs([image])).float(), size=(45, 30), mode="bilinear",
                           align_corners=False)
        probs.append(torch.softmax(up, 1))
    assert np.array_equal(classes, ((probs[0] + probs[1]) / 2).argmax(1)[0].numpy())
    mixed = tmp_path / "binary.pt"
    save_checkpoint(mixed, model=_trained_like(3), config=TrainConfig(model_type="U_Net", base_channels=4,
                                                                        image_size=32).to_dict(), epoch=1)
    with pytest.raises(ValueError, match="different classes"):
        Segmenter([paths[0], mixed], device="cpu", log=lambda *_: None)


def test_requests_that_arrive_together_run_as_one_batch_with_predict_s_bytes(models, tmp_path):
    pytest.importorskip("fastapi", reason="the serve extra (fastapi, uvicorn) is not installed")
    from r2unet.commands.serve import Service

    _, paths, photos = models
    assert main(["predict", "--checkpoint", str(paths[1]), "--input", str(photos), "--output", str(tmp_path / "out"),
                 "--device", "cpu", "--overlay"]) == 0
    service = Service(Segmenter(paths[1], device="cpu", log=lambda *_: None), batch_wait_s=0.5, max_batch=8)
    images = sorted(photos.iterdir()) * 2
    answers: dict = {}
    start = threading.Barrier(len(images))

    def ask(k, path):
        start.wait()
        answers[k] = service.segment(path.read_bytes(), path.name, overlay=k % 2 == 0)

    threads = [threading.Thread(target=ask, args=(k, p)) for k, p in enumerate(images)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert max(service.batcher.batches) > 1  # several requests in one forward pass
    for k, path in enumerate(images):
        assert answers[k]["mask_png"] == (tmp_path / "out" / f"{path.stem}_segmentation.png").read_bytes()
        if k % 2 == 0:  # each request's own options, in a batch of mixed ones
            assert answers[k]["overlay_jpg"] == (tmp_path / "out" / f"{path.stem}_overlay.jpg").read_bytes()
        else:
            assert "overlay_jpg" not in answers[k]
    one = service.segmenter.segment(InMemory("p0.png", images[0].read_bytes()))
    assert one["_segmentation.png"] == answers[0]["mask_png"]  # one upload, outside the batcher: the same bytes


def test_the_server_answers_an_ensemble_and_a_label_map_model_with_predict_s_bytes(models, tmp_path):
    pytest.importorskip("fastapi", reason="the serve extra (fastapi, uvicorn) is not installed")
    from r2unet.commands.serve import Service

    root, paths, photos = models
    labels = tmp_path / "labels.pt"
    save_checkpoint(labels, model=_trained_like(30, num_classes=3), epoch=1,
                    config=TrainConfig(model_type="U_Net", base_channels=4, image_size=32, num_classes=3).to_dict())
    for name, checkpoints in (("ensemble", [str(p) for p in paths]), ("labels", [str(labels)])):
        out = tmp_path / name
        assert main(["predict", *[a for c in checkpoints for a in ("--checkpoint", c)], "--input", str(photos),
                     "--output", str(out), "--device", "cpu", "--overlay"]) == 0
        service = Service(Segmenter(checkpoints, device="cpu", log=lambda *_: None), max_batch=4, batch_wait_s=0.2)
        for path in sorted(photos.iterdir()):
            answer = service.segment(path.read_bytes(), path.name, overlay=True)
            assert answer["mask_png"] == (out / f"{path.stem}_segmentation.png").read_bytes(), (name, path.name)
            assert answer["overlay_jpg"] == (out / f"{path.stem}_overlay.jpg").read_bytes(), (name, path.name)
