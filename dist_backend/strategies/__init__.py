"""Parallel strategies applied to a loaded model on a rank (context parallel, ...).

Importing this package imports nothing heavy: each strategy module imports torch and diffusers inside the functions
that need them, so the host can import the engine without paying for (or patching) either.
"""
