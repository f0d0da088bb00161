"""The kernel tier: Triton kernels run by the Triton interpreter on CPU.

TRITON_INTERPRET=1 must be set before triton is first imported (triton.language's own jit functions, tl.sum
among them, are built for the interpreter only then), so this tier runs in its own pytest process and sets it
here, before any test module imports megatron (which imports triton)."""
import os

os.environ["TRITON_INTERPRET"] = "1"
