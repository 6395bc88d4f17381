"""Derived seeds: an independent random stream per purpose, from the run seed."""

import hashlib


def derived_seed(seed, stream, index=0):
    """An independent 63-bit seed for one random stream (init, data order, noise, ...)."""
    digest = hashlib.sha256(f"{seed}:{stream}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1
