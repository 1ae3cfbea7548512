"""ProGAN building blocks: equalized-LR conv/linear (the conv differentiated twice by first-order kernels), pixel
norm, minibatch stddev, resampling.

No training logic lives here. References: Karras et al. 2018, "Progressive Growing of GANs for Improved
Quality, Stability, and Variation", section 4 (equalized learning rate, pixelwise feature vector
normalization) and section 3 (minibatch standard deviation).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

LRELU_SLOPE = 0.2
HE_GAIN = math.sqrt(2.0)


def same_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: int) -> torch.Tensor:
    """F.conv2d(x, weight, bias, padding=padding) (stride 1, an odd kernel, 'same' padding). Inside
    `differentiated_twice()`, with gradients on, it runs as `SameConv2d`, whose gradient, differentiated again (the
    R1 / R2 and WGAN-GP penalties), is differentiated by the library's first-order kernels. Elsewhere (the passes
    whose gradient is not differentiated again, no gradients, torch.compile, export, torch.func's transforms) it is
    plain F.conv2d, whose own double backward gives the same values more slowly.

    Under autocast the inputs are cast here, as F.conv2d's autocast would, so that the saved tensors and the
    gradients share the dtype the convolution ran in."""
    if (
        not _DIFFERENTIATED_TWICE.get()
        or not torch.is_grad_enabled()
        or torch.compiler.is_compiling()
        or _under_torch_func()
    ):
        return F.conv2d(x, weight, bias, padding=padding)
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    return SameConv2d.apply(x, weight, bias, padding)


_DIFFERENTIATED_TWICE = contextvars.ContextVar("differentiated_twice", default=False)


@contextlib.contextmanager
def differentiated_twice() -> Iterator[None]:
    """The forward passes inside build a graph whose gradient will be differentiated again (the exact penalties):
    pgan's convolutions run as `SameConv2d` there. Outside, they are F.conv2d, whose autograd node is C++:
    SameConv2d's Python cost 10-290 us more a convolution's forward and backward on 2 CPU cores, on passes that
    do not need it (experiments/throughput, "`same_conv2d` in the penalty passes only")."""
    token = _DIFFERENTIATED_TWICE.set(True)
    try:
        yield
    finally:
        _DIFFERENTIATED_TWICE.reset(token)


def _under_torch_func() -> bool:
    """Whether a torch.func transform (grad, vmap, jacrev, ...) is running: SameConv2d's form has no rule for them."""
    return torch._C._functorch.peek_interpreter_stack() is not None


class SameConv2d(torch.autograd.Function):
    """A stride-1 convolution whose gradients are built from ops with fast first-order kernels.

    PyTorch's own double backward of a convolution (`_convolution_double_backward`) computes the weight's part as
    one more convolution, of the incoming second-order gradient with the output's gradient, batch and channels
    swapped: a "kernel" the size of the feature map, in NCHW. On 2 AVX2 EPYC cores those ran at 1-85 GFLOP/s,
    where the weight-gradient kernel of the same convolution runs at 90-130 (experiments/throughput/op_times.py).

    Here the input's gradient is F.conv_transpose2d(grad, weight) when it is to be differentiated again, whose own
    backward is the library's first-order convolution backward: the same values, and the R1 penalty's pass on D
    1.2x faster at 64 px, 1.4x at 128-256 px (experiments/throughput, "The penalty's double backward").

    The backward asks the autograd engine which gradients this pass uses (`torch.autograd.grad(..., inputs=x)`
    uses no weight gradient), so a penalty's first differentiation computes no weight gradients at all."""

    # forward(ctx, ...), not forward() with setup_context: measured on the CPU, that form costs about 100 us more a call
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: int) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.padding, ctx.has_bias = padding, bias is not None
        return F.conv2d(x, weight, bias, padding=padding)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        used = [_gradient_used(ctx, i) for i in range(3)]
        if not torch.is_grad_enabled():  # an ordinary backward: the one call F.conv2d's own backward makes
            grad_x, grad_w, grad_b = _convolution_backward(grad, x, weight, ctx.padding, used, ctx.has_bias)
            return grad_x, grad_w, grad_b, None
        # create_graph: each gradient as an op whose backward is a first-order kernel (see the class)
        grad_x = F.conv_transpose2d(grad, weight, padding=ctx.padding) if used[0] else None
        grad_w = _convolution_backward(grad, x, weight, ctx.padding, [False, True, False])[1] if used[1] else None
        grad_b = grad.sum((0, 2, 3)) if used[2] else None
        return grad_x, grad_w, grad_b, None


def _convolution_backward(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, padding: int, mask: list[bool], bias: bool = False
) -> tuple:
    """aten's convolution backward of a stride-1 conv2d: (grad_x, grad_weight, grad_bias), None where `mask` is
    False."""
    sizes = [weight.shape[0]] if bias else None
    return torch.ops.aten.convolution_backward(
        grad, x, weight, sizes, [1, 1], [padding, padding], [1, 1], False, [0, 0], 1, mask
    )


def _gradient_used(ctx, index: int) -> bool:
    """Whether the backward pass now running uses the gradient of a Function's input `index`: it requires grad and
    the engine will run the node it flows to (under torch.autograd.grad, only nodes on a path to its `inputs`).
    A leaf's node counts as used: the engine cannot say for leaves under torch.autograd.grad."""
    if not ctx.needs_input_grad[index]:  # (next_functions has no entry for a None input)
        return False
    node = ctx.next_functions[index][0]
    return node is not None and (type(node).__name__ == "AccumulateGrad" or torch._C._will_engine_execute_node(node))


class EqualizedConv2d(nn.Module):
    """Conv2d whose weight is drawn from N(0, 1) and scaled at run time by He's constant gain / sqrt(fan_in).

    Scaling at run time (instead of at init) makes Adam's per-parameter step sizes equal for all layers,
    which is the point of the equalized learning rate.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, gain: float = HE_GAIN) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.scale = gain / math.sqrt(in_channels * kernel_size * kernel_size)
        self.padding = kernel_size // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Convolve with the run-time scaled weight ('same' padding)."""
        return same_conv2d(x, self.weight * self.scale, self.bias, self.padding)

    def extra_repr(self) -> str:
        out_c, in_c, k, _ = self.weight.shape
        return f"{in_c}, {out_c}, kernel_size={k}, scale={self.scale:.4g}"


class EqualizedLinear(nn.Module):
    """Linear layer with the equalized learning rate (weight ~ N(0, 1), scaled by gain / sqrt(fan_in))."""

    def __init__(self, in_features: int, out_features: int, gain: float = HE_GAIN) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features))
        self.scale = gain / math.sqrt(in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the run-time scaled affine map."""
        return F.linear(x, self.weight * self.scale, self.bias)

    def extra_repr(self) -> str:
        out_f, in_f = self.weight.shape
        return f"{in_f}, {out_f}, scale={self.scale:.4g}"


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """`x` in float32 if it is in a lower precision (bf16/fp16 under autocast); float64 stays float64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def pixel_norm(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Normalise the feature vector of every pixel (dim 1) to unit RMS (ProGAN eq. in section 4.2)."""
    return x * torch.rsqrt(x.pow(2).mean(dim=1, keepdim=True) + eps)


def minibatch_stddev(x: torch.Tensor, group_size: int = 4, eps: float = 1e-8) -> torch.Tensor:
    """Append one feature map: the stddev of each feature over groups of samples, averaged over C, H, W.

    The batch is split into groups of min(group_size, N) samples as in the official code: sample i belongs
    to group i % (N // group). N must be divisible by the group size.
    """
    n, c, h, w = x.shape
    group = min(group_size, n)
    if n % group != 0:
        raise ValueError(f"batch size {n} is not divisible by the minibatch-stddev group size {group}")
    y = at_least_fp32(x).reshape(group, -1, c, h, w)  # [G, M, C, H, W]; a bf16 variance would lose the signal
    y = (y - y.mean(dim=0)).pow(2).mean(dim=0)  # variance over the group: [M, C, H, W]
    y = (y + eps).sqrt().mean(dim=(1, 2, 3))  # [M]
    y = y.to(x.dtype).reshape(-1, 1, 1, 1).repeat(group, 1, h, w)  # back to [N, 1, H, W]
    return torch.cat([x, y], dim=1)


def upsample_2x(x: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour 2x upsampling (ProGAN's choice: it keeps the faded-in output exactly blockwise)."""
    return F.interpolate(x, scale_factor=2.0, mode="nearest")


def upsample_2x_bilinear(x: torch.Tensor) -> torch.Tensor:
    """Bilinear 2x upsampling (half-pixel centres, edges replicated): StyleGAN2's [1, 3, 3, 1] filter for its
    skip generator's images, which a coarse image passes through several times without turning blocky."""
    return F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)


def downsample_2x(x: torch.Tensor) -> torch.Tensor:
    """2x2 average pooling."""
    return F.avg_pool2d(x, kernel_size=2)


def lrelu(x: torch.Tensor) -> torch.Tensor:
    """LeakyReLU with ProGAN's slope 0.2."""
    return F.leaky_relu(x, LRELU_SLOPE)


def fade(old: torch.Tensor, new: torch.Tensor, alpha: float) -> torch.Tensor:
    """The fade-in blend: `old` at alpha = 0 (exactly), `new` at alpha = 1.

    Plain arithmetic rather than torch.lerp: under torch.compile a Python-number lerp weight is baked into the
    graph, one compilation per alpha value, while this stays one graph for the whole fade.
    """
    return old + (new - old) * alpha
