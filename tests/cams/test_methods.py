"""Tests of gradloc.cams: method formulas against hand/autograd references, the batched engine, hygiene."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from gradloc.cams.engine import activations_and_gradients
from gradloc.cams.layers import default_layer, list_layers, resolve_layer
from gradloc.cams.methods import METHODS, compute_cams, compute_gradient_cams

GRADIENT_METHODS = ["gradcam", "gradcampp", "xgradcam", "layercam", "hirescam"]
CLASSES = [4, 0, 2]


def _init(model: nn.Module, seed: int) -> nn.Module:
    """Fill every parameter from a seeded generator (independent of torch's global RNG)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    return model


class TinyGap(nn.Module):
    """conv(3->4) ReLU conv(4->5, stride 2) ReLU, global average pooling, linear(5->6)."""

    gradloc_layer = "relu2"
    gradloc_gap_linear = ("relu2", "fc")

    def __init__(self, seed: int = 0, inplace: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.relu1 = nn.ReLU(inplace=inplace)
        self.conv2 = nn.Conv2d(4, 5, 3, stride=2, padding=1)
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(5, 6)
        _init(self, seed)

    def features(self, x: Tensor) -> Tensor:
        return self.relu2(self.conv2(self.relu1(self.conv1(x))))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


class TinyHead(nn.Module):
    """Same trunk as TinyGap, then a non-GAP head: flatten, linear(80->7), ReLU, linear(7->6)."""

    gradloc_layer = "relu2"

    def __init__(self, seed: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 5, 3, stride=2, padding=1)
        self.relu2 = nn.ReLU()
        self.fc1 = nn.Linear(80, 7)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(7, 6)
        _init(self, seed)

    def head(self, activation: Tensor) -> Tensor:
        return self.fc2(self.relu3(self.fc1(activation.flatten(1))))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.relu2(self.conv2(self.relu1(self.conv1(x)))))


class Boom(nn.Module):
    """Identity that raises when armed: an exception in the middle of a forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.armed = False

    def forward(self, x: Tensor) -> Tensor:
        if self.armed:
            raise RuntimeError("boom")
        return x


def _images(n: int = 2, size: int = 8, seed: int = 10, dtype: torch.dtype = torch.float32) -> Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _reference_grad(model: nn.Module, images: Tensor, module: nn.Module, cls: int) -> tuple[Tensor, Tensor]:
    """One class at a time, the textbook way: full forward with grad, backward of sum_b y_c to the layer.

    The hook hands the network a clone so that a following in-place ReLU cannot overwrite the activation.
    """
    store: dict[str, Tensor] = {}

    def keep(module: nn.Module, inputs: object, output: Tensor) -> Tensor:
        store["a"] = output
        return output.clone()

    handle = module.register_forward_hook(keep)
    try:
        scores = model(images)
    finally:
        handle.remove()
    (grad,) = torch.autograd.grad(scores[:, cls].sum(), store["a"])
    return store["a"].detach(), grad


# Per-class reference formulas, written independently of gradloc.cams: A, g are [B, C, h, w].
def _ref_gradcam(a: Tensor, g: Tensor) -> Tensor:
    return (g.mean(dim=(2, 3), keepdim=True) * a).sum(1).relu()


def _ref_gradcampp(a: Tensor, g: Tensor) -> Tensor:
    alpha = g**2 / (2 * g**2 + a.sum(dim=(2, 3), keepdim=True) * g**3)
    alpha = torch.nan_to_num(alpha, nan=0.0, posinf=0.0, neginf=0.0)
    return ((alpha * g.relu()).sum(dim=(2, 3), keepdim=True) * a).sum(1).relu()


def _ref_xgradcam(a: Tensor, g: Tensor) -> Tensor:
    weights = torch.nan_to_num((g * a).sum(dim=(2, 3)) / a.sum(dim=(2, 3)), nan=0.0, posinf=0.0, neginf=0.0)
    return (weights[:, :, None, None] * a).sum(1).relu()


def _ref_layercam(a: Tensor, g: Tensor) -> Tensor:
    return (g.relu() * a).sum(1).relu()


def _ref_hirescam(a: Tensor, g: Tensor) -> Tensor:
    return (g * a).sum(1).relu()


REFERENCES = {
    "gradcam": _ref_gradcam,
    "gradcampp": _ref_gradcampp,
    "xgradcam": _ref_xgradcam,
    "layercam": _ref_layercam,
    "hirescam": _ref_hirescam,
}


def _per_class_reference(model: nn.Module, images: Tensor, layer: nn.Module, method: str,
                         classes: list[int]) -> Tensor:
    maps = []
    for cls in classes:
        activation, grad = _reference_grad(model, images, layer, cls)
        maps.append(REFERENCES[method](activation, grad))
    return torch.stack(maps, dim=1)


def _assert_close(actual: Tensor, expected: Tensor, tol: float = 1e-5) -> None:
    scale = max(1.0, expected.abs().max().item())
    error = (actual.double() - expected.double()).abs().max().item()
    assert error <= tol * scale, f"max abs error {error:.3g} > {tol:.1g} x {scale:.3g}"


def _no_hooks(model: nn.Module) -> bool:
    return all(not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)
               for m in model.modules())


# --- formulas -----------------------------------------------------------------------------------------------


def test_cam_by_hand_and_gradcam_is_cam_over_z() -> None:
    model = TinyGap().eval()
    images = _images()
    activation = model.features(images).detach()  # [2, 5, 4, 4]
    expected_cam = torch.einsum("kc,bchw->bkhw", model.fc.weight.detach()[CLASSES], activation).relu()
    cam, scores = compute_cams(model, images, CLASSES, "cam")
    _assert_close(cam, expected_cam)
    _assert_close(scores, model(images).detach())
    z = 4 * 4
    closed, _ = compute_cams(model, images, CLASSES, "gradcam")
    model.gradloc_gap_linear = None  # same network, autograd path
    autograd, _ = compute_cams(model, images, CLASSES, "gradcam")
    _assert_close(closed, expected_cam / z)
    _assert_close(autograd, expected_cam / z)
    assert cam.max() > 0


@pytest.mark.parametrize("method", GRADIENT_METHODS)
def test_closed_form_equals_autograd(method: str) -> None:
    model = TinyGap(seed=3).double()
    images = _images(dtype=torch.float64)
    activation, grads, _ = activations_and_gradients(model, images, CLASSES)
    closed, _ = compute_cams(model, images, CLASSES, method)
    model.gradloc_gap_linear = None
    activation_ag, grads_ag, _ = activations_and_gradients(model, images, CLASSES)
    autograd, _ = compute_cams(model, images, CLASSES, method)
    torch.testing.assert_close(activation, activation_ag)
    torch.testing.assert_close(grads, grads_ag, rtol=1e-12, atol=1e-12)
    _assert_close(closed, autograd, tol=1e-6)
    assert autograd.max() > 0


class GapThenMlp(TinyGap):
    """TinyGap's trunk and pooling, then a non-linear head on the pooled features (like voc+imagenet)."""

    gradloc_gap_linear = None

    def __init__(self, seed: int = 5) -> None:
        super().__init__(seed)
        self.fc2 = _init(nn.Linear(6, 6), seed + 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(torch.tanh(super().forward(x)))


def test_xgradcam_and_hirescam_equal_gradcam_at_a_layer_before_global_average_pooling() -> None:
    """Behind global average pooling every cell of the layer gets the same gradient, whatever the head: then
    HiResCAM (gradient x activation per cell) and XGrad-CAM (activation-weighted mean gradient) give Grad-CAM's
    weights, so the methods table has no rows of their own (scripts/benchmark_rows.yaml)."""
    model = GapThenMlp().double().eval()
    images = _images(dtype=torch.float64)
    gradcam, _ = compute_cams(model, images, CLASSES, "gradcam")
    for method in ("xgradcam", "hirescam"):
        other, _ = compute_cams(model, images, CLASSES, method)
        _assert_close(other, gradcam, tol=1e-9)
    assert gradcam.max() > 0
    layercam, _ = compute_cams(model, images, CLASSES, "layercam")  # relu(gradient) per cell: not the same maps
    assert not torch.allclose(layercam / layercam.amax((2, 3), keepdim=True).clamp_min(1e-12),
                              gradcam / gradcam.amax((2, 3), keepdim=True).clamp_min(1e-12))


@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("model_cls", [TinyGap, TinyHead])
def test_gradient_methods_in_one_pass_equal_one_method_each(model_cls: type[nn.Module], flip: bool) -> None:
    model = model_cls().eval()
    images = _images(n=3)
    maps, scores = compute_gradient_cams(model, images, CLASSES, GRADIENT_METHODS, flip=flip)
    assert list(maps) == list(GRADIENT_METHODS)
    for method in GRADIENT_METHODS:
        alone, alone_scores = compute_cams(model, images, CLASSES, method, flip=flip)
        torch.testing.assert_close(maps[method], alone, rtol=0, atol=0)
        torch.testing.assert_close(scores, alone_scores, rtol=0, atol=0)
    with pytest.raises(ValueError, match="give one or more of gradcam"):
        compute_gradient_cams(model, images, CLASSES, ["gradcam", "scorecam"])


@pytest.mark.parametrize("model_cls", [TinyGap, TinyHead])
@pytest.mark.parametrize("method", GRADIENT_METHODS)
def test_batched_all_classes_equal_per_class_loop(method: str, model_cls: type[nn.Module]) -> None:
    model = model_cls().eval()
    images = _images(n=3)
    maps, _ = compute_cams(model, images, CLASSES, method)
    expected = _per_class_reference(model, images, model.relu2, method, CLASSES)
    assert maps.shape == (3, len(CLASSES), 4, 4) and maps.dtype == torch.float32
    _assert_close(maps, expected, tol=1e-5)
    assert maps.max() > 0


def test_gradcampp_matches_exp_score_derivatives() -> None:
    """Chattopadhay et al. Eq. 10 with Y = exp(y_c), derivatives of Y taken by autograd (double)."""
    model = TinyHead(seed=5).double().eval()
    images = _images(n=1, seed=11, dtype=torch.float64)
    activation = model.relu2(model.conv2(model.relu1(model.conv1(images)))).detach()  # [1, 5, 4, 4]
    maps, scores = compute_cams(model, images, [1, 3], "gradcampp")
    for k, cls in enumerate([1, 3]):
        a = activation.clone().requires_grad_()
        big_y = model.head(a)[0, cls].exp()
        (d1,) = torch.autograd.grad(big_y, a, create_graph=True)
        d2 = torch.zeros_like(a)
        d3 = torch.zeros_like(a)
        for index in range(a.numel()):
            (row,) = torch.autograd.grad(d1.flatten()[index], a, create_graph=True)
            d2.view(-1)[index] = row.flatten()[index].detach()
            (row3,) = torch.autograd.grad(row.flatten()[index], a, retain_graph=True)
            d3.view(-1)[index] = row3.flatten()[index]
        denominator = 2 * d2 + activation.sum(dim=(2, 3), keepdim=True) * d3
        alpha = torch.where(d2 != 0, d2 / denominator, torch.zeros_like(d2))
        weights = (alpha * d1.detach().relu()).sum(dim=(2, 3))  # [1, 5]
        paper_map = (weights[:, :, None, None] * activation).sum(1).relu()  # [1, 4, 4]
        # gradloc drops the positive factor exp(y_c) of the paper's ReLU(dY/dA)
        _assert_close(maps[:, k].double() * scores[0, cls].double().exp(), paper_map, tol=1e-5)
        assert paper_map.max() > 0


@pytest.mark.parametrize("model_cls", [TinyGap, TinyHead])
def test_gradients_match_finite_differences(model_cls: type[nn.Module]) -> None:
    model = model_cls(seed=7).double().eval()
    images = _images(n=2, seed=12, dtype=torch.float64)
    classes = [5, 1]
    _, grads, _ = activations_and_gradients(model, images, classes, "relu2")
    eps = 1e-6
    numeric = torch.zeros(len(classes), 2, 5, 4, 4, dtype=torch.float64)
    for index in range(2 * 5 * 4 * 4):
        delta = torch.zeros(2 * 5 * 4 * 4, dtype=torch.float64)
        delta[index] = eps
        outputs = []
        for sign in (1.0, -1.0):
            handle = model.relu2.register_forward_hook(
                lambda m, i, o, s=sign, d=delta: o + s * d.view(2, 5, 4, 4))
            try:
                with torch.no_grad():
                    outputs.append(model(images))
            finally:
                handle.remove()
        diff = (outputs[0] - outputs[1]) / (2 * eps)  # [2, 6]: only image index // 80 changes
        numeric.view(len(classes), -1)[:, index] = diff[index // 80, classes]
    torch.testing.assert_close(grads, numeric, rtol=1e-6, atol=1e-7)
    assert numeric.abs().max() > 1e-3


def _constant_channels(module: nn.Module, inputs: object, output: Tensor) -> Tensor:
    """relu2 with channels 1 and 3 all zero and channel 4 constant 2.5 (dead / saturated units), in every
    forward pass (the masked ones too)."""
    output = output.clone()
    output[:, [1, 3]] = 0.0
    output[:, 4] = 2.5
    return output


@pytest.mark.parametrize("constant", [False, True])
def test_scorecam_by_hand_and_batch_size_invariant(constant: bool) -> None:
    model = TinyHead(seed=2).eval()
    images = _images(n=2, seed=13)
    if constant:  # constant channels share one pass of the zero input; the maps must not change
        model.relu2.register_forward_hook(_constant_channels)
    activation = model.relu2(model.conv2(model.relu1(model.conv1(images)))).detach()
    flat = activation.flatten(2)
    assert ((flat.amax(2) == flat.amin(2)).sum() == 6) == constant
    expected = torch.zeros(2, len(CLASSES), 4, 4)
    with torch.no_grad():
        for b in range(2):
            channel_scores = torch.zeros(5, len(CLASSES))
            for k in range(5):
                up = F.interpolate(activation[b, k][None, None], size=(8, 8), mode="bilinear",
                                   align_corners=False)[0, 0]
                if up.max() > up.min():
                    mask = (up - up.min()) / (up.max() - up.min())
                else:
                    mask = torch.zeros_like(up)
                channel_scores[k] = model(images[b:b + 1] * mask)[0, CLASSES]
            weights = torch.softmax(channel_scores, dim=0)  # over channels
            expected[b] = torch.einsum("kc,khw->chw", weights, activation[b]).relu()
    seen = []  # images through the network: 2 + one per varying channel + one zero input if any is constant
    model.conv1.register_forward_pre_hook(lambda module, inputs: seen.append(len(inputs[0])))
    results = [compute_cams(model, images, CLASSES, "scorecam", batch_size=bs)[0] for bs in (1, 3, 1000)]
    assert sum(seen) == 3 * ((2 + 4 + 1) if constant else (2 + 10))
    for maps in results:
        _assert_close(maps, expected, tol=1e-5)
        _assert_close(maps, results[0], tol=1e-6)
    assert expected.max() > 0


@pytest.mark.parametrize("inplace", [False, True])
def test_guided_backprop_by_hand(inplace: bool) -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.relu = nn.ReLU(inplace=inplace)
            self.fc = nn.Linear(4 * 8 * 8, 6)
            _init(self, 4)

        def forward(self, x: Tensor) -> Tensor:
            return self.fc(self.relu(self.conv(x)).flatten(1))

    model = Net().double()
    images = _images(n=2, seed=14, dtype=torch.float64)
    maps, _ = compute_cams(model, images, [0, 5], "guided_backprop")
    z = model.conv(images).detach()
    for k, cls in enumerate([0, 5]):
        r_out = model.fc.weight.detach()[cls].view(1, 4, 8, 8).expand(2, 4, 8, 8)
        guided = F.conv_transpose2d(r_out.relu() * (z > 0), model.conv.weight.detach(), padding=1)
        plain = F.conv_transpose2d(r_out * (z > 0), model.conv.weight.detach(), padding=1)
        torch.testing.assert_close(maps[:, k], guided.abs().amax(1).float())
        assert not torch.allclose(guided.abs().amax(1), plain.abs().amax(1))
    assert _no_hooks(model)


def test_guided_gradcam_is_upsampled_gradcam_times_guided_backprop() -> None:
    model = TinyGap(seed=6)
    images = _images(n=2, seed=15)
    gradcam, _ = compute_cams(model, images, CLASSES, "gradcam")
    guided, _ = compute_cams(model, images, CLASSES, "guided_backprop", batch_size=1)
    combined, _ = compute_cams(model, images, CLASSES, "guided_gradcam")
    assert combined.shape == guided.shape == (2, len(CLASSES), 8, 8)
    upsampled = F.interpolate(gradcam, size=(8, 8), mode="bilinear", align_corners=False)
    _assert_close(combined, upsampled * guided)
    assert combined.max() > 0


# --- hygiene ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", list(METHODS))
def test_hooks_removed_and_state_restored_after_exception(method: str) -> None:
    model = TinyGap(seed=8)
    model.boom = Boom()  # runs after relu2 (the target layer), i.e. inside the recorded head
    original_forward = model.forward
    model.forward = lambda x: model.fc(model.pool(model.boom(model.features(x))).flatten(1))
    model.train()
    model.conv1.eval()
    model.boom.armed = True
    with pytest.raises(RuntimeError, match="boom"):
        compute_cams(model, _images(), CLASSES, method)
    assert _no_hooks(model)
    assert torch.is_grad_enabled()
    assert model.training and model.fc.training and model.relu2.training and not model.conv1.training
    model.boom.armed = False
    maps, _ = compute_cams(model, _images(), CLASSES, method)  # still usable
    assert maps.shape[:2] == (2, len(CLASSES))
    assert original_forward(_images()).shape == (2, 6)


@pytest.mark.parametrize("method", list(METHODS))
def test_parameter_grads_untouched(method: str) -> None:
    model = TinyGap(seed=9) if method == "cam" else TinyHead(seed=9)
    compute_cams(model, _images(), CLASSES, method)
    assert all(param.grad is None and param.requires_grad for param in model.parameters())
    assert _no_hooks(model)


def test_maps_and_scores_dtype_shape_for_double_model() -> None:
    model = TinyHead().double()
    images = _images(dtype=torch.float64)
    maps, scores = compute_cams(model, images, [3], "hirescam")
    assert maps.dtype == scores.dtype == torch.float32
    assert maps.shape == (2, 1, 4, 4) and scores.shape == (2, 6)
    _assert_close(scores, model(images).detach())


# --- layers -------------------------------------------------------------------------------------------------


class Wrapper(nn.Module):
    def __init__(self, twice: bool = False) -> None:
        super().__init__()
        self.backbone = TinyGap()
        self.other = TinyGap() if twice else None

    def forward(self, x: Tensor) -> Tensor:
        return self.backbone(x)


def test_resolve_layer_exact_suffix_ambiguous_unknown() -> None:
    wrapper = Wrapper()
    assert resolve_layer(wrapper, "backbone.relu2") == ("backbone.relu2", wrapper.backbone.relu2)
    assert resolve_layer(wrapper, "relu2") == ("backbone.relu2", wrapper.backbone.relu2)
    with pytest.raises(ValueError, match=r"ambiguous.*backbone\.relu2, other\.relu2"):
        resolve_layer(Wrapper(twice=True), "relu2")
    with pytest.raises(ValueError, match=r"no layer 'relu3' \(did you mean .*relu2.*valid layers include"):
        resolve_layer(wrapper, "relu3")
    with pytest.raises(ValueError, match=r"no layer 'layer4'.*backbone\.conv1"):
        compute_cams(wrapper, _images(), CLASSES, "gradcam", layer="layer4")


def test_default_layer_and_list_layers() -> None:
    model = TinyGap()
    assert default_layer(model) == "relu2"  # declared
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 3))
    assert default_layer(plain) == "3"  # last 4-D output; the adaptive pool is skipped
    assert list_layers(plain) == ["0", "1", "2", "3", "4"]
    maps, _ = compute_cams(plain, _images(size=12), [0, 2], "gradcam")
    assert maps.shape == (2, 2, 8, 8)


def test_layer_running_twice_is_rejected() -> None:
    shared = nn.ReLU()
    model = nn.Sequential(nn.Conv2d(3, 4, 3), shared, nn.Conv2d(4, 4, 3), shared, nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(4, 3))
    assert "1" not in list_layers(model) and "0" in list_layers(model)
    with pytest.raises(ValueError, match="runs more than once"):
        compute_cams(model, _images(), [0], "gradcam", layer="1")
    assert _no_hooks(model)


def test_layer_must_return_4d_and_feed_the_output() -> None:
    model = TinyHead()
    with pytest.raises(ValueError, match=r"layer 'fc1' returns shape \(2, 7\).*4-D"):
        compute_cams(model, _images(), [0], "gradcam", layer="fc1")

    class SideBranch(TinyGap):
        def __init__(self) -> None:
            super().__init__()
            self.side = nn.Conv2d(3, 2, 1)
            self.gradloc_gap_linear = None

        def forward(self, x: Tensor) -> Tensor:
            self.side(x)
            return super().forward(x)

    with pytest.raises(ValueError, match="does not depend on layer 'side'"):
        compute_cams(SideBranch(), _images(), [0], "gradcam", layer="side")


def test_cam_needs_gap_linear_head() -> None:
    with pytest.raises(ValueError, match=r"CAM needs a global-average-pooling \+ linear head.*declares none"):
        compute_cams(TinyHead(), _images(), CLASSES, "cam")
    with pytest.raises(ValueError, match=r"CAM needs .*follows 'relu2', not 'relu1'"):
        compute_cams(TinyGap(), _images(), CLASSES, "cam", layer="relu1")


def test_wrong_gap_linear_declaration_is_caught() -> None:
    model = TinyGap()
    model.pool = nn.AdaptiveMaxPool2d(1)  # no longer an average: the closed form would be wrong
    with pytest.raises(ValueError, match=r"linear\(global average of the layer\) differs"):
        compute_cams(model, _images(), CLASSES, "gradcam")
    head = TinyHead()
    head.gradloc_gap_linear = ("relu2", "fc1")
    with pytest.raises(ValueError, match="maps 80 -> 7 but the layer has 5 channels"):
        compute_cams(head, _images(), CLASSES, "gradcam")


def test_input_validation() -> None:
    model = TinyGap()
    with pytest.raises(ValueError, match="unknown CAM method 'gradcam\\+\\+'; choose one of cam, gradcam"):
        compute_cams(model, _images(), CLASSES, "gradcam++")
    with pytest.raises(ValueError, match=r"class indices \[6\] are outside \[0, 6\)"):
        compute_cams(model, _images(), [0, 6], "gradcam")
    with pytest.raises(ValueError, match="classes is empty"):
        compute_cams(model, _images(), [], "gradcam")
    with pytest.raises(ValueError, match="float tensor"):
        compute_cams(model, _images()[0], CLASSES)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        compute_cams(model, _images(), CLASSES, "scorecam", batch_size=0)
    with torch.inference_mode(), pytest.raises(ValueError, match=r"outside torch\.inference_mode"):
        compute_cams(model, torch.zeros(1, 3, 8, 8), CLASSES)
    with torch.no_grad():  # fine: the engine turns grad on after the layer
        maps, _ = compute_cams(model.__class__(), _images(), CLASSES, "gradcam", layer="relu1")
    assert maps.shape == (2, 3, 8, 8)


# --- torchvision models -------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "expected_default", "layer"),
    [("resnet18", "layer4", "layer3"), ("vgg11", "features", "features.18"),
     ("efficientnet_b0", "features", "features.5")],
)
def test_torchvision_models(name: str, expected_default: str, layer: str) -> None:
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None, num_classes=10)
    images = _images(n=2, size=64, seed=16)
    assert default_layer(model) == expected_default
    for target in (expected_default, layer):  # features.18 of vgg11 is a conv followed by an in-place ReLU
        module = resolve_layer(model, target)[1]
        for method in ("gradcam", "layercam"):
            maps, _ = compute_cams(model, images, [0, 3, 7], method, layer=target)  # model in train mode
            assert model.training
            expected = _per_class_reference(model.eval(), images, module, method, [0, 3, 7])
            model.train()
            _assert_close(maps / expected.abs().max(), expected / expected.abs().max(), tol=1e-5)
            assert expected.max() > 0
    assert model.training and _no_hooks(model)


@pytest.mark.slow
def test_torchvision_resnet_closed_form() -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    images = _images(n=2, size=64, seed=17)
    assert "layer4.1.relu" not in list_layers(model)  # the block's ReLU runs twice per forward
    autograd, _ = compute_cams(model, images, [1, 9], "gradcampp")
    model.gradloc_gap_linear = ("layer4", "fc")
    closed, _ = compute_cams(model, images, [1, 9], "gradcampp")
    cam, _ = compute_cams(model, images, [1, 9], "cam")
    _assert_close(closed / closed.max(), autograd / closed.max(), tol=1e-5)
    assert cam.shape == (2, 2, 2, 2)


# --- test-time horizontal flip ------------------------------------------------------------------------------

FLIP_METHODS = ["cam", *GRADIENT_METHODS, "scorecam"]


def _mirror_symmetric(model: nn.Module) -> nn.Module:
    """Make every conv kernel left-right symmetric: on odd-width inputs (stride-2 taps then sit at mirrored
    positions) the network is mirror-equivariant, ``A(flip(x)) = flip(A(x))``."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                module.weight.copy_((module.weight + module.weight.flip(3)) / 2)
    return model


@pytest.mark.parametrize("method", FLIP_METHODS)
def test_flip_averaged_maps_are_mirror_equivariant_for_any_model(method: str) -> None:
    model, images = TinyGap(seed=3), _images(n=2, size=8, seed=4)
    maps, scores = compute_cams(model, images, CLASSES, method, flip=True)
    mirrored, _ = compute_cams(model, images.flip(3), CLASSES, method, flip=True)
    _assert_close(mirrored, maps.flip(3))
    plain, plain_scores = compute_cams(model, images, CLASSES, method)
    torch.testing.assert_close(scores, plain_scores, rtol=0, atol=0)  # scores of the unflipped images
    assert not torch.allclose(maps, plain, atol=1e-4)  # this model is not equivariant: the flip does something
    # by hand: the mean of the plain map and the mirrored-back map of the mirrored image
    mirror_plain, _ = compute_cams(model, images.flip(3), CLASSES, method)
    _assert_close(maps, (plain + mirror_plain.flip(3)) / 2)


@pytest.mark.parametrize("method", FLIP_METHODS)
def test_flip_changes_nothing_for_a_mirror_equivariant_model_on_a_symmetric_input(method: str) -> None:
    model = _mirror_symmetric(TinyGap(seed=5))
    half = _images(n=2, size=7, seed=6)
    symmetric = (half + half.flip(3)) / 2
    for images in (symmetric, half):  # equivariant model: any input, and a symmetric one
        plain, _ = compute_cams(model, images, CLASSES, method)
        flipped, _ = compute_cams(model, images, CLASSES, method, flip=True)
        _assert_close(flipped, plain)
    _assert_close(plain.flip(3), compute_cams(model, half.flip(3), CLASSES, method)[0])
    symmetric_map, _ = compute_cams(model, symmetric, CLASSES, method, flip=True)
    _assert_close(symmetric_map, symmetric_map.flip(3))
    assert float(symmetric_map.abs().max()) > 0  # not trivially zero


# --- autocast: the network up to the layer in low precision, everything after it in float32 ---------------------


class _Dtypes:
    """Forward hooks recording the output dtype of modules by name."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        self.seen: dict[str, list[torch.dtype]] = {name: [] for name in names}
        self.handles = [model.get_submodule(name).register_forward_hook(self._hook(name)) for name in names]

    def _hook(self, name: str):
        def hook(module: nn.Module, inputs: object, output: Tensor) -> None:
            self.seen[name].append(output.dtype)
        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@pytest.mark.parametrize(("model", "flip"), [(TinyGap(), False), (TinyGap(), True), (TinyHead(), True)],
                         ids=["closed form", "closed form + flip", "autograd + flip"])
def test_autocast_stops_at_the_target_layer(model, flip):
    images = _images(3)
    dtypes = _Dtypes(model, ["conv2", "relu2", "fc" if isinstance(model, TinyGap) else "fc2"])
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            maps, scores = compute_cams(model, images, CLASSES, "gradcam", flip=flip)
            assert torch.is_autocast_enabled("cpu")  # the caller's autocast state is back
            activation, grads, raw = activations_and_gradients(model, images, CLASSES)
    finally:
        dtypes.remove()
    passes = 3 if flip else 2  # compute_cams' passes, then activations_and_gradients'
    assert dtypes.seen["conv2"] == [torch.bfloat16] * passes  # every pass, the flipped one too, is autocast
    assert set(dtypes.seen.pop("relu2")) == {torch.bfloat16}  # the layer's own output, then handed on as float32
    assert [d for name, seen in dtypes.seen.items() if name != "conv2" for d in seen] == [torch.float32] * passes
    assert activation.dtype == grads.dtype == raw.dtype == scores.dtype == maps.dtype == torch.float32
    if not flip:  # the map is the float32 formula on the float32 value of the bfloat16 activation
        from gradloc.cams.gradient import gradcam_map

        torch.testing.assert_close(maps, gradcam_map(activation, grads), rtol=0, atol=0)
        torch.testing.assert_close(scores, raw, rtol=0, atol=0)
