"""CUDA C sources for dpm's GPU path (loaded by CuPy at run time) and the host shim for CPU tests."""
