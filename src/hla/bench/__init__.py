"""Benchmarks that users can rerun: ``hla bench`` (the efficiency claims of Kimi Linear vs all-MLA)."""
