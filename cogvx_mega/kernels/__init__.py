"""Custom kernels (Triton/CUDA), each with a torch reference next to it."""
