"""Exact and near-duplicate detection for chat / preference examples.

Exact duplicates
    :func:`normalise_for_hash` renders an example as a canonical string (per message: role and
    content casefolded, Unicode-NFKC normalised, whitespace collapsed, punctuation runs stripped
    from both ends) and :func:`content_hash` is its SHA-256.  Roles stay part of the key, so the
    same text said by the user and by the assistant is not a duplicate.

Near duplicates
    :func:`minhash_signature` builds a datasketch ``MinHash`` ("affine32" scheme, 128 permutations
    by default) over **character 5-gram shingles** of the text with punctuation removed.  Character
    shingles are used rather than word shingles because chat messages are short: changing one word
    of a 40-word message changes ~10 of ~230 character 5-grams (Jaccard ≈ 0.91) but 5 of 36 word
    5-grams (Jaccard ≈ 0.76), so word shingles would miss the single-word edits that near-dup
    detection exists to catch; character shingles are also robust to typos and tokenisation.
    Shingles are hashed with a vectorised polynomial hash (uint64 arithmetic, deterministic across
    processes and platforms) and fed to datasketch's permutations.  A signature is stored as the
    little-endian uint32 hash values: 512 bytes for 128 permutations.

    :func:`find_duplicate_groups` bands the signatures exactly like ``datasketch.MinHashLSH`` (same
    optimal ``(b, r)`` for the threshold, taken from a ``MinHashLSH`` instance) but does the bucketing
    with numpy over the whole signature matrix, which is ~10x faster than inserting and querying
    100k objects one by one and never materialises all pairs of a huge bucket.  Every candidate pair
    is verified with the estimated Jaccard similarity (fraction of equal hash values) before it is
    unioned, so LSH false positives never join a group.

No Django imports; only ids and counts are logged, never text.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import re
import unicodedata
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

logger = logging.getLogger(__name__)

SIGNATURE_SCHEME = "minhash-affine32-char5-v1"  # bump if shingling/hashing changes (stored signatures)
MINHASH_SEED = 1
LSH_WEIGHTS = (0.05, 0.95)  # (false positive, false negative) weights for MinHashLSH's (b, r) optimiser
MAX_PIVOTS_PER_BUCKET = 256  # bounds verification work in pathological buckets (see _verify_bucket)
_SIG_DTYPE = np.dtype("<u4")
_WORD_RE = re.compile(r"\w+")
_SHINGLE_CHUNK = 8192  # shingles per vectorised permutation block (bounds temporary memory)
_POLY_MULTIPLIER = np.uint64(0x100000001B3)  # FNV-1 64-bit prime; any odd 64-bit constant works


# --------------------------------------------------------------------------- exact duplicates


def _normalise_text(value: Any) -> str:
    if value is None:
        return ""
    if type(value) is str and value.isascii():
        # Same result as below, in C: NFKC leaves ASCII unchanged and casefold() is lower() there;
        # without "  " or another whitespace character there is no run to collapse.
        text = value.lower()
        raw = text.encode("ascii")
        if "  " in text or len(raw.translate(None, _ASCII_OTHER_SPACE)) != len(raw):
            text = " ".join(text.split())
        return text.strip(_ASCII_EDGE_JUNK)
    if isinstance(value, list):  # multi-part content: keep the text parts
        value = " ".join(str(p.get("text", "")) for p in value if isinstance(p, dict))
    text = unicodedata.normalize("NFKC", str(value)).casefold()
    text = " ".join(text.split())
    start, end = 0, len(text)
    while start < end and _is_edge_junk(text[start]):
        start += 1
    while end > start and _is_edge_junk(text[end - 1]):
        end -= 1
    return text[start:end]


def _is_edge_junk(char: str) -> bool:
    return char.isspace() or unicodedata.category(char).startswith("P")


_ASCII_EDGE_JUNK = "".join(c for c in map(chr, range(128)) if _is_edge_junk(c))
_ASCII_OTHER_SPACE = bytes(i for i in range(128) if chr(i).isspace() and i != 32)  # \t \n ... \x1f
_json_string = json.encoder.encode_basestring  # a str as json.dumps(..., ensure_ascii=False) writes it


# The fast path of the canonical text (see _canonical_ascii): one translate() lower-cases ASCII letters,
# turns whitespace into spaces and marks with NUL every byte JSON would escape (", \\, other controls).
_FAST_TABLE = bytearray(range(256))
for _byte in range(65, 91):
    _FAST_TABLE[_byte] = _byte + 32
for _byte in (*range(1, 32), ord('"'), ord("\\")):
    _FAST_TABLE[_byte] = 32 if _byte in _ASCII_OTHER_SPACE else 0
_FAST_TABLE = bytes(_FAST_TABLE)
_ASCII_EDGE_JUNK_BYTES = _ASCII_EDGE_JUNK.encode("ascii")
_FAST_ROLES = {"user": b"user", "assistant": b"assistant", "system": b"system"}


def _canonical_ascii(messages: list[dict], chosen: str | None, rejected: str | None) -> bytes | None:
    """The canonical JSON of the usual example, built from bytes: plain roles, ASCII texts with no
    whitespace run to collapse and nothing JSON escapes. Then NFKC and casefold() are lower(),
    collapsing whitespace is mapping each whitespace byte to a space, and each text goes between
    quotes as it is. None for anything else (the general path). The same bytes as the general path."""
    try:
        roles = [_FAST_ROLES[m["role"]] for m in messages]
        texts = [m["content"] for m in messages]
    except (KeyError, TypeError):
        return None
    if chosen is not None:
        roles.append(b"chosen")
        texts.append(chosen)
    if rejected is not None:
        roles.append(b"rejected")
        texts.append(rejected)
    try:
        raw = "\x00".join(texts).encode("ascii")
    except (TypeError, UnicodeEncodeError):
        return None
    mapped = raw.translate(_FAST_TABLE)
    texts = mapped.split(b"\x00")
    if len(texts) != len(roles) or b"  " in mapped:
        return None  # NUL in a text, something to escape, or a whitespace run
    junk = _ASCII_EDGE_JUNK_BYTES
    parts = [
        b'["' + role + b'","' + text.strip(junk) + b'"]' for role, text in zip(roles, texts, strict=True)
    ]
    return b"[" + b",".join(parts) + b"]"


def _canonical_general(messages: list[dict], chosen: str | None, rejected: str | None) -> str:
    """``json.dumps(parts, ensure_ascii=False, separators=(",", ":"))`` of the normalised parts."""
    parts = [(_normalise_text(m.get("role")), _normalise_text(m.get("content"))) for m in messages]
    if chosen is not None:
        parts.append(("chosen", _normalise_text(chosen)))
    if rejected is not None:
        parts.append(("rejected", _normalise_text(rejected)))
    return "[" + ",".join([f"[{_json_string(a)},{_json_string(b)}]" for a, b in parts]) + "]"


def normalise_for_hash(messages: list[dict], chosen: str | None = None, rejected: str | None = None) -> str:
    """Canonical text of an example, equal for examples that differ only in case/whitespace/edge punctuation.

    The result is compact JSON: ``[[role, text], ...]`` for the messages, followed by
    ``["chosen", text]`` / ``["rejected", text]`` entries when those are given (preference pairs).
    Text is NFKC-normalised, casefolded, whitespace runs collapsed to one space, and leading and
    trailing punctuation runs removed; punctuation inside the text is kept.
    """
    fast = _canonical_ascii(messages, chosen, rejected)
    return fast.decode("ascii") if fast is not None else _canonical_general(messages, chosen, rejected)


def content_hash(messages: list[dict], chosen: str | None = None, rejected: str | None = None) -> str:
    """SHA-256 hex digest of :func:`normalise_for_hash` (UTF-8)."""
    text = _canonical_ascii(messages, chosen, rejected)
    if text is None:
        text = _canonical_general(messages, chosen, rejected).encode("utf-8")
    return hashlib.sha256(text).hexdigest()


def hash_and_similarity_text(
    messages: list[dict], chosen: str | None = None, rejected: str | None = None
) -> tuple[str, str]:
    """(:func:`content_hash`, :func:`similarity_text`) from one normalisation when there is no system
    message (the two texts are then the same), two otherwise."""
    text = normalise_for_hash(messages, chosen, rejected)
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    if any(_normalise_text(m.get("role")) == "system" for m in messages):
        return digest, similarity_text(messages, chosen, rejected)
    return digest, text


def similarity_text(messages: list[dict], chosen: str | None = None, rejected: str | None = None) -> str:
    """The recommended input of :func:`minhash_signature`: :func:`normalise_for_hash` without system messages.

    A system prompt is usually shared by many examples of a dataset; left in, a long one makes
    unrelated conversations look alike (they would all sit near the threshold).  Exact duplicates
    still use the full :func:`content_hash`, system messages included.
    """
    kept = [m for m in messages if _normalise_text(m.get("role")) != "system"]
    return normalise_for_hash(kept, chosen, rejected)


# --------------------------------------------------------------------------- MinHash signatures


@functools.lru_cache(maxsize=8)
def _permutations(num_perm: int) -> np.ndarray:
    from datasketch import MinHash

    return MinHash(num_perm=num_perm, seed=MINHASH_SEED, scheme="affine32").permutations


def _fmix32(values: np.ndarray) -> np.ndarray:
    """MurmurHash3 32-bit finaliser -- the pre-mix datasketch's "affine32" scheme applies to inputs."""
    values = values ^ (values >> np.uint32(16))
    values = values * np.uint32(0x85EBCA6B)
    values = values ^ (values >> np.uint32(13))
    values = values * np.uint32(0xC2B2AE35)
    return values ^ (values >> np.uint32(16))


def shingle_hashes(text: str, shingle: int = 5) -> np.ndarray:
    """Unique uint32 hashes of the character ``shingle``-grams of ``text``'s words.

    The text is NFKC-normalised and casefolded, and reduced to its ``\\w+`` words joined by single
    spaces (so punctuation and markup such as the JSON of :func:`normalise_for_hash` are ignored).
    A text shorter than ``shingle`` characters is one shingle; an empty text has none.
    """
    if shingle < 1:
        raise ValueError("shingle must be >= 1")
    words = _WORD_RE.findall(unicodedata.normalize("NFKC", text).casefold())
    if not words:
        return np.empty(0, dtype=np.uint32)
    codes = np.frombuffer(" ".join(words).encode("utf-32-le"), dtype="<u4").astype(np.uint64)
    k = min(shingle, len(codes))
    n = len(codes) - k + 1
    acc = np.zeros(n, dtype=np.uint64)
    for j in range(k):  # polynomial hash of each window, wrapping mod 2^64
        acc = acc * _POLY_MULTIPLIER + codes[j : j + n]
    # splitmix64 finaliser, then keep the high 32 bits
    acc ^= acc >> np.uint64(30)
    acc *= np.uint64(0xBF58476D1CE4E5B9)
    acc ^= acc >> np.uint64(27)
    acc *= np.uint64(0x94D049BB133111EB)
    acc ^= acc >> np.uint64(31)
    return np.unique((acc >> np.uint64(32)).astype(np.uint32))


def minhash_signature(text: str, num_perm: int = 128, shingle: int = 5) -> bytes:
    """MinHash signature of ``text`` as ``num_perm`` little-endian uint32 values (4 × num_perm bytes).

    The values are exactly those of ``datasketch.MinHash(num_perm, seed=1, scheme="affine32")``
    updated with :func:`shingle_hashes` (an identity hash function); the permutation step is
    applied here in one vectorised numpy expression instead of datasketch's per-value Python loop,
    which makes it about twice as fast (the equality is covered by the tests).

    Pass :func:`similarity_text` output (role-aware, normalised like :func:`content_hash`, system
    messages left out).  Use :func:`signature_from_bytes` / :func:`signature_to_minhash`
    to read it back.
    """
    a, b = _permutations(num_perm)
    values = np.full(num_perm, np.iinfo(np.uint32).max, dtype=np.uint32)
    mixed = _fmix32(shingle_hashes(text, shingle))
    for start in range(0, len(mixed), _SHINGLE_CHUNK):
        block = mixed[start : start + _SHINGLE_CHUNK, None]
        values = np.minimum(values, (block * a + b).min(axis=0))  # uint32 wrap-around = mod 2^32
    return values.astype(_SIG_DTYPE).tobytes()


def signature_from_bytes(signature: bytes) -> np.ndarray:
    """The hash values (uint32 array) of a signature made by :func:`minhash_signature`."""
    if len(signature) == 0 or len(signature) % _SIG_DTYPE.itemsize:
        raise ValueError(f"a signature is a non-empty multiple of {_SIG_DTYPE.itemsize} bytes")
    return np.frombuffer(signature, dtype=_SIG_DTYPE).astype(np.uint32)


def signature_to_minhash(signature: bytes) -> Any:
    """A ``datasketch.LeanMinHash`` for a stored signature (usable with datasketch's own LSH classes)."""
    from datasketch import LeanMinHash

    return LeanMinHash(seed=MINHASH_SEED, hashvalues=signature_from_bytes(signature), scheme="affine32")


def estimated_jaccard(a: bytes, b: bytes) -> float:
    """Estimated Jaccard similarity of two signatures (fraction of equal hash values)."""
    va, vb = signature_from_bytes(a), signature_from_bytes(b)
    if va.shape != vb.shape:
        raise ValueError("signatures have different numbers of permutations")
    return float(np.count_nonzero(va == vb)) / len(va)


# --------------------------------------------------------------------------- grouping


@dataclass(frozen=True)
class DuplicateGroup:
    """A set of examples that duplicate each other.

    ``kind`` is ``"exact"`` (identical :func:`content_hash`) or ``"near"`` (MinHash similarity at or
    above the threshold, possibly alongside exact copies).  ``member_ids`` is sorted; its first
    element is the natural one to keep.  ``similarity`` is 1.0 for exact groups and, for near
    groups, the lowest estimated Jaccard similarity between the first member and any other member
    (always ≥ the threshold).
    """

    kind: Literal["exact", "near"]
    member_ids: list[int] = field(default_factory=list)
    similarity: float = 1.0


def _lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
    """``(bands, rows)`` chosen by ``datasketch.MinHashLSH`` for this threshold, weighted for recall.

    Every candidate pair is verified afterwards, so a false positive only costs one comparison
    while a false negative is a missed duplicate: the optimiser gets :data:`LSH_WEIGHTS`
    (false-positive, false-negative) instead of datasketch's default (0.5, 0.5).  For 128
    permutations at 0.85 this gives b=12, r=10: a pair at exactly the threshold becomes a
    candidate with probability 0.93, a pair at 0.90 with 0.99, a pair at 0.50 with 0.01 (the
    default b=8, r=16 would find only 46% of pairs at 0.85 and 81% at 0.90).
    """
    return _lsh_params_cached(round(threshold, 6), num_perm)


@functools.lru_cache(maxsize=32)
def _lsh_params_cached(threshold: float, num_perm: int) -> tuple[int, int]:
    from datasketch import MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, weights=LSH_WEIGHTS)
    return int(lsh.b), int(lsh.r)


class _UnionFind:
    def __init__(self, size: int) -> None:
        self.parent = list(range(size))

    def find(self, x: int) -> int:
        parent = self.parent
        root = x
        while parent[root] != root:
            root = parent[root]
        while parent[x] != root:
            parent[x], x = root, parent[x]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:  # the smaller index becomes the root: deterministic
            if rb < ra:
                ra, rb = rb, ra
            self.parent[rb] = ra


def _band_buckets(sigs: np.ndarray, bands: int, rows: int) -> Iterable[np.ndarray]:
    """Yield, for every band, each bucket (sorted row indices) holding two or more signatures."""
    n = sigs.shape[0]
    for band in range(bands):
        block = np.ascontiguousarray(sigs[:, band * rows : (band + 1) * rows])
        keys = block.view(np.dtype((np.void, block.dtype.itemsize * rows))).ravel()
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        boundaries = np.flatnonzero(sorted_keys[1:] != sorted_keys[:-1]) + 1
        starts = np.concatenate(([0], boundaries))
        ends = np.concatenate((boundaries, [n]))
        multi = ends - starts > 1
        for s, e in zip(starts[multi], ends[multi], strict=True):
            yield np.sort(order[s:e])


def _verify_bucket(sigs: np.ndarray, bucket: np.ndarray, min_equal: int, uf: _UnionFind) -> tuple[int, int]:
    """Union the members of an LSH bucket whose estimated Jaccard reaches the threshold.

    Pivot scheme: compare every remaining member with the first one (vectorised), union the
    similar ones, and repeat with the dissimilar rest -- linear in the bucket size when the bucket
    is one cluster.  A bucket of mutually dissimilar members (e.g. thousands of examples sharing
    a long system prompt) would make this quadratic, so at most :data:`MAX_PIVOTS_PER_BUCKET`
    pivots are tried per bucket; members left over still get their chance in the other bands.
    Returns ``(comparisons made, members left unverified)``.
    """
    roots = {uf.find(int(i)) for i in bucket}
    if len(roots) == 1:
        return 0, 0
    comparisons = 0
    remaining = bucket
    for _ in range(MAX_PIVOTS_PER_BUCKET):
        if len(remaining) < 2:
            return comparisons, 0
        pivot, rest = remaining[0], remaining[1:]
        equal = np.count_nonzero(sigs[rest] == sigs[pivot], axis=1)
        comparisons += len(rest)
        similar = equal >= min_equal
        for other in rest[similar]:
            uf.union(int(pivot), int(other))
        remaining = rest[~similar]
    return comparisons, len(remaining) if len(remaining) > 1 else 0


def _leader_clusters(
    sigs: np.ndarray, indices: np.ndarray, min_equal: int
) -> tuple[list[tuple[list[int], int]], int]:
    """Split a union-find component into clusters that are all similar to their first member.

    Union-find joins verified *pairs*, so chains (A~B, B~C, C~D, ...) can connect examples that
    are not similar at all -- typically when many examples share a long system prompt and sit just
    below the threshold.  Walking the component in id order, the lowest remaining member becomes a
    leader and takes every remaining member whose estimated Jaccard with it reaches the threshold.
    At most :data:`MAX_PIVOTS_PER_BUCKET` leaders are tried per component; the rest (counted in the
    second return value) become singletons.

    Returns ``([(cluster indices, lowest equal-value count to the leader), ...], members left)``;
    clusters of one index are included (they can still be exact groups).
    """
    clusters: list[tuple[list[int], int]] = []
    remaining = np.sort(indices)
    for _ in range(MAX_PIVOTS_PER_BUCKET):
        if len(remaining) == 0:
            return clusters, 0
        leader, rest = remaining[0], remaining[1:]
        equal = np.count_nonzero(sigs[rest] == sigs[leader], axis=1)
        similar = equal >= min_equal
        lowest = int(equal[similar].min()) if similar.any() else sigs.shape[1]
        clusters.append(([int(leader), *(int(i) for i in rest[similar])], lowest))
        remaining = rest[~similar]
    clusters.extend(([int(i)], sigs.shape[1]) for i in remaining)
    return clusters, len(remaining)


def find_duplicate_groups(
    items: Iterable[tuple[int, str, bytes]], threshold: float = 0.85, num_perm: int = 128
) -> list[DuplicateGroup]:
    """Group exact and near duplicates among ``(example_id, content_hash, signature)`` items.

    1. Items with the same ``content_hash`` are exact duplicates; each distinct hash is represented
       by its lowest example id (and that item's signature).
    2. The representatives' signatures are banded like ``MinHashLSH(threshold, num_perm)``; every
       pair sharing a bucket is verified with the estimated Jaccard (≥ ``threshold``) and verified
       pairs are joined with union-find.
    3. Each connected component is split into leader clusters (see :func:`_leader_clusters`):
       every member of a cluster has estimated Jaccard ≥ ``threshold`` with the cluster's lowest id,
       so chains of pairwise-similar examples do not snowball into one giant group.
    4. A cluster of two or more representatives becomes one ``"near"`` group holding all of its
       examples (exact copies included, so every example is in at most one group); a hash with two
       or more examples and no near neighbour becomes an ``"exact"`` group.

    Output is deterministic: exact groups first, then near groups, each ordered by lowest member id.
    Memory is ~4 × num_perm bytes per item (the signature matrix) plus the bucket sort indices.
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError("threshold must be in (0, 1]")
    sig_bytes = 4 * num_perm
    by_hash: dict[str, list[int]] = defaultdict(list)
    signature_of: dict[int, bytes] = {}
    for example_id, digest, signature in items:
        example_id = int(example_id)
        if example_id in signature_of:
            raise ValueError(f"example id {example_id} appears twice")
        if len(signature) != sig_bytes:
            raise ValueError(
                f"example {example_id}: signature has {len(signature)} bytes, expected {sig_bytes} "
                f"(num_perm={num_perm})"
            )
        by_hash[digest].append(example_id)
        signature_of[example_id] = bytes(signature)

    # one representative (lowest id) per distinct content hash, in id order
    members_of_rep: dict[int, list[int]] = {}
    for ids in by_hash.values():
        ids.sort()
        members_of_rep[ids[0]] = ids
    reps = sorted(members_of_rep)
    groups: list[DuplicateGroup] = []
    if not reps:
        return groups

    sigs = np.frombuffer(b"".join(signature_of[r] for r in reps), dtype=_SIG_DTYPE).reshape(
        len(reps), num_perm
    )
    bands, rows = _lsh_params(threshold, num_perm)
    min_equal = int(np.ceil(threshold * num_perm - 1e-9))
    uf = _UnionFind(len(reps))
    buckets = comparisons = unverified = 0
    if len(reps) > 1:
        for bucket in _band_buckets(sigs, bands, rows):
            buckets += 1
            made, left = _verify_bucket(sigs, bucket, min_equal, uf)
            comparisons += made
            unverified += left
    if unverified:
        logger.warning("dedup: %d bucket members skipped after %d pivots", unverified, MAX_PIVOTS_PER_BUCKET)

    components: dict[int, list[int]] = defaultdict(list)
    for index in range(len(reps)):
        components[uf.find(index)].append(index)

    exact: list[DuplicateGroup] = []
    near: list[DuplicateGroup] = []
    split_left = 0
    for indices in components.values():
        if len(indices) == 1:  # the common case: no near neighbour
            clusters, left = [(indices, num_perm)], 0
        else:
            clusters, left = _leader_clusters(sigs, np.asarray(indices), min_equal)
        split_left += left
        for cluster, lowest_equal in clusters:
            member_ids = sorted(i for index in cluster for i in members_of_rep[reps[index]])
            if len(cluster) > 1:
                near.append(
                    DuplicateGroup(kind="near", member_ids=member_ids, similarity=lowest_equal / num_perm)
                )
            elif len(member_ids) > 1:
                exact.append(DuplicateGroup(kind="exact", member_ids=member_ids, similarity=1.0))
    if split_left:
        logger.warning("dedup: %d members of oversized components left ungrouped", split_left)

    exact.sort(key=lambda g: g.member_ids[0])
    near.sort(key=lambda g: g.member_ids[0])
    groups = exact + near
    logger.info(
        "dedup: %d items, %d distinct hashes, %d LSH buckets (b=%d, r=%d), %d comparisons, "
        "%d exact groups, %d near groups",
        len(signature_of),
        len(reps),
        buckets,
        bands,
        rows,
        comparisons,
        len(exact),
        len(near),
    )
    return groups
