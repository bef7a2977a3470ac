"""Benchmarks of the sanitizer: the poisoning harness (``python -m benchmarks.poisoning``) and reports."""
