import json
from pathlib import Path

import pytest
import torch

from r2unet import create_model, list_models
from r2unet.models import UNetFamily

REFERENCE = json.loads((Path(__file__).parent / "data" / "reference_architecture.json").read_text())
NAMES = ["U_Net", "R2U_Net", "AttU_Net", "R2AttU_Net"]


def _fill_by_weight_rule(model: torch.nn.Module) -> None:
    """The reference's documented deterministic weight rule (see tests/data/reference_architecture.json)."""
    state = model.state_dict()
    new = {}
    for i, (key, tensor) in enumerate(state.items()):
        if not tensor.is_floating_point():
            new[key] = tensor
            continue
        n = tensor.numel()
        s = torch.sin(0.37 * torch.arange(n, dtype=torch.float64) + 0.11 * i).reshape(tensor.shape)
        if tensor.dim() == 4:
            v = 0.05 * s
        elif key.endswith("running_var"):
            v = 1 + 0.5 * s**2
        elif key.endswith("running_mean"):
            v = 0.1 * s
        elif key.endswith("weight"):
            v = 1 + 0.1 * s
        elif key.endswith("bias"):
            v = 0.02 * s
        else:
            raise AssertionError(f"no rule for {key}")
        new[key] = v.float()
    model.load_state_dict(new, strict=True)


def _reference_input() -> torch.Tensor:
    return torch.sin(0.1 * torch.arange(2 * 3 * 48 * 48, dtype=torch.float64)).reshape(2, 3, 48, 48).float()


def test_registry_lists_the_four_networks():
    assert list_models() == NAMES


def test_unknown_name_lists_valid_ones():
    with pytest.raises(ValueError, match="R2AttU_Net") as err:
        create_model("R3U_Net")
    assert "R3U_Net" in str(err.value)


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_keys_shapes_and_order_match_reference(name):
    ref = REFERENCE["models"][name]
    model = create_model(name, **ref["constructor_args"])
    ours = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    assert ours == [(k, s) for k, s in ref["state_dict"]]
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == ref["num_parameters"]


@pytest.mark.parametrize("name", NAMES)
def test_reference_state_dict_loads_strict(name, tmp_path):
    """A file written the way the reference writes checkpoints (torch.save(state_dict)) loads with strict=True."""
    ref = REFERENCE["models"][name]
    src = create_model(name)
    _fill_by_weight_rule(src)
    path = tmp_path / f"{name}.pkl"
    torch.save(src.state_dict(), path)
    dst = create_model(name)
    dst.load_state_dict(torch.load(path, weights_only=True), strict=True)
    assert torch.equal(dst.Conv_1x1.weight, src.Conv_1x1.weight)
    assert len(dst.state_dict()) == len(ref["state_dict"])


@pytest.mark.parametrize("name", NAMES)
def test_outputs_reproduce_reference(name):
    ref = REFERENCE["models"][name]
    torch.manual_seed(0)
    model = create_model(name, **ref["constructor_args"])
    _fill_by_weight_rule(model)
    x = _reference_input()
    with torch.no_grad():
        model.eval()
        out = model(x).double()
        assert list(out.shape) == ref["eval_output_shape"]
        assert out.sum().item() == pytest.approx(ref["eval_output_sum"], rel=1e-4, abs=1e-6)
        assert out.abs().sum().item() == pytest.approx(ref["eval_output_abs_sum"], rel=1e-4)
        flat = out.flatten()
        for idx, value in ref["eval_output_at"].items():
            assert flat[int(idx)].item() == pytest.approx(value, rel=1e-4, abs=1e-7)


def _other_batch_mate(x: torch.Tensor) -> torch.Tensor:
    """``x`` with its second image replaced (the first is unchanged)."""
    y = x.clone()
    y[1] = torch.cos(0.05 * torch.arange(y[1].numel(), dtype=torch.float64)).reshape(y[1].shape).float()
    return y


@pytest.mark.parametrize("name", NAMES)
def test_training_mode_normalises_with_the_batch_and_eval_mode_does_not(name):
    """What the reference's training mode means, checked without pinning ill-conditioned sums (BatchNorm over a
    2-image 48-pixel batch: float32 results differ by percents between CPUs): in training mode an image's output
    depends on the other images of its batch; in eval mode (running statistics) it does not."""
    ref = REFERENCE["models"][name]
    model = create_model(name, **ref["constructor_args"])
    _fill_by_weight_rule(model)
    x, y = _reference_input(), _other_batch_mate(_reference_input())
    with torch.no_grad():
        model.eval()
        a, b = model(x)[0], model(y)[0]
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)
        model.train()
        a, b = model(x)[0], model(y)[0]
        assert (a - b).abs().max() > 100 * 1e-5 + 1e-4 * a.abs().max()


@pytest.mark.parametrize("name", NAMES)
def test_training_mode_updates_running_statistics_with_the_reference_momentum(name):
    """Every BatchNorm call in training mode moves the running mean and variance (unbiased) by momentum 0.1, the
    reference's (PyTorch's default), toward the batch's; a recurrent block's BatchNorm, called t + 1 times per
    forward like the reference's, moves t + 1 times. Eval mode leaves them alone."""
    ref = REFERENCE["models"][name]
    model = create_model(name, **ref["constructor_args"])
    _fill_by_weight_rule(model)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    expected = {id(m): (m.running_mean.double().clone(), m.running_var.double().clone(), 0) for m in norms}

    def follow(module, inputs):
        x = inputs[0].double()
        mean, var, calls = expected[id(module)]
        batch_mean, batch_var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=True)
        expected[id(module)] = (0.9 * mean + 0.1 * batch_mean, 0.9 * var + 0.1 * batch_var, calls + 1)

    hooks = [m.register_forward_pre_hook(follow) for m in norms]
    with torch.no_grad():
        model.train()
        model(_reference_input())
    for h in hooks:
        h.remove()
    recurrent_calls = 1 + (ref["constructor_args"].get("t", 2) if name.startswith("R2") else 0)
    assert max(calls for _, _, calls in expected.values()) == (recurrent_calls if name.startswith("R2") else 1)
    for m in norms:
        mean, var, calls = expected[id(m)]
        assert m.momentum == 0.1 and m.num_batches_tracked.item() == calls
        assert torch.allclose(m.running_mean.double(), mean, rtol=1e-4, atol=1e-6)
        assert torch.allclose(m.running_var.double(), var, rtol=1e-4, atol=1e-6)
    before = [m.running_mean.clone() for m in norms]
    with torch.no_grad():
        model.eval()
        model(_reference_input())
    assert all(torch.equal(m.running_mean, b) for m, b in zip(norms, before))


@pytest.mark.parametrize("name", NAMES)
def test_tiny_forward_backward_any_channels(name):
    model = create_model(name, img_ch=1, output_ch=2, t=1, base_channels=4)
    x = torch.randn(3, 1, 32, 48, requires_grad=True)
    out = model(x)
    assert out.shape == (3, 2, 32, 48)
    out.mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_base_channels_scale_widths():
    model = create_model("U_Net", base_channels=8)
    assert model.Conv1.conv[0].out_channels == 8
    assert model.Conv5.conv[0].out_channels == 128


def test_recurrent_block_reuses_one_conv_t_plus_one_times():
    model = create_model("R2U_Net", t=3, base_channels=4)
    block = model.RRCNN1.RCNN[0]
    calls = []
    block.conv.register_forward_hook(lambda *_: calls.append(1))
    block(torch.randn(1, 4, 16, 16))
    assert len(calls) == 4
    assert sum(1 for m in block.modules() if isinstance(m, torch.nn.Conv2d)) == 1


def test_t_is_validated_for_recurrent_and_ignored_otherwise():
    with pytest.raises(ValueError, match="t"):
        create_model("R2U_Net", t=0)
    unet = create_model("U_Net", t=0, base_channels=4)
    assert isinstance(unet, UNetFamily) and unet.t is None


def test_bad_input_size_names_nearest_valid():
    model = create_model("U_Net", base_channels=4)
    with pytest.raises(ValueError, match="nearest valid size is 48x32"):
        model(torch.randn(1, 3, 50, 30))


@pytest.mark.parametrize("name", list_models())
def test_forward_compiles_as_one_graph(name):
    """A graph break would split torch.compile's graph and cost GPU speed silently (tracing only, no codegen)."""
    torch._dynamo.reset()
    model = create_model(name, t=2, base_channels=4)
    explained = torch._dynamo.explain(model)(torch.randn(2, 3, 32, 32))
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("base,img_ch,out_ch", [(4, 3, 1), (8, 1, 2)])
def test_a_bare_state_dict_tells_its_network(name, base, img_ch, out_ch):
    from r2unet.engine.checkpoint import infer_architecture

    state = create_model(name, img_ch=img_ch, output_ch=out_ch, base_channels=base).state_dict()
    assert infer_architecture(state) == {"model_type": name, "base_channels": base, "img_ch": img_ch,
                                         "output_ch": out_ch, "step_stats": False}
    assert infer_architecture({"fc.weight": torch.zeros(2, 2)}) is None
