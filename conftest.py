"""pytest setup: without a GPU, Triton kernels run on CPU tensors through Triton's interpreter.
Triton reads TRITON_INTERPRET when a kernel is defined, so it is set before any test imports one."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
