"""Counter-based pseudo-random numbers: a value per (key, key, ...) tuple, with no RNG state.

Used where the number of draws would otherwise depend on the action (pool refreshes, which
users' scorers are queried): a persistent per-(user, item) model error, and pseudo-random source
sampling keyed by (user, refresh). This keeps common random numbers across policies exact.
"""

from __future__ import annotations

import numpy as np

from rankers.types import Array

_M1 = np.uint32(0x9E3779B1)
_M2 = np.uint32(0x85EBCA77)
_M3 = np.uint32(0xC2B2AE3D)


def hash_u32(*keys: Array | int) -> Array:
    """Mixes integer arrays (broadcast together) into well-spread uint32 values (murmur3 finaliser)."""
    with np.errstate(over="ignore"):
        h = np.uint32(0x27D4EB2F)
        for i, k in enumerate(keys):
            k = np.asarray(k).astype(np.uint32)
            h = (h ^ (k * _M1 + np.uint32(i + 1) * _M3)) * _M2
            h = h ^ (h >> np.uint32(15))
        h = h ^ (h >> np.uint32(16))
        h = h * _M2
        h = h ^ (h >> np.uint32(13))
        h = h * _M3
        h = h ^ (h >> np.uint32(16))
    return h


def hash_uniform(*keys: Array | int) -> Array:
    """float32 in [0, 1) per key tuple."""
    return (hash_u32(*keys) >> np.uint32(8)).astype(np.float32) * np.float32(1.0 / (1 << 24))


def hash_normal(*keys: Array | int) -> Array:
    """Approximately standard normal float32 per key tuple (sum of 4 hashed uniforms, rescaled)."""
    s = hash_uniform(*keys, 1) + hash_uniform(*keys, 2) + hash_uniform(*keys, 3) + hash_uniform(*keys, 4)
    return ((s - 2.0) * np.float32(np.sqrt(3.0))).astype(np.float32)
