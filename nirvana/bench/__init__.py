"""Benchmarks: each measures ratios side by side in one run and writes JSON + a markdown report."""
