"""RFC 6962 Merkle trees over event hashes: roots and inclusion proofs.

leaf = SHA-256(0x00 || event_hash), node = SHA-256(0x01 || left || right); the tree of n leaves
splits at the largest power of two smaller than n (RFC 6962 section 2.1).
"""
from __future__ import annotations

from hashlib import sha256
from typing import Sequence

EMPTY_ROOT = sha256(b"").digest()


class InclusionProofError(ValueError):
    """An inclusion proof does not lead to the expected root."""


def leaf_hash(event_hash: bytes) -> bytes:
    return sha256(b"\x00" + event_hash).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return sha256(b"\x01" + left + right).digest()


def root_from_leaves(leaves: Sequence[bytes]) -> bytes:
    """Root over leaf hashes (already ``leaf_hash``ed). Iterative, O(n)."""
    if not leaves:
        return EMPTY_ROOT
    # Pairing left to right, level by level, and carrying an odd last node up unchanged gives the
    # RFC 6962 tree: every left subtree is a perfect tree of the largest power of two.
    level = list(leaves)
    while len(level) > 1:
        nxt = [sha256(b"\x01" + level[i] + level[i + 1]).digest() for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0]


def merkle_root(event_hashes: Sequence[bytes]) -> bytes:
    """RFC 6962 Merkle Tree Hash over ``event_hashes`` (in chain order)."""
    return root_from_leaves([sha256(b"\x00" + h).digest() for h in event_hashes])


def inclusion_proof(event_hashes: Sequence[bytes], index: int) -> list[bytes]:
    """Audit path for leaf ``index`` (RFC 6962 section 2.1.1). Requires 0 <= index < len."""
    n = len(event_hashes)
    if not 0 <= index < n:
        raise IndexError(f"leaf index {index} outside a tree of {n} leaves")
    leaves = [leaf_hash(h) for h in event_hashes]
    return _path(index, leaves)


def _path(m: int, leaves: list[bytes]) -> list[bytes]:
    n = len(leaves)
    if n == 1:
        return []
    k = 1 << ((n - 1).bit_length() - 1)
    if m < k:
        return _path(m, leaves[:k]) + [root_from_leaves(leaves[k:])]
    return _path(m - k, leaves[k:]) + [root_from_leaves(leaves[:k])]


def root_from_inclusion_proof(event_hash: bytes, index: int, size: int, proof: Sequence[bytes]) -> bytes:
    """Recompute the root from a leaf and its audit path (RFC 9162 section 2.1.3.2).

    Requires 0 <= index < size.
    """
    if not 0 <= index < size:
        raise InclusionProofError(f"leaf index {index} outside a tree of {size} leaves")
    fn, sn = index, size - 1
    r = leaf_hash(event_hash)
    for p in proof:
        if sn == 0:
            raise InclusionProofError("proof is longer than the tree is deep")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while fn & 1 == 0 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise InclusionProofError("proof is shorter than the tree is deep")
    return r


def verify_inclusion(event_hash: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes) -> None:
    """Compute the root from the proof, then compare; raises InclusionProofError naming the mismatch."""
    computed = root_from_inclusion_proof(event_hash, index, size, proof)
    if computed != root:
        raise InclusionProofError(
            f"leaf {index} of {size} leads to root {computed.hex()}, checkpoint says {root.hex()}")
