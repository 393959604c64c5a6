import numpy as np
import pytest
import torch

from r2unet.engine.metrics import ALL_METRICS, MetricAccumulator, confusion_counts, segmentation_metrics


def _numpy_reference(probs, target, threshold=0.5):
    """Plain NumPy, one image at a time, written independently of r2unet.engine.metrics."""
    rows = []
    for p, g in zip(probs, target):
        p = p.ravel() > threshold
        g = g.ravel() > 0.5
        tp, fp, fn, tn = np.sum(p & g), np.sum(p & ~g), np.sum(~p & g), np.sum(~p & ~g)
        ok = fp + fn == 0
        se = tp / (tp + fn) if tp + fn else float(ok)
        pc = tp / (tp + fp) if tp + fp else float(ok)
        sp = tn / (tn + fp) if tn + fp else float(ok)
        js = tp / (tp + fp + fn) if tp + fp + fn else float(ok)
        dc = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else float(ok)
        f1 = 2 * pc * se / (pc + se) if pc + se else 0.0
        rows.append(dict(ACC=(tp + tn) / p.size, SE=se, SP=sp, PC=pc, F1=f1, JS=js, DC=dc,
                         JS_thresholded=js if js >= 0.65 else 0.0))
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


def test_hand_computed_case():
    # 1 image 2x2: target [[1,1],[0,0]]; prediction [[1,0],[1,0]] -> tp=1 fp=1 fn=1 tn=1
    target = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]])
    probs = torch.tensor([[[[0.9, 0.2], [0.7, 0.1]]]])
    m = segmentation_metrics(probs, target)
    assert m["ACC"] == pytest.approx(0.5)
    assert m["SE"] == pytest.approx(0.5)
    assert m["SP"] == pytest.approx(0.5)
    assert m["PC"] == pytest.approx(0.5)
    assert m["F1"] == pytest.approx(0.5)
    assert m["JS"] == pytest.approx(1 / 3)
    assert m["DC"] == pytest.approx(0.5)
    assert m["JS_thresholded"] == 0.0
    assert set(m) == set(ALL_METRICS) and all(isinstance(v, float) for v in m.values())


def test_threshold_is_strict_and_target_above_half_is_foreground():
    target = torch.tensor([[[[0.6, 0.4]]]])  # a soft/resized mask: only the first pixel is foreground
    probs = torch.tensor([[[[0.5, 0.51]]]])  # 0.5 is not > 0.5
    counts = confusion_counts(probs, target)
    assert counts.tolist() == [[0, 1, 1, 0]]


@pytest.mark.parametrize("reduction", ["image", "pooled"])
def test_random_masks_match_numpy(reduction):
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(6, 1, 17, 23, generator=g)
    target = (torch.rand(6, 1, 17, 23, generator=g) > 0.6).float()
    target[2] = 0  # an empty target too
    ours = segmentation_metrics(probs, target, reduction=reduction)
    if reduction == "image":
        ref = _numpy_reference(probs.numpy(), target.numpy())
    else:  # pooled = one big image made of all pixels, but JS_thresholded stays per image
        ref = _numpy_reference(probs.numpy().reshape(1, -1), target.numpy().reshape(1, -1))
        ref["JS_thresholded"] = _numpy_reference(probs.numpy(), target.numpy())["JS_thresholded"]
    for k in ALL_METRICS:
        assert ours[k] == pytest.approx(ref[k], abs=1e-12), k


def test_both_empty_scores_one():
    z = torch.zeros(1, 1, 4, 4)
    m = segmentation_metrics(z, z)
    for k in ("JS", "DC", "F1", "PC", "SE", "SP", "ACC", "JS_thresholded"):
        assert m[k] == 1.0, k


def test_empty_target_nonempty_prediction_scores_zero():
    target = torch.zeros(1, 1, 4, 4)
    probs = torch.zeros(1, 1, 4, 4)
    probs[..., 0, 0] = 1
    m = segmentation_metrics(probs, target)
    for k in ("JS", "DC", "F1", "PC", "SE"):
        assert m[k] == 0.0, k
    assert m["SP"] == pytest.approx(15 / 16)


def test_empty_prediction_nonempty_target():
    target = torch.zeros(1, 1, 4, 4)
    target[..., :2, :] = 1
    m = segmentation_metrics(torch.zeros_like(target), target)
    assert m["SE"] == 0 and m["JS"] == 0 and m["DC"] == 0 and m["PC"] == 0 and m["F1"] == 0
    assert m["SP"] == 1.0 and m["ACC"] == 0.5


def test_all_foreground_predicted_perfectly():
    one = torch.ones(2, 1, 3, 3)
    m = segmentation_metrics(one, one)
    assert all(m[k] == 1.0 for k in ALL_METRICS)


def test_max_rule_is_not_used_for_empty_masks():
    """The reference's GT == max(GT) turns an empty mask into all foreground; ours must not."""
    target = torch.zeros(1, 1, 4, 4)
    probs = torch.ones(1, 1, 4, 4)
    assert segmentation_metrics(probs, target)["JS"] == 0.0


def test_accumulator_over_batches_equals_one_shot():
    g = torch.Generator().manual_seed(1)
    probs = torch.rand(10, 1, 8, 8, generator=g)
    target = (torch.rand(10, 1, 8, 8, generator=g) > 0.5).float()
    acc = MetricAccumulator()
    for i in range(0, 10, 3):
        acc.update(probs[i:i + 3], target[i:i + 3])
    assert acc.num_images == 10
    for red in ("image", "pooled"):
        one = segmentation_metrics(probs, target, reduction=red)
        assert acc.compute(red) == pytest.approx(one, abs=1e-12)
    acc.reset()
    with pytest.raises(ValueError, match="no images"):
        acc.compute()


def test_ratios_per_image_differ_from_pooled():
    target = torch.zeros(2, 1, 2, 2)
    target[0] = 1
    probs = target.clone()
    probs[1, 0, 0, 0] = 1  # second image: empty target, one false positive
    image = segmentation_metrics(probs, target, reduction="image")
    pooled = segmentation_metrics(probs, target, reduction="pooled")
    assert image["JS"] == pytest.approx(0.5)
    assert pooled["JS"] == pytest.approx(4 / 5)


def test_bad_arguments():
    with pytest.raises(ValueError, match="shapes differ"):
        segmentation_metrics(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 3))
    with pytest.raises(ValueError, match="reduction"):
        segmentation_metrics(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), reduction="mean")


def test_per_image_scores_are_kept_in_order_and_average_to_the_split_score():
    g = torch.Generator().manual_seed(5)
    probs, target = torch.rand(7, 1, 16, 16, generator=g), (torch.rand(7, 1, 16, 16, generator=g) > 0.6).float()
    acc = MetricAccumulator(keep_per_image=True)
    acc.update(probs[:4], target[:4])
    acc.update(probs[4:], target[4:])
    rows = acc.per_image()
    for i in range(7):
        single = segmentation_metrics(probs[i:i + 1], target[i:i + 1])
        assert all(rows[k][i] == pytest.approx(single[k]) for k in rows)
    assert all(sum(rows[k]) / 7 == pytest.approx(v) for k, v in acc.compute().items() if k in rows)
    with pytest.raises(ValueError, match="keep_per_image"):
        MetricAccumulator().per_image()


def test_mean_spread_sd_and_bootstrap_interval():
    from r2unet.engine.metrics import mean_spread

    rng = np.random.default_rng(3)
    x = rng.uniform(0.4, 1.0, size=400)
    s = mean_spread(x)
    assert s["sd"] == pytest.approx(np.std(x, ddof=1))
    lo, hi = s["ci"]
    assert lo < x.mean() < hi
    half = 1.96 * x.std(ddof=1) / np.sqrt(x.size)  # the normal approximation, good at n = 400
    assert (hi - lo) / 2 == pytest.approx(half, rel=0.1)
    assert mean_spread(x) == s  # seeded: the same scores give the same interval
    assert mean_spread([0.7, 0.7, 0.7])["ci"] == [pytest.approx(0.7), pytest.approx(0.7)]
    assert mean_spread([0.5]) == {"sd": 0.0, "ci": [0.5, 0.5], "level": 0.95}
    narrow = mean_spread(rng.uniform(0.4, 1.0, size=1600))
    assert narrow["ci"][1] - narrow["ci"][0] < (hi - lo) * 0.7  # 4x the images, about half the width


def test_per_image_spread_covers_the_isic_thresholded_score():
    from r2unet.engine.metrics import per_image_spread

    spread = per_image_spread({"JS": [0.9, 0.6, 0.8, 0.5], "DC": [0.95, 0.75, 0.89, 0.67]})
    assert set(spread) == {"JS", "DC", "JS_thresholded"}
    # JS_thresholded per image: 0.9, 0, 0.8, 0 -> its sd, not JS's
    assert spread["JS_thresholded"]["sd"] == pytest.approx(float(np.std([0.9, 0, 0.8, 0], ddof=1)))


def test_threshold_lists_and_ranges():
    from r2unet.engine.metrics import parse_thresholds

    assert parse_thresholds("0.3:0.7:0.1") == [0.3, 0.4, 0.5, 0.6, 0.7]  # stop included despite float steps
    assert parse_thresholds("0.6, 0.4,0.6") == [0.4, 0.6]
    for bad in ("0:1:0.5", "0.5:0.7:0", "a,b", "1.2", "", "0.3:0.7"):
        with pytest.raises(ValueError, match="--thresholds"):
            parse_thresholds(bad)
    with pytest.raises(ValueError, match="a range like 0.3:0.7:0.05"):  # a descending range is a format mistake
        parse_thresholds("0.5:0.3:0.1")
