"""fastdiff benchmarks: the GPU suite (`python benchmarks/run.py`) and the pytest-benchmark
microbenchmarks (`pytest benchmarks --benchmark-only`)."""
