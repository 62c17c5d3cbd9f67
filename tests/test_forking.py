"""Forked helper processes (studio.forking.split_map) and the PII scan spread over them."""

from __future__ import annotations

import logging
import os
import signal

import pytest
from conftest import assert_reaped

from datasets_app import pii
from datasets_app.pii_data import generate
from studio import forking

PARENT = os.getpid()


@pytest.fixture(autouse=True)
def _may_fork(monkeypatch):
    # other tests may have left an idle daemon thread behind (tqdm's monitor): fork anyway
    monkeypatch.setattr(forking, "fork_is_safe", lambda: True)


def tagged(items: list[int]) -> list[tuple[int, int]]:
    return [(2 * x, os.getpid()) for x in items]


def test_slices_run_side_by_side_and_come_back_in_order(forks):
    result = forking.split_map(tagged, range(10), 3)
    assert [value for value, _ in result] == [2 * x for x in range(10)]
    pids = [pid for _, pid in result]
    assert pids[:3] == [PARENT] * 3  # 10 items in 3 slices: 3, 3, 4
    assert set(pids[3:6]) == {forks[0]} and set(pids[6:]) == {forks[1]}
    assert_reaped(forks)


def test_too_few_items_or_one_process_stay_here(forks):
    assert forking.split_map(tagged, range(10), 2, min_per_process=6) == tagged(list(range(10)))
    assert forking.split_map(tagged, range(10), 1) == tagged(list(range(10)))
    assert forking.split_map(tagged, [], 4) == []
    assert forks == []


@pytest.mark.parametrize("failure", ["raises", "killed", "wrong length"])
def test_a_failing_helper_costs_time_not_results(forks, caplog, failure):
    def fn(items: list[int]) -> list[int]:
        if os.getpid() != PARENT:
            if failure == "raises":
                raise ValueError("secret text")
            if failure == "killed":
                os.kill(os.getpid(), signal.SIGKILL)
            return items[1:]
        return [x * 3 for x in items]

    with caplog.at_level(logging.WARNING, logger="studio.forking"):
        assert forking.split_map(fn, range(8), 2) == [x * 3 for x in range(8)]
    assert len(forks) == 1
    assert_reaped(forks)
    assert "computing its part here" in caplog.text and "secret" not in caplog.text


def test_a_failure_here_stops_and_reaps_the_helpers(forks):
    def fn(items: list[int]) -> list[int]:
        if os.getpid() == PARENT:
            raise RuntimeError("boom")
        return items

    with pytest.raises(RuntimeError, match="boom"):
        forking.split_map(fn, range(9), 3)
    assert len(forks) == 2
    assert_reaped(forks)


def test_a_scan_over_two_processes_finds_what_one_process_finds(forks):
    texts = [item.text for item in generate(300, seed=5)]
    policy = pii.PiiPolicy(keep_patterns=[r"\bORD-\d+\b"])
    one = pii.PiiScanner(policy).scan(texts)
    assert forks == []
    two = pii.PiiScanner(policy, processes=2).scan(texts)
    assert len(forks) == 1
    assert_reaped(forks)
    assert two == one
    assert sum(map(len, one)) > 100  # the data has PII: the comparison is not between empty lists


@pytest.mark.django_db
def test_duplicate_signatures_over_two_processes_match_one_process(curator, forks, settings, monkeypatch):
    from datasets_app.dedup import content_hash, minhash_signature, similarity_text
    from datasets_app.models import DuplicateGroup, Example
    from datasets_app.services import datasets, duplicates

    settings.STUDIO_CURATION_PROCESSES = 2
    monkeypatch.setattr(duplicates, "MIN_ROWS_PER_PROCESS", 10)
    dataset = datasets.create_dataset("Dups", "sft", curator)
    words = [
        "parcel",
        "refund",
        "router",
        "invoice",
        "warranty",
        "battery",
        "login",
        "ticket",
        "charger",
        "screen",
    ]
    texts = [" ".join(words[(i * 7 + j) % 10] + str(i) for j in range(12)) for i in range(60)]
    texts += [texts[3].upper(), texts[5] + " !", texts[8].replace(words[0], "box", 1)]
    Example.objects.bulk_create(
        Example(
            dataset=dataset,
            position=i,
            messages=[{"role": "user", "content": text}, {"role": "assistant", "content": "Noted."}],
            content_hash="",
        )
        for i, text in enumerate(texts)
    )
    groups = duplicates.recompute(dataset)
    assert len(forks) == 1
    assert_reaped(forks)
    for ex in Example.objects.filter(dataset=dataset):
        assert ex.content_hash == content_hash(ex.messages)
        assert bytes(ex.minhash) == minhash_signature(similarity_text(ex.messages))
    kinds = sorted(DuplicateGroup.objects.filter(dataset=dataset).values_list("kind", flat=True))
    assert groups == len(kinds) and kinds.count("exact") == 2  # upper-cased and "!" copies
