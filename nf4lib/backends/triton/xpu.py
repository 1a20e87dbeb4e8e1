"""Intel GPUs (XPU, native ``torch.xpu``, PyTorch >= 2.5): the same Triton kernel family as
CUDA, registered on the XPU dispatch key for all three ops. Intel Extension for PyTorch
is not used."""

from . import kernels

kernels.register("xpu")
