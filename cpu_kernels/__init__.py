"""cpu_kernels package."""
