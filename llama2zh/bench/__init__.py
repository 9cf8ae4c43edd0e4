"""`make bench`: the speed benchmarks, one module per part (`python -m llama2zh.bench.decode`, ...)."""
