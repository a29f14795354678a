"""The scale harness of issue 14: many peer processes in network namespaces behind a delaying relay
(`python -m benchmarks.scale.run`; see run.py)."""
