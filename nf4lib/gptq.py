"""``nf4lib.gptq``: calibrated NF4. GPTQ's error compensation on the NF4 grid
(``gptq_quantize``, in ``nf4lib.ops.gptq``) and a model transform that applies it layer by
layer and keeps it only where it beats plain rounding on held-out data (``calibrate``, in
``nf4lib.transforms.calibrate``). The results are ordinary NF4 records in bitsandbytes' layout."""

from .ops.gptq import gptq_quantize, input_hessian, layer_output_error
from .transforms.calibrate import Calibration, calibrate, default_text, text_batches

__all__ = ["gptq_quantize", "input_hessian", "layer_output_error", "calibrate", "Calibration", "text_batches",
           "default_text"]
