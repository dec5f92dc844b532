"""Benchmarks and their report: ranking quality, learning from biased clicks, training throughput, serving.

Each benchmark writes a JSON result under ``benchmarks/results/``; ``benchmarks.report`` renders BENCHMARKS.md
and the PNG plots from those files only, so every number in the report comes from a run.
"""
