"""Tools around the pipeline: benchmarks, curves, the GRPO signal probe, the model builders tests
and benchmarks use, the GPU check. Run from the repository root: python -m tools.bench."""
