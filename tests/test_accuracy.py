"""Accuracy tools around the network: the losses for small lesions, precise BatchNorm statistics and the moving
average of the weights for a stable validation signal, postprocessing chosen on validation, the harder synthetic
set."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import prepared_synthetic

from r2unet.engine import distributed as D
from r2unet.engine.config import TrainConfig
from r2unet.engine.task import task_for


# ----------------------------------------------------------------------------------------------------------- losses
def test_focal_loss_is_bce_at_gamma_0_and_weighs_hard_pixels_more():
    task = task_for(1)
    g = torch.Generator().manual_seed(0)
    logits, target = torch.randn(2, 1, 8, 8, generator=g), (torch.rand(2, 1, 8, 8, generator=g) > 0.7).float()
    bce = F.binary_cross_entropy_with_logits(logits, target)
    assert torch.allclose(task.loss(logits, target, "focal", gamma=0.0), bce)
    # an easy pixel (p = 0.95 for its class) loses far more of its weight than a hard one (p = 0.3)
    easy, hard = torch.tensor([[[[2.944]]]]), torch.tensor([[[[-0.847]]]])
    one = torch.ones(1, 1, 1, 1)
    ratio_easy = task.loss(easy, one, "focal") / task.loss(easy, one, "bce")
    ratio_hard = task.loss(hard, one, "focal") / task.loss(hard, one, "bce")
    assert ratio_easy < 0.01 and ratio_hard > 0.4


def test_tversky_weighs_missed_lesion_pixels_more_than_false_ones_and_is_dice_at_one_half():
    task = task_for(1)
    target = torch.zeros(1, 1, 10, 10)
    target[..., 2:8, 2:8] = 1  # 36 lesion pixels
    missed, extra = target.clone(), target.clone()
    missed[..., 2:4, 2:8] = 0  # 12 lesion pixels missed
    extra[..., 0:2, 2:8] = 1  # 12 false pixels
    as_logits = lambda m: (m * 2 - 1) * 20  # noqa: E731  (probabilities of 0 and 1)
    assert task.loss(as_logits(missed), target, "tversky") > task.loss(as_logits(extra), target, "tversky")
    probs = torch.sigmoid(as_logits(missed))
    tp = (probs * target).sum()
    dice = 2 * tp / (probs.sum() + target.sum())
    assert task.loss(as_logits(missed), target, "tversky", alpha=0.5, beta=0.5) == pytest.approx(1 - dice.item(),
                                                                                                 abs=0.01)


@pytest.mark.parametrize("kind", ["focal", "tversky"])
def test_label_map_losses_fall_as_the_prediction_improves(kind):
    task = task_for(3)
    labels = torch.tensor([[0, 1, 1, 2], [0, 0, 2, 2]])[None, None].float()
    right = F.one_hot(labels[0, 0].long(), 3).permute(2, 0, 1)[None].float() * 8 - 4
    assert task.loss(right, labels, kind) < task.loss(torch.zeros_like(right), labels, kind) \
        < task.loss(-right, labels, kind)


def test_loss_settings_are_checked():
    with pytest.raises(Exception, match="--loss"):
        TrainConfig(loss="lovasz").validate()
    with pytest.raises(Exception, match="--tversky_alpha"):
        TrainConfig(loss="tversky", tversky_alpha=1.5).validate()
    with pytest.raises(Exception, match="--ema"):
        TrainConfig(ema=1.0).validate()


# ------------------------------------------------------------------------------------------ precise BatchNorm, EMA
def test_precise_bn_batches_are_fixed_full_and_shared_out_evenly():
    from r2unet.engine.loop import precise_bn_batches

    one = precise_bn_batches(50, 8, 32, seed=3, info=D.DistInfo())
    assert len(one) == 6 and all(len(b) == 8 for b in one)  # full batches only
    assert sorted(i for b in one for i in b) == sorted(set(i for b in one for i in b))
    assert one == precise_bn_batches(50, 8, 32, seed=3, info=D.DistInfo())  # the same every epoch
    shares = [precise_bn_batches(50, 8, 32, seed=3, info=D.DistInfo(rank=r, world_size=4)) for r in range(4)]
    assert [len(s) for s in shares] == [1, 1, 1, 1]  # as many forward passes per process
    assert [b for s in shares for b in s] == [one[r] for r in range(4)]  # the 1-process batches, spread
    assert precise_bn_batches(50, 8, 2, seed=3, info=D.DistInfo()) == one[:2]


def test_recompute_batchnorm_gives_the_statistics_of_the_current_weights():
    """The recomputed running mean/var of a BatchNorm are the average of its batch statistics, whatever the
    momentum-averaged history was, and a recurrent network's repeated calls are each counted."""
    from r2unet.engine.loop import recompute_batchnorm
    from r2unet.engine.runtime import Precision
    from r2unet.models import create_model

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    net[1].running_mean.fill_(100.0)  # a stale history
    net.eval()
    batches = [{"x": torch.randn(4, 3, 8, 8) + k} for k in range(3)]
    transform = lambda b: (b["x"], None)  # noqa: E731
    assert recompute_batchnorm(net, batches, transform, Precision(None, torch.device("cpu"))) == 3
    with torch.no_grad():
        outs = [net[0](b["x"]) for b in batches]
    mean = torch.stack([o.mean((0, 2, 3)) for o in outs]).mean(0)
    var = torch.stack([o.var((0, 2, 3), unbiased=True) for o in outs]).mean(0)
    assert torch.allclose(net[1].running_mean, mean, atol=1e-5)
    assert torch.allclose(net[1].running_var, var, atol=1e-4)
    assert net[1].momentum == 0.1 and not net.training  # left as it was found (eval mode)

    r2 = create_model("R2U_Net", t=2, base_channels=4)
    recompute_batchnorm(r2, [{"x": torch.randn(2, 3, 32, 32)}], transform, Precision(None, torch.device("cpu")))
    recurrent_bn = r2.RRCNN1.RCNN[0].conv[1]  # one BatchNorm applied t + 1 = 3 times per forward
    assert int(recurrent_bn.num_batches_tracked) == 3  # each of the t + 1 calls of one forward pass counts


def _train(tmp_path, data, name, **settings):
    from r2unet.engine.trainer import fit

    cfg = TrainConfig(**{**dict(model_type="R2U_Net", t=2, base_channels=4, image_size=32, batch_size=4,
                                num_epochs=3, num_epochs_decay=1, lr=2e-3, beta1=0.9, amp="off", num_workers=0,
                                device="cpu", data_path=str(data), output_dir=str(tmp_path / name), seed=1),
                         **settings})
    return fit(cfg, log=lambda *a, **k: None)


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("accuracy")
    return prepared_synthetic(root, num_images=24, seed=5, max_side=96)


def test_ema_run_keeps_the_average_in_best_pt_and_resumes_it_exactly(tmp_path, small_data):
    from r2unet.engine.checkpoint import load_file
    from r2unet.engine.trainer import fit

    full = _train(tmp_path, small_data, "full", ema=0.8, num_epochs=2)
    # the same run, stopped after its first epoch and resumed: bit-identical scores; last.pt carries the average

    cfg = TrainConfig(model_type="R2U_Net", t=2, base_channels=4, image_size=32, batch_size=4, num_epochs=2,
                      num_epochs_decay=1, lr=2e-3, beta1=0.9, amp="off", num_workers=0, device="cpu",
                      data_path=str(small_data), output_dir=str(tmp_path / "split"), seed=1, ema=0.8)
    stopped = {}

    def stop_after_two_epochs(*args, **kwargs):
        line = " ".join(str(a) for a in args)
        if line.lstrip().startswith("epoch 1/2") and "valid JS" in line:
            stopped["at"] = line
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(cfg, log=stop_after_two_epochs)
    last = load_file(tmp_path / "split" / "checkpoints" / "last.pt")
    assert "ema" in last["extra"] and int(last["extra"]["ema"]["n_averaged"]) > 0
    resumed = fit(cfg.updated(resume=True), log=lambda *a, **k: None)
    assert resumed["test"] == full["test"] and resumed["best_epoch"] == full["best_epoch"]
    # best.pt holds the average (reference layout), not the raw weights of last.pt
    best = load_file(tmp_path / "full" / "checkpoints" / "best.pt")["model"]
    raw = load_file(tmp_path / "full" / "checkpoints" / "last.pt")["model"]
    assert best.keys() == raw.keys()
    assert any(not torch.equal(best[k], raw[k]) for k in best if best[k].is_floating_point())


def test_precise_bn_changes_only_the_statistics_and_can_be_turned_off(tmp_path, small_data):
    from r2unet.engine.checkpoint import load_file

    _train(tmp_path, small_data, "on", num_epochs=1, num_epochs_decay=0)
    _train(tmp_path, small_data, "off", num_epochs=1, num_epochs_decay=0, precise_bn=0)
    on, off = (load_file(tmp_path / n / "checkpoints" / "best.pt")["model"] for n in ("on", "off"))
    stats = [k for k in on if k.endswith(("running_mean", "running_var"))]
    assert stats and all(torch.equal(on[k], off[k]) for k in on if k not in stats and "num_batches" not in k)
    assert all(not torch.equal(on[k], off[k]) for k in stats)
    assert json.loads((tmp_path / "on" / "config.json").read_text())["precise_bn"] == 32


# ----------------------------------------------------------------------------------------------- postprocessing
def _disc(shape, cy, cx, r):
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    return np.hypot(yy - cy, xx - cx) < r


def test_steps_remove_small_regions_keep_the_largest_and_fill_holes():
    from r2unet.engine.postprocess import Steps

    lesion, speck, other = _disc((64, 64), 30, 30, 12), _disc((64, 64), 5, 58, 2), _disc((64, 64), 55, 8, 6)
    holed = lesion & ~_disc((64, 64), 30, 30, 3)
    mask = holed | speck | other
    assert np.array_equal(Steps(min_area=0.005).apply(mask), holed | other)  # the 13-pixel speck: under 20 px
    assert np.array_equal(Steps(largest=True).apply(mask), holed)
    assert np.array_equal(Steps(largest=True, fill_holes=True).apply(mask), lesion)
    assert np.array_equal(Steps().apply(mask), mask)
    assert not Steps().apply(np.zeros((8, 8), bool)).any()  # an empty mask stays empty
    assert not Steps(largest=True, fill_holes=True).apply(np.zeros((8, 8), bool)).any()


def _probabilities(mask, rng):
    return np.where(mask, rng.uniform(0.6, 1.0, mask.shape), rng.uniform(0.0, 0.4, mask.shape)).astype(np.float32)


def test_choose_keeps_a_step_only_when_it_raises_validation_js():
    from r2unet.engine.postprocess import Postprocessing, Steps, choose

    rng = np.random.default_rng(0)
    task = task_for(1)
    truths, with_specks, two_lesions = [], [], []
    for k in range(6):
        truth = _disc((64, 64), 32 + k, 30, 10 + k)
        truths.append(truth)
        with_specks.append(_probabilities(truth | _disc((64, 64), 4, 58 - k, 2.5), rng))  # a false speck
    post = choose(with_specks, truths, task, 0.5, "test")
    assert post.classes[1] and (post.classes[1].largest or post.classes[1].min_area)
    assert post.valid_JS["chosen"] > post.valid_JS["none"]
    # two true lesions per image: keeping the largest region would lower the JS, so nothing is chosen
    pairs = [_disc((64, 64), 20, 20, 8) | _disc((64, 64), 45, 45, 6 + k) for k in range(6)]
    two_lesions = [_probabilities(t, rng) for t in pairs]
    post = choose(two_lesions, pairs, task, 0.5, "test")
    assert not post.active and post.valid_JS["chosen"] == post.valid_JS["none"]
    assert any(row["steps"] == "keep the largest region" and row["JS"] < post.valid_JS["none"]
               for row in post.valid_JS["tried"])  # it was tried, and it lowered the JS
    # a large gain on one image of six (a speck in one image only) is luck, not a rule: not kept
    one_speck = [_probabilities(t | (_disc((64, 64), 4, 58, 6) if k == 0 else False), rng)
                 for k, t in enumerate(truths)]
    post = choose(one_speck, truths, task, 0.5, "test")
    assert not post.active and post.valid_JS["tried"][0]["better"] == 1
    # a decision survives its JSON, and applies as decided
    decided = Postprocessing(0.4, {1: Steps(largest=True)}, "x", {"none": 0.5, "chosen": 0.6})
    assert Postprocessing.from_dict(decided.to_json()) == decided
    with pytest.raises(ValueError, match="not a postprocessing decision"):
        Postprocessing.from_dict({"threshold": 3})


def test_label_map_holes_are_filled_with_background_only():
    from r2unet.engine.postprocess import Postprocessing, Steps

    rim, core = _disc((40, 40), 20, 20, 12), _disc((40, 40), 20, 20, 5)
    hole = _disc((40, 40), 20, 28, 2)
    labels = np.where(core, 2, np.where(rim & ~hole, 1, 0)).astype(np.uint8)
    labels[2, 2] = 1  # a false speck of class 1
    out = Postprocessing(None, {1: Steps(largest=True, fill_holes=True)}).apply(labels)
    assert (out[core] == 2).all()  # the core (another class inside class 1's region) stays
    assert (out[hole & ~core] == 1).all() and out[2, 2] == 0


def test_threshold_is_chosen_on_validation_when_it_pays():
    from r2unet.engine.postprocess import choose

    rng = np.random.default_rng(1)
    truths = [_disc((48, 48), 24, 24, 10 + k) for k in range(5)]
    # a model that is under-confident on the lesion: its lesion pixels sit at 0.35-0.45
    probs = [np.where(t, rng.uniform(0.35, 0.45, t.shape), rng.uniform(0.0, 0.2, t.shape)).astype(np.float32)
             for t in truths]
    post = choose(probs, truths, task_for(1), 0.5, "test")
    assert post.threshold == 0.3 and post.valid_JS["chosen"] == pytest.approx(1.0)


def test_a_run_chooses_stores_and_every_command_applies_its_postprocessing(tmp_path, small_data):
    """After training: the decision in results.json, best.pt and postprocessing.json; evaluate, predict, the ONNX
    export's metadata and a model loaded from it apply a stored decision, and --postprocess none leaves it out."""
    from PIL import Image
    from scipy import ndimage

    from r2unet.commands.cli import main
    from r2unet.engine.checkpoint import RunFiles, load_file, store_postprocessing
    from r2unet.engine.evaluation import evaluate_checkpoint
    from r2unet.engine.inference import Segmenter
    from r2unet.engine.postprocess import Postprocessing, Steps

    results = _train(tmp_path, small_data, "run", num_epochs=2)
    run = RunFiles(tmp_path / "run")
    decided = Postprocessing.from_dict(results["postprocessing"])
    assert decided.chosen_on.startswith("the validation split")
    assert load_file(run.best)["postprocessing"] == results["postprocessing"]
    assert json.loads((run.dir / "postprocessing.json").read_text()) == results["postprocessing"]
    assert (results["test_postprocessed"] is not None) == decided.active

    # a decision that visibly changes this barely trained model's masks (nearly all foreground at 0.3): the
    # largest region only, and none under 98 % of the image
    forced = Postprocessing(0.3, {1: Steps(min_area=0.98, largest=True)}, "a test", {"none": 0.0, "chosen": 0.0})
    store_postprocessing(run, forced)
    segmenter = Segmenter(run.dir, device="cpu")
    assert segmenter.post == forced and segmenter.threshold == 0.3
    assert Segmenter(run.dir, device="cpu", threshold=0.6).threshold == 0.6  # a threshold given wins
    photos = small_data / "test"
    out_auto, out_none = tmp_path / "auto", tmp_path / "none"
    assert main(["predict", "--checkpoint", str(run.dir), "--input", str(photos), "--output", str(out_auto),
                 "--device", "cpu"]) == 0
    assert main(["predict", "--checkpoint", str(run.dir), "--input", str(photos), "--output", str(out_none),
                 "--device", "cpu", "--postprocess", "none", "--threshold", "0.3"]) == 0
    changed = 0
    for mask_file in sorted(out_auto.glob("*_segmentation.png")):
        auto = np.asarray(Image.open(mask_file)) > 0
        raw = np.asarray(Image.open(out_none / mask_file.name)) > 0
        assert ndimage.label(auto, np.ones((3, 3)))[1] <= 1  # one region at most
        assert not (auto & ~raw).any()  # only removed pixels
        changed += int((auto != raw).any())
    assert changed, "the forced decision changed no mask: the test shows nothing"

    scores = evaluate_checkpoint(run.dir, small_data, split="test", device="cpu", log=lambda *a: None)
    assert scores["postprocessing"] == forced.describe() and "without_postprocessing" in scores
    plain = evaluate_checkpoint(run.dir, small_data, split="test", device="cpu", postprocess="none",
                                log=lambda *a: None)  # "without" is without the chosen threshold too
    assert plain["postprocessing"] is None and plain["JS"] == pytest.approx(scores["without_postprocessing"]["JS"])

    pytest.importorskip("onnxruntime", reason="the ONNX check needs the export extra")
    onnx = tmp_path / "model.onnx"
    assert main(["export", "--checkpoint", str(run.dir), "--output", str(onnx)]) == 0
    from_onnx = Segmenter(onnx)
    assert from_onnx.post == forced and from_onnx.threshold == 0.3


# ------------------------------------------------------------------------------- statistics per recurrence step
def test_step_statistics_load_reference_weights_and_change_nothing_but_evaluation_statistics():
    from r2unet.engine.checkpoint import infer_architecture, load_weights
    from r2unet.models import create_model

    torch.manual_seed(0)
    reference = create_model("R2AttU_Net", t=2, base_channels=4)
    for m in reference.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    stepped = create_model("R2AttU_Net", t=2, base_channels=4, step_stats=True)
    load_weights(stepped, reference.state_dict(), "a reference checkpoint")  # strict, with the extra statistics
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(reference.eval()(x), stepped.eval()(x), atol=1e-5)  # each step starts shared
        assert torch.allclose(reference.train()(x), stepped.train()(x), atol=1e-5)  # training: batch statistics
    extra = set(stepped.state_dict()) - set(reference.state_dict())
    assert extra and all(".step_norms." in k for k in extra) and set(reference.state_dict()) < set(stepped.state_dict())
    assert infer_architecture(stepped.state_dict())["step_stats"] is True
    assert infer_architecture(reference.state_dict())["step_stats"] is False
    # after training steps the steps' statistics differ from each other: what evaluation now uses
    stepped.train()
    for _ in range(3):
        stepped(torch.randn(2, 3, 32, 32))
    norms = stepped.RRCNN1.RCNN[0].step_norms
    assert not torch.allclose(norms[0].running_mean, norms[2].running_mean)
    # its saved shared statistics are the steps' averaged (what the reference's hold after training), the block's
    # own left alone, and the reference network loads the file with the extra keys left out
    own = stepped.RRCNN1.RCNN[0].conv[1].running_mean.clone()
    saved = stepped.state_dict()
    for stat in ("running_mean", "running_var"):
        average = torch.stack([getattr(n, stat) for n in norms]).mean(0)
        assert torch.allclose(saved[f"RRCNN1.RCNN.0.conv.1.{stat}"], average)
    mean = torch.stack([n.running_mean for n in norms]).mean(0)
    assert torch.equal(stepped.RRCNN1.RCNN[0].conv[1].running_mean, own) and not torch.allclose(own, mean)
    create_model("R2AttU_Net", t=2, base_channels=4).load_state_dict(
        {k: v for k, v in saved.items() if ".step_norms." not in k})


def test_a_step_statistics_run_trains_resumes_and_predicts(tmp_path, small_data):
    from r2unet.engine.inference import Segmenter

    results = _train(tmp_path, small_data, "steps", step_stats=True, num_epochs=2)
    assert results["test"]["JS"] >= 0
    segmenter = Segmenter(tmp_path / "steps", device="cpu")
    assert segmenter.cfg.step_stats and segmenter.members[0].model.RRCNN1.RCNN[0].step_norms is not None
    # its exports carry the statistics of every step: the same predictions from the safetensors and ONNX files
    from r2unet.engine.export import export_checkpoint

    image = np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8)
    (_, _, expected), = segmenter.predict([image])
    export_checkpoint(tmp_path / "steps", tmp_path / "w.safetensors", log=lambda *a: None)
    (_, _, got), = Segmenter(tmp_path / "w.safetensors", device="cpu").predict([image])
    assert np.array_equal(got, expected)
    pytest.importorskip("onnxruntime", reason="the ONNX check needs the export extra")
    export_checkpoint(tmp_path / "steps", tmp_path / "m.onnx", log=lambda *a: None)  # checked against PyTorch
    (_, _, got), = Segmenter(tmp_path / "m.onnx").predict([image])
    assert np.abs(got - expected).max() < 1e-3
