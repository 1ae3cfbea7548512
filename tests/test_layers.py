"""Tests for pgan.layers: equalized-LR layers, pixel norm, minibatch stddev and 2x resampling."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import pgan.layers
from pgan.layers import (
    HE_GAIN,
    EqualizedConv2d,
    EqualizedLinear,
    SameConv2d,
    differentiated_twice,
    downsample_2x,
    minibatch_stddev,
    pixel_norm,
    same_conv2d,
    upsample_2x,
)
from pgan.losses import gradient_penalty, make_loss, r1_penalty
from pgan.networks import Discriminator, Generator
from pgan.train.step import d_penalty_step, d_step

# ---------------------------------------------------------------- equalized learning rate


@pytest.mark.parametrize(
    "make, fan_in",
    [
        (lambda gain: EqualizedConv2d(128, 256, 3, gain=gain), 128 * 9),
        (lambda gain: EqualizedConv2d(512, 64, 1, gain=gain), 512),
        (lambda gain: EqualizedLinear(1024, 512, gain=gain), 1024),
    ],
    ids=["conv3x3", "conv1x1", "linear"],
)
@pytest.mark.parametrize("gain", [1.0, HE_GAIN, HE_GAIN / 4])
def test_equalized_layer_stores_unit_normal_weight_and_he_scale(make, fan_in, gain):
    """The stored weight is ~N(0, 1), the bias is zero and scale == gain / sqrt(fan_in)."""
    torch.manual_seed(0)
    layer = make(gain)
    w = layer.weight.detach()
    tol = 5 / math.sqrt(w.numel())  # five standard errors of the sample mean (and ~3.5 of the sample std)
    assert abs(w.mean().item()) < tol
    assert w.std().item() == pytest.approx(1.0, abs=tol)
    assert torch.count_nonzero(layer.bias) == 0
    assert layer.scale == pytest.approx(gain / math.sqrt(fan_in), rel=1e-12)


@pytest.mark.parametrize("in_c, out_c, k", [(3, 5, 1), (4, 6, 3), (2, 3, 5)])
def test_equalized_conv_forward_matches_f_conv2d_with_scaled_weight(in_c, out_c, k):
    """forward == F.conv2d with weight * gain / sqrt(in_c * k * k), the bias and 'same' padding."""
    torch.manual_seed(1)
    gain = 1.7
    layer = EqualizedConv2d(in_c, out_c, k, gain=gain).double()
    with torch.no_grad():
        layer.bias.normal_()  # a non-zero bias, so a dropped bias would show
    x = torch.randn(2, in_c, 7, 6, dtype=torch.float64)
    w = layer.weight.detach() * (gain / math.sqrt(in_c * k * k))
    expected = F.conv2d(x, w, layer.bias.detach(), padding=(k - 1) // 2)
    out = layer(x)
    assert out.shape == (2, out_c, 7, 6)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- the convolution, differentiated twice


@pytest.mark.parametrize("k, bias", [(1, True), (3, True), (3, False), (5, True)])
def test_same_conv2d_first_and_second_derivatives_match_finite_differences(k, bias):
    """gradcheck and gradgradcheck (float64): every first and second derivative w.r.t. input, weight and bias."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, k, k, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True) if bias else None
    inputs = (x, w, b) if bias else (x, w)

    def conv(x, w, b=None):
        with differentiated_twice():
            out = same_conv2d(x, w, b, k // 2)
        assert type(out.grad_fn).__name__ == "SameConv2dBackward"
        return out

    assert torch.autograd.gradcheck(conv, inputs)
    assert torch.autograd.gradgradcheck(conv, inputs)


def _f_conv2d(x, w, b, padding):
    """PyTorch's own convolution, in same_conv2d's place: the reference the penalties' gradients are held to."""
    return F.conv2d(x, w, b, padding=padding)


def _penalty_gradients(D, reals, fakes, penalty):
    """Every parameter gradient of `penalty` on D (R1 on reals, or WGAN-GP on interpolates), and the scores; D's
    pass in `differentiated_twice`, as the trainer's penalty passes."""
    D.zero_grad(set_to_none=True)
    if penalty == "r1":
        x = reals.detach().requires_grad_(True)
    else:
        eps = torch.linspace(0.1, 0.9, reals.shape[0], dtype=reals.dtype).view(-1, 1, 1, 1)
        x = (eps * reals + (1 - eps) * fakes).requires_grad_(True)
    with differentiated_twice():
        scores = D(x, 0.6)
    objective = (r1_penalty(scores, x, 1.0) if penalty == "r1" else gradient_penalty(scores, x)) + scores.mean()
    objective.backward()
    return scores.detach(), {name: p.grad.clone() for name, p in D.named_parameters()}


@pytest.mark.parametrize("penalty", ["r1", "wgan_gp"])
def test_penalty_gradients_through_same_conv2d_equal_those_through_f_conv2d(monkeypatch, penalty):
    """A discriminator's penalty gradients (float64, in a fade-in, every parameter) are those PyTorch's own
    convolution gives, to rounding: the faster double backward computes the same derivative."""
    torch.manual_seed(0)
    D = Discriminator(16, fmap_base=32, fmap_max=8, fmap_min=4).double()
    reals, fakes = torch.randn(2, 4, 3, 16, 16, dtype=torch.float64)
    ours = _penalty_gradients(D, reals, fakes, penalty)
    monkeypatch.setattr(pgan.layers, "same_conv2d", _f_conv2d)
    reference = _penalty_gradients(D, reals, fakes, penalty)
    torch.testing.assert_close(ours[0], reference[0], rtol=1e-12, atol=1e-12)
    assert ours[1].keys() == reference[1].keys()
    for name in ours[1]:
        torch.testing.assert_close(ours[1][name], reference[1][name], rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize(
    ("loss", "step", "passes"),
    [
        ("r1", "d_step", 1),
        ("r1_r2", "d_step", 2),
        ("r1_r2", "d_step without the penalties", 0),
        ("r1_r2", "d_penalty_step", 2),
        ("wgan_gp", "d_step", 1),
        ("approx", "d_step", 0),
        ("approx", "d_penalty_step", 0),
    ],
)
def test_the_d_step_runs_same_conv2d_in_its_exact_penalty_passes_only(monkeypatch, loss, step, passes):
    """The D step's passes differentiated twice (R1 on the reals, R2 on the fakes, WGAN-GP on the interpolates;
    also lazy regularisation's own step) run SameConv2d; G's pass, D's others, a lazy step without the penalties
    and the approximate penalties run F.conv2d."""
    losses = {
        "r1": make_loss("rpgan", r1_gamma=1.0, r2_gamma=0.0),
        "r1_r2": make_loss("rpgan", r1_gamma=1.0, r2_gamma=1.0),
        "wgan_gp": make_loss("wgan_gp"),
        "approx": make_loss("rpgan", r1_gamma=1.0, r2_gamma=1.0, penalty_mode="approx"),
    }
    torch.manual_seed(0)
    G = Generator(8, latent_dim=16, fmap_base=64, fmap_max=16, fmap_min=4)
    D = Discriminator(8, fmap_base=64, fmap_max=16, fmap_min=4)
    opt = torch.optim.Adam(D.parameters(), lr=1e-3, betas=(0.0, 0.99), fused=True)
    reals, z = torch.randn(4, 3, 8, 8), torch.randn(4, 16)
    calls = []
    apply = SameConv2d.apply
    monkeypatch.setattr(SameConv2d, "apply", lambda *args: calls.append(args[0].shape) or apply(*args))
    with differentiated_twice():
        D(reals, 0.5)
    one_pass = len(calls)
    assert one_pass == sum(isinstance(m, EqualizedConv2d) for m in D.modules())  # in a fade, both fromRGBs too
    calls.clear()
    if step == "d_penalty_step":
        d_penalty_step(D, opt, losses[loss], reals, G(z, 0.5).detach(), 0.5)
    else:
        d_step(G, D, opt, losses[loss], reals, z, 0.5, with_penalty=step == "d_step")
    assert len(calls) == passes * one_pass


class _Convolutions(TorchDispatchMode):
    """The aten convolution calls made under it: forward kernel sizes, and the masks of the backward calls."""

    def __init__(self) -> None:
        super().__init__()
        self.forward_kernels: list[tuple[int, int]] = []
        self.backward_masks: list[list[bool]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.convolution.default:
            self.forward_kernels.append(tuple(args[1].shape[-2:]))
        elif func is torch.ops.aten.convolution_backward.default:
            self.backward_masks.append(list(args[-1]))
        return func(*args, **(kwargs or {}))


def test_penalty_runs_no_image_sized_kernel_and_no_unused_weight_gradient():
    """The R1 penalty's first differentiation (w.r.t. the images only) computes no weight gradient, and its
    backward convolves only with the layers' own 1x1 and 3x3 kernels. PyTorch's double backward of F.conv2d
    computes the weight's part as a convolution whose kernel is the feature map (16x16 here), which is slow."""
    torch.manual_seed(0)
    D = Discriminator(16, fmap_base=32, fmap_max=8, fmap_min=4)
    x = torch.randn(4, 3, 16, 16, requires_grad=True)
    with differentiated_twice():
        scores = D(x, 1.0)
    with _Convolutions() as first:
        (grad,) = torch.autograd.grad(scores.sum(), x, create_graph=True)
    assert first.backward_masks == []  # the input gradients are transposed convolutions: no weight gradient
    assert first.forward_kernels and set(first.forward_kernels) <= {(1, 1), (3, 3)}
    with _Convolutions() as second:
        grad.square().sum().backward()
    assert second.backward_masks and set(second.forward_kernels) <= {(1, 1), (3, 3)}
    used = [p for name, p in D.named_parameters() if name.endswith("weight") and not name.startswith("from_rgb.8")]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in used)  # the penalty reaches every layer


def test_same_conv2d_under_bf16_autocast_runs_in_bf16_and_tracks_fp32_gradients(monkeypatch):
    """Under CPU bf16 autocast the convolution runs in bf16 (as F.conv2d's autocast would) and the R1 penalty's
    gradients stay within bf16 rounding of the same penalty through F.conv2d."""
    torch.manual_seed(0)
    D = Discriminator(16, fmap_base=32, fmap_max=8, fmap_min=4)
    reals, fakes = torch.randn(2, 4, 3, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert D.blocks["16"].conv1(torch.randn(1, 4, 4, 4)).dtype == torch.bfloat16
        ours = _penalty_gradients(D, reals, fakes, "r1")
        monkeypatch.setattr(pgan.layers, "same_conv2d", _f_conv2d)
        reference = _penalty_gradients(D, reals, fakes, "r1")
    for name, grad in ours[1].items():
        expected = reference[1][name]
        assert grad.dtype == torch.float32
        torch.testing.assert_close(grad, expected, rtol=0.05, atol=0.05 * expected.abs().max())


def test_same_conv2d_under_torch_func_transforms_is_f_conv2d():
    """torch.func.grad and vmap through a conv layer work (SameConv2d's form has no functorch rule, so F.conv2d runs)
    and give autograd's gradient."""
    torch.manual_seed(0)
    layer = EqualizedConv2d(2, 3, 3).double()
    x = torch.randn(4, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    with differentiated_twice():
        per_sample = torch.func.vmap(torch.func.grad(lambda xi: layer(xi[None]).square().sum()))(x)
    (expected,) = torch.autograd.grad(layer(x).square().sum(), x)
    torch.testing.assert_close(per_sample, expected, rtol=1e-12, atol=1e-12)


def test_same_conv2d_is_plain_f_conv2d_outside_passes_differentiated_twice_and_without_gradients():
    """Outside `differentiated_twice` (G, D's passes for the loss alone) and under no_grad (sampling, evaluation,
    export) there is no autograd Function in the way."""
    layer = EqualizedConv2d(3, 4, 3)
    assert type(layer(torch.randn(1, 3, 5, 5)).grad_fn).__name__ == "ConvolutionBackward0"
    with differentiated_twice():
        assert type(layer(torch.randn(1, 3, 5, 5)).grad_fn).__name__ == "SameConv2dBackward"
        with torch.no_grad():
            out = layer(torch.randn(1, 3, 5, 5))
    assert out.grad_fn is None and out.shape == (1, 4, 5, 5)
    assert type(layer(torch.randn(1, 3, 5, 5)).grad_fn).__name__ == "ConvolutionBackward0"


@pytest.mark.parametrize("in_f, out_f", [(1, 1), (7, 3), (64, 10)])
def test_equalized_linear_forward_matches_matmul_with_scaled_weight(in_f, out_f):
    """forward == x @ (weight * gain / sqrt(in_features)).T + bias."""
    torch.manual_seed(2)
    gain = 0.6
    layer = EqualizedLinear(in_f, out_f, gain=gain).double()
    with torch.no_grad():
        layer.bias.normal_()
    x = torch.randn(5, in_f, dtype=torch.float64)
    expected = x @ (layer.weight.detach() * gain / math.sqrt(in_f)).T + layer.bias.detach()
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)


def test_equalized_linear_preserves_unit_variance_with_gain_one():
    """With N(0, 1) input and gain 1 a wide layer's output has std ~1: the point of He's constant."""
    torch.manual_seed(3)
    layer = EqualizedLinear(2048, 1024, gain=1.0)
    x = torch.randn(512, 2048)
    with torch.no_grad():
        y = layer(x)
    assert y.std().item() == pytest.approx(1.0, abs=0.03)
    assert abs(y.mean().item()) < 0.03


def test_equalized_conv_preserves_unit_variance_with_gain_one():
    """The same for a 3x3 conv away from the zero-padded border."""
    torch.manual_seed(4)
    layer = EqualizedConv2d(256, 128, 3, gain=1.0)
    x = torch.randn(8, 256, 10, 10)
    with torch.no_grad():
        y = layer(x)[:, :, 1:-1, 1:-1]
    assert y.std().item() == pytest.approx(1.0, abs=0.03)


# ---------------------------------------------------------------- pixel norm


def test_pixel_norm_gives_unit_mean_square_per_pixel():
    """After pixel_norm every pixel's feature vector has mean square 1 over the channels."""
    torch.manual_seed(5)
    x = torch.randn(3, 7, 5, 4, dtype=torch.float64) * torch.rand(3, 1, 5, 4, dtype=torch.float64) * 10
    y = pixel_norm(x)
    ms = (y**2).sum(dim=1) / x.shape[1]
    torch.testing.assert_close(ms, torch.ones_like(ms), rtol=1e-6, atol=0)
    # Only the length changes: each pixel's vector is a positive multiple of the input one.
    ratio = y / x
    torch.testing.assert_close(ratio, ratio[:, :1].expand_as(ratio), rtol=1e-10, atol=0)
    assert (ratio > 0).all()


@pytest.mark.parametrize("c", [0.1, 0.5, 3.0, 1e3])
def test_pixel_norm_is_scale_invariant(c):
    """pixel_norm(c * x) == pixel_norm(x) for c > 0 (up to the 1e-8 epsilon)."""
    torch.manual_seed(6)
    x = torch.randn(2, 16, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(pixel_norm(c * x), pixel_norm(x), rtol=1e-5, atol=1e-8)


# ---------------------------------------------------------------- minibatch stddev


def reference_mbstd(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """The stddev channel written out group by group (sample i is in group i % (N // G)), in float64."""
    n, _, h, w = x.shape
    g = min(group_size, n)
    m = n // g
    x = x.double()
    out = torch.empty(n, 1, h, w, dtype=torch.float64)
    for j in range(m):
        members = [i for i in range(n) if i % m == j]
        assert len(members) == g
        xs = x[members]
        var = ((xs - xs.mean(dim=0, keepdim=True)) ** 2).sum(dim=0) / g  # population variance
        value = torch.sqrt(var + 1e-8).mean()
        out[members] = value
    return out


@pytest.mark.parametrize("n, group_size", [(8, 4), (8, 2), (4, 4), (6, 3), (6, 2), (5, 1), (12, 4), (3, 4), (2, 8)])
def test_minibatch_stddev_matches_per_group_reference(n, group_size):
    """Shape [N, C+1, H, W], first C channels unchanged, new channel equal to the per-group reference."""
    torch.manual_seed(7)
    # Distinct per-sample scales, so assigning samples to the wrong group changes the result.
    x = torch.randn(n, 3, 4, 5) * torch.arange(1, n + 1, dtype=torch.float32).reshape(-1, 1, 1, 1)
    out = minibatch_stddev(x, group_size)
    assert out.shape == (n, 4, 4, 5)
    assert out.dtype == x.dtype
    assert torch.equal(out[:, :3], x)
    expected = reference_mbstd(x, group_size).float()
    torch.testing.assert_close(out[:, 3:], expected, rtol=1e-5, atol=1e-6)


def test_minibatch_stddev_channel_is_constant_over_space_and_uses_interleaved_groups():
    """For N=4, G=2 samples {0, 2} and {1, 3} share a value: i % (N // G), not contiguous blocks."""
    x = torch.zeros(4, 1, 2, 2)
    x[0] = 1.0  # group {0, 2}: values 1 and 0 -> std 0.5
    x[1] = 3.0
    x[3] = -3.0  # group {1, 3}: values 3 and -3 -> std 3
    out = minibatch_stddev(x, group_size=2)[:, 1]
    expected = torch.tensor([0.5, 3.0, 0.5, 3.0]).reshape(4, 1, 1).expand(4, 2, 2)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n, group_size", [(6, 4), (5, 2), (7, 3)])
def test_minibatch_stddev_rejects_indivisible_batch(n, group_size):
    """A batch that is not a multiple of the group size raises ValueError."""
    with pytest.raises(ValueError, match="divisible"):
        minibatch_stddev(torch.randn(n, 2, 4, 4), group_size)


def test_minibatch_stddev_keeps_float64_precision():
    """A float64 input gets a float64-accurate stddev channel (it must not be squeezed through float32)."""
    torch.manual_seed(8)
    x = torch.randn(8, 3, 4, 4, dtype=torch.float64)
    out = minibatch_stddev(x, 4)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out[:, 3:], reference_mbstd(x, 4), rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------- resampling


@pytest.mark.parametrize("shape", [(1, 1, 4, 4), (2, 3, 8, 6), (3, 5, 16, 16)])
def test_upsample_and_downsample_shapes_and_values(shape):
    """upsample_2x doubles H, W by repeating pixels; downsample_2x halves them by 2x2 means."""
    torch.manual_seed(9)
    n, c, h, w = shape
    x = torch.randn(shape, dtype=torch.float64)
    up = upsample_2x(x)
    assert up.shape == (n, c, 2 * h, 2 * w)
    assert torch.equal(up, x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3))
    down = downsample_2x(x)
    assert down.shape == (n, c, h // 2, w // 2)
    expected = x.reshape(n, c, h // 2, 2, w // 2, 2).mean(dim=(3, 5))
    torch.testing.assert_close(down, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_downsample_inverts_upsample(dtype):
    """downsample_2x(upsample_2x(x)) == x."""
    torch.manual_seed(10)
    x = torch.randn(2, 3, 8, 8, dtype=dtype)
    torch.testing.assert_close(downsample_2x(upsample_2x(x)), x, rtol=0, atol=4 * torch.finfo(dtype).eps)
