"""Server-step operations on one flat parameter buffer.

federated/ calls these functions only. They dispatch to Triton kernels when the tensors are on CUDA (or when
FEDLLM_FORCE_TRITON=1, which the tests use with TRITON_INTERPRET=1 on the CPU) and to the PyTorch twins in
kernels/reference.py otherwise.
"""
from kernels.reference import SERVER_RULES, scaffold_control_update, server_update, weighted_sum  # noqa: F401
