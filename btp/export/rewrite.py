"""Export-time graph rewrites: the same function, fewer FLOPs in model.onnx.

``split_concat_conv(model)`` is a context manager around the trace. Inside it every
``MiniPointNet`` of ``model`` computes

    second_conv[0..1](concat[expand(max_K f), f])  =  BN(W_g @ max_K f  +  W_x @ f  +  b)
                                                   =  W'_x @ f + (W'_g @ max_K f + b')

(W = [W_g | W_x] split along its input channels, the eval-mode BatchNorm folded into W', b'), so
the global half runs once per patch instead of once per point: -2*G*K*p1*p2 FLOPs per scan and no
Expand/Concat in the graph (benchmarks/results/cpu-findings-2026-11-25.md, proposal 2). The split convs stay in the
``second_conv/second_conv.0`` scope (``/inner/point_encoder/encoder/...`` in model.onnx), which
TensorRT's precision policy (btp.runtime.tensorrt) treats as a heavy FP16 layer like before.

The swap is temporary: on exit the modules get their own ``forward`` and children back, so the
PyTorch model, its state dict and the exporter's parity reference (the *original* forward) are
unchanged. Exact algebra; float rounding aside (the exporter's parity check, 1e-4, covers it).
"""
from __future__ import annotations

from contextlib import contextmanager


def _split_conv_module(conv, bn):
    """A module holding the BN-folded halves of ``conv`` (Conv1d 2*p1 -> p2, kernel 1) + ``bn``."""
    import torch
    from torch import nn

    class SplitConcatConv(nn.Module):
        """(local [BG, p1, K], glob [BG, p1, 1]) -> BN(conv(concat[expand(glob), local])) [BG, p2, K]."""

        def __init__(self):
            super().__init__()
            with torch.no_grad():
                w = conv.weight.detach()  # [p2, 2*p1, 1]
                b = conv.bias.detach() if conv.bias is not None else torch.zeros(w.shape[0], dtype=w.dtype)
                scale = bn.weight.detach() / torch.sqrt(bn.running_var.detach() + bn.eps)  # [p2]
                shift = bn.bias.detach() - bn.running_mean.detach() * scale
                p1 = w.shape[1] // 2
                self.register_buffer("w_global", (w[:, :p1] * scale[:, None, None]).contiguous())
                self.register_buffer("w_local", (w[:, p1:] * scale[:, None, None]).contiguous())
                self.register_buffer("bias", (b * scale + shift).contiguous())

        def forward(self, local, glob):
            import torch.nn.functional as F

            return F.conv1d(local, self.w_local, self.bias) + F.conv1d(glob, self.w_global)

    return SplitConcatConv()


def _split_forward(self, neighborhood):
    """MiniPointNet.forward with the concat conv split (see the module docstring)."""
    b, g, k, c = neighborhood.shape
    x = neighborhood.reshape(b * g, k, c).transpose(1, 2)  # [BG, C, K]
    feat = self.first_conv(x)  # [BG, p1, K]
    feat_global = feat.max(dim=2, keepdim=True).values  # [BG, p1, 1]
    split = self.second_conv[0]  # SplitConcatConv while the swap is on
    y = split(feat, feat_global)  # conv + BN, [BG, p2, K]
    for layer in list(self.second_conv)[2:]:  # ReLU, Conv1d
        y = layer(y)
    return y.max(dim=2).values.reshape(b, g, -1)


def _splittable(module) -> bool:
    from torch import nn

    from btp.model.pointbert import MiniPointNet

    if not isinstance(module, MiniPointNet) or len(module.second_conv) != 4:
        return False
    conv, bn = module.second_conv[0], module.second_conv[1]
    return (isinstance(conv, nn.Conv1d) and isinstance(bn, nn.BatchNorm1d) and conv.kernel_size == (1,)
            and conv.groups == 1 and conv.in_channels % 2 == 0 and bn.track_running_stats
            and bn.running_mean is not None and bn.affine and not bn.training)


@contextmanager
def split_concat_conv(model):
    """Within the block, every (eval-mode) MiniPointNet of ``model`` runs the split form; yields how
    many were swapped. Everything is restored on exit, also on an exception."""
    import types

    swapped = []
    try:
        for module in list(model.modules()):
            if _splittable(module):
                conv, bn = module.second_conv[0], module.second_conv[1]
                module.second_conv[0] = _split_conv_module(conv, bn)
                module.forward = types.MethodType(_split_forward, module)
                swapped.append((module, conv))
        yield len(swapped)
    finally:
        for module, conv in swapped:
            module.second_conv[0] = conv
            del module.forward
