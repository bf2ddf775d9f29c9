"""DistDiff benchmarks: each module runs with `python -m bench.<name>`, prints a ratio table last and writes JSON.

See bench/README.md for the list. Nothing here runs at import.
"""
