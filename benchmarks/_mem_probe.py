"""Child process for benchmarks: peak extra memory of one quantize call, printed in MiB.

Run with MALLOC_MMAP_THRESHOLD_=65536 so every large buffer is its own mapping and is
returned to the OS when freed: resident memory then tracks live tensors, and the
kernel's peak counter (VmHWM, reset through /proc/self/clear_refs) is the true peak.
"""

import sys

import torch

from _util import peak_extra_mib, torchao_nf4

torch.manual_seed(0)
w = torch.randn(4096, 4096, dtype=torch.bfloat16)
lib = sys.argv[1]
if lib == "nf4lib":
    import nf4lib

    nf4lib.quantize(w)  # compile the fused kernel first: its memory is not quantize's
    fn = lambda: nf4lib.quantize(w)  # noqa: E731
elif lib == "bitsandbytes":
    import bitsandbytes.functional as bnb_f

    bnb_f.quantize_4bit(w, blocksize=64, quant_type="nf4")
    fn = lambda: bnb_f.quantize_4bit(w, blocksize=64, quant_type="nf4")  # noqa: E731
else:
    to_nf4 = torchao_nf4()[0]
    to_nf4(w, block_size=64, scaler_block_size=256)
    fn = lambda: to_nf4(w, block_size=64, scaler_block_size=256)  # noqa: E731
print(peak_extra_mib(fn))
