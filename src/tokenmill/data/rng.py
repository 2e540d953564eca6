"""A stateless random number generator whose state is a counter, for exactly resumable data order."""

from __future__ import annotations

MASK64 = (1 << 64) - 1


def splitmix64(x: int) -> int:
    """SplitMix64 finaliser (Steele, Lea & Flood 2014, "Fast splittable pseudorandom number generators")."""
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def uniform(seed: int, stream: int, counter: int) -> float:
    """A reproducible number in [0, 1) for (seed, stream, counter): a stateless RNG whose state is the counter."""
    h = splitmix64(splitmix64(splitmix64(seed & MASK64) ^ (stream & MASK64)) ^ (counter & MASK64))
    return (h >> 11) / float(1 << 53)
