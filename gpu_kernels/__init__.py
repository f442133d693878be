"""gpu_kernels package."""
