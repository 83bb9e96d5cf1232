"""Benchmarks of Postback beside their physical limits, measured in the same run.

`python -m bench` (or `make bench`) starts the embedded stack the way `postback up` does, drives it
with k6 (a load generator that is not the code under test), measures the raw broker, database and
HTTP client rates on the same machine, and writes `bench/results/<timestamp>.{json,md,png}`.
"""
