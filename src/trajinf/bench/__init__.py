"""Benchmarks behind ``trajinf bench``: the environment benchmark (``env_bench``), speed and
scaling (``perf``) and the peer libraries (``peers``)."""
