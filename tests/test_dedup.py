"""Exact and near-duplicate detection (datasets_app.dedup); pure Python, no database."""

from __future__ import annotations

import hashlib
import json
import random
import unicodedata

import numpy as np
import pytest
from datasketch import MinHash

from datasets_app.dedup import (
    DuplicateGroup,
    content_hash,
    estimated_jaccard,
    find_duplicate_groups,
    hash_and_similarity_text,
    minhash_signature,
    normalise_for_hash,
    shingle_hashes,
    signature_from_bytes,
    signature_to_minhash,
    similarity_text,
)

FORTY_WORDS = (
    "Our quarterly report shows that revenue grew across every region while operating "
    "costs stayed flat, so the board approved an increase in the research budget and asked "
    "the product team to prepare a detailed roadmap before the next planning meeting"
)
UNRELATED = [
    "How do I bake sourdough bread with a crispy crust and an open crumb at home?",
    "Explain the difference between TCP and UDP in terms of reliability and ordering guarantees.",
    "Write a short poem about autumn leaves falling into a quiet mountain lake at dusk.",
    "What are the main causes of inflation and how do central banks usually respond to them?",
    "List three exercises that strengthen the lower back without needing any gym equipment.",
]


def chat(user: str, assistant: str = "Sure.") -> list[dict]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


def item(example_id: int, messages: list[dict], **kwargs) -> tuple[int, str, bytes]:
    text = normalise_for_hash(messages, **kwargs)
    return example_id, content_hash(messages, **kwargs), minhash_signature(text)


def test_forty_word_fixture_has_forty_words():
    assert len(FORTY_WORDS.split()) == 40


def test_normalisation_ignores_case_whitespace_and_edge_punctuation():
    a = chat("  Hello,   WORLD!!! ", "Hi there.")
    b = chat("hello, world", "hi   there")
    assert normalise_for_hash(a) == normalise_for_hash(b)
    assert content_hash(a) == content_hash(b)
    # punctuation inside the text is significant
    assert content_hash(chat("hello world")) != content_hash(chat("hello, world"))


def _reference_normalise(messages, chosen=None, rejected=None) -> str:
    """The documented normalisation, written plainly (the module has a faster path for ASCII text)."""

    def norm(value) -> str:
        text = " ".join(unicodedata.normalize("NFKC", value or "").casefold().split())
        junk = lambda c: c.isspace() or unicodedata.category(c).startswith("P")  # noqa: E731
        start, end = 0, len(text)
        while start < end and junk(text[start]):
            start += 1
        while end > start and junk(text[end - 1]):
            end -= 1
        return text[start:end]

    parts = [[norm(m.get("role")), norm(m.get("content"))] for m in messages]
    parts += [
        [name, norm(text)] for name, text in (("chosen", chosen), ("rejected", rejected)) if text is not None
    ]
    return json.dumps(parts, ensure_ascii=False, separators=(",", ":"))


def test_normalisation_and_hash_match_the_plain_definition_on_random_text():
    rng = random.Random(11)
    alphabet = (
        [chr(i) for i in range(1, 128)] + list("  ..!?éÉßİ\u212a\u00a0\u2028\u3000…—«»’😀ﬁ①") + ["ab"] * 20
    )
    for _ in range(5000):
        messages = [
            {
                "role": rng.choice(["user", "assistant", "system", "User", " Assistant! "]),
                "content": "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12))),
            }
            for _ in range(rng.randint(0, 4))
        ]
        extra = {}
        if rng.random() < 0.3:
            extra = {"chosen": rng.choice(alphabet) + "x", "rejected": rng.choice(["", " Y!", "\tz"])}
        expected = _reference_normalise(messages, **extra)
        assert normalise_for_hash(messages, **extra) == expected
        assert content_hash(messages, **extra) == hashlib.sha256(expected.encode()).hexdigest()


def test_hash_is_role_aware_and_includes_preference_fields():
    as_user = [{"role": "user", "content": "Tell me a joke"}]
    as_assistant = [{"role": "assistant", "content": "Tell me a joke"}]
    assert content_hash(as_user) != content_hash(as_assistant)
    prompt = [{"role": "user", "content": "Pick one"}]
    assert content_hash(prompt, chosen="A", rejected="B") != content_hash(prompt, chosen="B", rejected="A")
    assert content_hash(prompt, chosen="A!", rejected=" b") == content_hash(prompt, chosen="a", rejected="B")
    assert len(content_hash(prompt)) == 64


def test_exact_duplicates_with_whitespace_and_case_differences_are_grouped():
    items = [
        item(10, chat("What is the capital of France?")),
        item(11, chat("what is the   capital of france", "  SURE ")),
        item(12, chat(UNRELATED[0])),
        item(13, chat("WHAT IS THE CAPITAL OF FRANCE???")),
    ]
    groups = find_duplicate_groups(items)
    assert groups == [DuplicateGroup(kind="exact", member_ids=[10, 11, 13], similarity=1.0)]


def test_near_duplicates_one_word_changed_in_forty_are_grouped():
    words = FORTY_WORDS.split()
    edited = list(words)
    edited[20] = "reluctantly"
    a, b = chat(FORTY_WORDS), chat(" ".join(edited))
    assert content_hash(a) != content_hash(b)
    similarity = estimated_jaccard(
        minhash_signature(normalise_for_hash(a)), minhash_signature(normalise_for_hash(b))
    )
    assert similarity >= 0.85

    items = [item(1, a), item(2, b)] + [item(100 + i, chat(t)) for i, t in enumerate(UNRELATED)]
    groups = find_duplicate_groups(items, threshold=0.85)
    assert len(groups) == 1
    assert groups[0].kind == "near"
    assert groups[0].member_ids == [1, 2]
    assert groups[0].similarity == pytest.approx(similarity)


def test_unrelated_texts_are_not_grouped():
    items = [item(i, chat(text)) for i, text in enumerate(UNRELATED)]
    assert find_duplicate_groups(items) == []
    sigs = [minhash_signature(t) for t in UNRELATED]
    assert max(estimated_jaccard(x, y) for i, x in enumerate(sigs) for y in sigs[i + 1 :]) < 0.3


def test_threshold_is_respected():
    words = FORTY_WORDS.split()
    variant = list(words)
    for position in (3, 11, 19, 27, 35):  # five words changed: clearly similar, not 0.95-similar
        variant[position] = "zebra"
    a, b = chat(FORTY_WORDS), chat(" ".join(variant))
    sim = estimated_jaccard(
        minhash_signature(normalise_for_hash(a)), minhash_signature(normalise_for_hash(b))
    )
    assert 0.4 < sim < 0.95
    items = [item(1, a), item(2, b)]
    assert find_duplicate_groups(items, threshold=0.95) == []
    low = find_duplicate_groups(items, threshold=max(0.3, sim - 0.1))
    assert [(g.kind, g.member_ids) for g in low] == [("near", [1, 2])]
    assert low[0].similarity == pytest.approx(sim)


def test_every_example_in_at_most_one_group_and_exact_copies_join_near_group():
    words = FORTY_WORDS.split()
    words[5] = "sharply"
    items = [
        item(1, chat(FORTY_WORDS)),
        item(2, chat(FORTY_WORDS.upper())),  # exact copy of 1
        item(3, chat(" ".join(words))),  # near copy of 1
        item(4, chat(UNRELATED[1])),
        item(5, chat(UNRELATED[1] + "  ")),  # exact copy of 4, no near neighbour
    ]
    groups = find_duplicate_groups(items)
    assert [(g.kind, g.member_ids) for g in groups] == [("exact", [4, 5]), ("near", [1, 2, 3])]
    seen = [i for g in groups for i in g.member_ids]
    assert len(seen) == len(set(seen))


def test_chains_of_similar_pairs_are_split_around_a_leader():
    # Hand-made signatures: B differs from A in 12 of 128 values, C from B in 12 others, so
    # A~B and B~C (0.906) while A and C (0.8125) are below the threshold.  B and C share LSH band 0
    # (b=12, r=10) without A, so union-find links all three; the leader split must drop C.
    a = np.arange(1000, 1128, dtype="<u4")
    b = a.copy()
    b[0:12] += 5000
    c = b.copy()
    c[60:72] += 5000
    items = [(1, "ha", a.tobytes()), (2, "hb", b.tobytes()), (3, "hc", c.tobytes())]
    groups = find_duplicate_groups(items, threshold=0.85)
    assert [(g.kind, g.member_ids) for g in groups] == [("near", [1, 2])]
    assert groups[0].similarity == pytest.approx(116 / 128)


def test_shared_system_prompt_does_not_make_conversations_similar():
    rng = random.Random(3)
    vocab = [f"term{i}" for i in range(2000)]
    system = {"role": "system", "content": " ".join(rng.choice(vocab) for _ in range(300))}
    convs = [
        [
            system,
            *chat(
                " ".join(rng.choice(vocab) for _ in range(12)), " ".join(rng.choice(vocab) for _ in range(20))
            ),
        ]
        for _ in range(60)
    ]
    full = [minhash_signature(normalise_for_hash(c)) for c in convs]
    assert estimated_jaccard(full[0], full[1]) > 0.6  # the shared prompt dominates the full text
    items = [(i, content_hash(c), minhash_signature(similarity_text(c))) for i, c in enumerate(convs)]
    assert find_duplicate_groups(items) == []
    assert similarity_text(convs[0]) == normalise_for_hash(convs[0][1:])


@pytest.mark.parametrize(
    "messages, extra",
    [
        (chat("Hello  THERE", "Hi!"), {}),
        ([{"role": "system", "content": "Be brief."}, *chat("Café?", "Oui.")], {}),
        ([{"role": "user", "content": "Pick one"}], {"chosen": "A!", "rejected": " b"}),
    ],
)
def test_hash_and_similarity_text_equal_the_two_functions(messages, extra):
    digest, text = hash_and_similarity_text(messages, **extra)
    assert digest == content_hash(messages, **extra)
    assert text == similarity_text(messages, **extra)


def test_output_is_deterministic_regardless_of_input_order():
    rng = random.Random(7)
    vocab = [f"word{i}" for i in range(300)]
    items = []
    for i in range(300):
        base = [rng.choice(vocab) for _ in range(40)]
        items.append(item(i * 3, chat(" ".join(base))))
        edited = list(base)
        edited[rng.randrange(40)] = "different"
        if i % 2:
            items.append(item(i * 3 + 1, chat(" ".join(edited))))
        if i % 5 == 0:
            items.append(item(i * 3 + 2, chat(" ".join(base).upper())))
    first = find_duplicate_groups(items)
    shuffled = list(items)
    rng.shuffle(shuffled)
    assert find_duplicate_groups(shuffled) == first
    kinds = [g.kind for g in first]
    assert kinds == sorted(kinds, key=["exact", "near"].index)
    assert all(g.member_ids == sorted(g.member_ids) for g in first)
    assert sum(1 for g in first if g.kind == "near") >= 140  # nearly all 150 edited copies found


def test_signature_round_trip_from_bytes():
    text = normalise_for_hash(chat(FORTY_WORDS))
    signature = minhash_signature(text)
    assert isinstance(signature, bytes)
    assert len(signature) == 128 * 4
    values = signature_from_bytes(signature)
    assert values.dtype == np.uint32 and values.shape == (128,)
    assert values.tobytes() == signature  # little-endian host; the format itself is explicit <u4
    lean = signature_to_minhash(signature)
    assert np.array_equal(lean.hashvalues, values)
    assert lean.jaccard(signature_to_minhash(signature)) == 1.0
    assert minhash_signature(text) == signature  # deterministic
    assert len(minhash_signature(text, num_perm=64)) == 64 * 4
    with pytest.raises(ValueError):
        signature_from_bytes(b"abc")


def test_signature_matches_datasketch_minhash():
    for text in ["", "ab", FORTY_WORDS, "héllo wörld, ÄÖ 中文字符 test " * 20]:
        reference = MinHash(num_perm=128, seed=1, scheme="affine32", hashfunc=lambda value: value)
        hashes = shingle_hashes(text)
        if hashes.size:
            reference.update_batch(hashes)
        assert np.asarray(reference.hashvalues, dtype="<u4").tobytes() == minhash_signature(text)


def test_shingles_ignore_punctuation_and_case():
    assert np.array_equal(shingle_hashes("Hello, World!"), shingle_hashes("hello world"))
    assert shingle_hashes("").size == 0
    assert shingle_hashes("abc").size == 1


def test_invalid_input_is_rejected():
    sig = minhash_signature("some text here")
    with pytest.raises(ValueError, match="appears twice"):
        find_duplicate_groups([(1, "h", sig), (1, "h", sig)])
    with pytest.raises(ValueError, match="bytes"):
        find_duplicate_groups([(1, "h", sig[:100])])
    with pytest.raises(ValueError):
        find_duplicate_groups([], threshold=0)
    assert find_duplicate_groups([]) == []


def _normalise_text_reference(value) -> str:
    """The general (Unicode) normalisation, written out, to check the ASCII shortcut against."""
    import unicodedata

    text = " ".join(unicodedata.normalize("NFKC", str(value)).casefold().split())
    start, end = 0, len(text)
    while start < end and (text[start].isspace() or unicodedata.category(text[start]).startswith("P")):
        start += 1
    while end > start and (text[end - 1].isspace() or unicodedata.category(text[end - 1]).startswith("P")):
        end -= 1
    return text[start:end]


def test_ascii_shortcut_normalises_like_the_unicode_path():
    from datasets_app.dedup import _normalise_text

    rng = random.Random(7)
    pool = [chr(i) for i in range(128)] + [" "] * 40 + list("aZ?.!-_\t\n\x1f") * 4
    samples = ["", " ", "  Hello,   World!! ", "?!", "a\t\tb", "x\x1cy", "(tel: 555) ", "ÄRGER über", "ﬁne …"]
    samples += ["".join(rng.choice(pool) for _ in range(rng.randint(0, 16))) for _ in range(50_000)]
    for text in samples:
        assert _normalise_text(text) == _normalise_text_reference(text), repr(text)


def test_normalise_for_hash_is_the_compact_json_of_the_normalised_parts():
    import json

    rng = random.Random(11)
    alphabet = list('aZ ?!."\\/\t\n\x00\x1f\x7féΣςﬁÅ') + ["\U0001f600"] + [" "] * 5

    def text() -> str:
        return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))

    def reference(value) -> str:
        return "" if value is None else _normalise_text_reference(value)

    for _ in range(3000):
        messages = [
            {
                "role": rng.choice(["user", "Assistant ", None]),
                "content": rng.choice([text(), text(), None, 3]),
            }
            for _ in range(rng.randint(0, 3))
        ]
        chosen, rejected = rng.choice([(None, None), (text(), text()), (text(), None)])
        expected = [[reference(m["role"]), reference(m["content"])] for m in messages]
        expected += [
            [name, reference(v)] for name, v in (("chosen", chosen), ("rejected", rejected)) if v is not None
        ]
        got = normalise_for_hash(messages, chosen, rejected)
        assert got == json.dumps(expected, ensure_ascii=False, separators=(",", ":"))
