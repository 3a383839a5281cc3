"""CUDA C++ fallback kernels (sources only; JIT-built by fastpbn._cuda_ext)."""
