"""edge's benchmarks: `make bench` (bench.py) and the long soak (soak.py)."""
