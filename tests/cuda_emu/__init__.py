"""CPU emulator of the CUDA C++ kernels in csrc/ (tests only; see README.md)."""
