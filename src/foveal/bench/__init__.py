"""Benchmarks: ``foveal bench speed`` (time, memory, useful FLOP/s against the same run's matmul rate)."""
