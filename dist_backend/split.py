"""Contiguous splitting of work, the same way on the host and on every rank.

Like accelerate's `PartialState.split_between_processes`: block i gets n // k items, and the first n % k blocks
one more, so results gathered block by block come back in input order.
"""

from __future__ import annotations


def block_bounds(n: int, k: int, index: int) -> tuple[int, int]:
    """[start, stop) of block `index` when n items are split into k contiguous blocks."""
    if k < 1 or not 0 <= index < k or n < 0:
        raise ValueError(f"cannot take block {index} of {n} items split {k} ways")
    base, extra = divmod(n, k)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


def blocks(n: int, k: int) -> list[tuple[int, int]]:
    return [block_bounds(n, k, i) for i in range(k)]


def image_items(num_prompts: int, images_per_prompt: int, seed: int) -> list[tuple[int, int]]:
    """(prompt index, seed) for every image, prompt-major: image j = p × K + k is made with seed + j."""
    return [(p, seed + p * images_per_prompt + k) for p in range(num_prompts) for k in range(images_per_prompt)]
