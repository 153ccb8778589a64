"""Counter-based pseudo-random numbers: a value per (key, key, ...) tuple, with no RNG state.

Used where the number of draws would otherwise depend on the action (pool refreshes, which
users' scorers are queried): a persistent per-(user, item) model error, and pseudo-random source
sampling keyed by (user, refresh). This keeps common random numbers across policies exact.

The mixing works in place on one buffer per call; :func:`hash_normal` takes its four uniforms from
one 64-bit hash of the key tuple, so a normal costs about one hash.
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np

from rankers.types import Array

_M1 = np.uint32(0x9E3779B1)
_M2 = np.uint32(0x85EBCA77)
_M3 = np.uint32(0xC2B2AE3D)
_SEED = np.uint32(0x27D4EB2F)


def _mix(h: Array | np.uint32, k: Array | int, i: int) -> Array:
    """One absorption round: ``h = (h ^ (k * M1 + (i + 1) * M3)) * M2; h ^= h >> 15`` (new array)."""
    k = np.asarray(k).astype(np.uint32)
    t = k * _M1
    t += np.uint32(i + 1) * _M3
    t = np.bitwise_xor(t, h)  # broadcasts to the joint shape
    t *= _M2
    t ^= t >> np.uint32(15)
    return t


def _finalise(h: Array) -> Array:
    """murmur3 finaliser, in place on the uint32 array ``h``."""
    h ^= h >> np.uint32(16)
    h *= _M2
    h ^= h >> np.uint32(13)
    h *= _M3
    h ^= h >> np.uint32(16)
    return h


def _prefix(keys: tuple[Array | int, ...]) -> Array:
    h: Array = np.asarray(_SEED)
    for i, k in enumerate(keys):
        h = _mix(h, k, i)
    return h


def hash_u32(*keys: Array | int) -> Array:
    """Mixes integer arrays (broadcast together) into well-spread uint32 values (murmur3 finaliser)."""
    with np.errstate(over="ignore"):
        return _finalise(_prefix(keys))


def hash_uniform(*keys: Array | int) -> Array:
    """float32 in [0, 1) per key tuple."""
    u = (hash_u32(*keys) >> np.uint32(8)).astype(np.float32)
    u *= np.float32(1.0 / (1 << 24))
    return u


_S1 = np.uint64(0xBF58476D1CE4E5B9)
_S2 = np.uint64(0x94D049BB133111EB)
_GOLD = np.uint64(0x9E3779B97F4A7C15)
_LOW16 = np.uint64(0xFFFF)


def hash_normal(*keys: Array | int) -> Array:
    """Approximately standard normal float32 per key tuple: the sum of four 16-bit uniforms taken
    from one 64-bit hash (the key tuple's uint32 hash widened by the splitmix64 finaliser),
    recentred and scaled to unit variance (Irwin-Hall, n = 4)."""
    with np.errstate(over="ignore"):
        z = _prefix(keys).astype(np.uint64)
        z += _GOLD
        z ^= z >> np.uint64(30)
        z *= _S1
        z ^= z >> np.uint64(27)
        z *= _S2
        z ^= z >> np.uint64(31)
        s = z & _LOW16
        for sh in (16, 32):
            s += (z >> np.uint64(sh)) & _LOW16
        s += z >> np.uint64(48)
    out = s.astype(np.float32)
    # each 16-bit uniform is (c + 0.5) / 2**16; their sum minus 2 has variance 4/12
    out *= np.float32(np.sqrt(3.0) / 65536.0)
    out -= np.float32((2.0 - 2.0 / 65536.0) * np.sqrt(3.0))
    return out


# ---------------------------------------------------------------- compiled: one key tuple at a time, the same bits
_MASK32 = 0xFFFFFFFF


@numba.njit(cache=True, nogil=True)
def hash_absorb(h: int, k: int | np.integer[Any], i: int) -> int:
    """One round of :mod:`rankers.hashing`'s uint32 mixing, compiled: ``(h ^ (k * M1 + (i + 1) * M3)) * M2``, then
    ``h ^= h >> 15`` (32-bit arithmetic, wrapping), absorbing the ``i``-th key ``k`` of a key tuple into ``h``
    (the tuple's hash starts at ``0x27D4EB2F``)."""
    t = ((k & _MASK32) * 0x9E3779B1 + (((i + 1) * 0xC2B2AE3D) & _MASK32)) & _MASK32
    t = ((t ^ h) * 0x85EBCA77) & _MASK32
    return t ^ (t >> 15)


@numba.njit(cache=True, nogil=True)
def hash_normal_of(h: int) -> np.float32:
    """:func:`rankers.hashing.hash_normal` of a key tuple whose absorbed hash is ``h``: the splitmix64 finaliser,
    four 16-bit uniforms summed (Irwin-Hall, n = 4), recentred and scaled in float32."""
    scale = np.float32(np.sqrt(3.0) / 65536.0)
    shift = np.float32((2.0 - 2.0 / 65536.0) * np.sqrt(3.0))
    z = np.uint64(h)
    z += np.uint64(0x9E3779B97F4A7C15)  # splitmix64 finaliser (wrapping 64-bit)
    z ^= z >> np.uint64(30)
    z *= np.uint64(0xBF58476D1CE4E5B9)
    z ^= z >> np.uint64(27)
    z *= np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    m = np.uint64(0xFFFF)
    s = (z & m) + ((z >> np.uint64(16)) & m) + ((z >> np.uint64(32)) & m) + (z >> np.uint64(48))
    return np.float32(s) * scale - shift


@numba.njit(cache=True, nogil=True)
def hash_uniform_of(h: int) -> np.float32:
    """:func:`rankers.hashing.hash_uniform` of a key tuple whose absorbed hash is ``h``: the murmur3 finaliser,
    then the top 24 bits as a float32 in [0, 1)."""
    h = ((h ^ (h >> 16)) * 0x85EBCA77) & _MASK32
    h = ((h ^ (h >> 13)) * 0xC2B2AE3D) & _MASK32
    h ^= h >> 16
    return np.float32(h >> 8) * np.float32(1.0 / (1 << 24))
