"""Benchmarks, not tests: run by hand (`python -m tests.bench.bench_scrape`), never by pytest."""
