"""Benchmarks: qmpmux against a direct QEMU monitor, measured side by side in one run."""
