"""Tests for datasets_app.pii (detection, policy, pseudonymisation) on labelled synthetic chats.

No database. Tests that need spaCy share one scanner through the module-scoped ``scanner`` fixture,
so the model loads once per session (``datasets_app.pii.get_nlp`` caches it process-wide); the policy,
pseudonymizer and normalisation tests do not load it at all.

Recall/precision floors sit just under what the bench measures on the same generator (held-out seed
here, seed 0 in the bench); see bench/pii_throughput.py for the figures.
"""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
import time

import pytest

from datasets_app import pii
from datasets_app.pii import (
    DEFAULT_KEEP_PATTERNS,
    ENTITY_TYPES,
    CustomRecognizer,
    Finding,
    PiiPolicy,
    PiiScanner,
    Pseudonymizer,
    normalise_value,
)
from datasets_app.pii_data import PLANS, evaluate, generate, iban_valid, luhn_valid

SECRET = b"test-secret"
EVAL_SEED = 11
EVAL_N = 1200

# Measured on seeds 0-3 and 11 (1,000-3,000 messages): pattern types 1.000, PERSON 0.986-0.993,
# LOCATION 0.965-0.994, overall precision 0.980-0.988, identifier-shaped business ids kept 1.000,
# all business ids (incl. branded plan names) 0.974-0.987, 0.995-1.000 with plan names allow-listed.
RECALL_FLOORS = {
    "EMAIL_ADDRESS": 0.95,
    "PHONE_NUMBER": 0.95,
    "CREDIT_CARD": 0.9,
    "IBAN_CODE": 0.9,
    "US_SSN": 0.9,
    "IP_ADDRESS": 0.95,
    "STREET_ADDRESS": 0.95,
    "PERSON": 0.95,
    "LOCATION": 0.9,
}
PRECISION_FLOOR = 0.95
BUSINESS_KEPT_FLOOR = 0.98
BUSINESS_KEPT_WITH_BRANDS_FLOOR = 0.96


@pytest.fixture(scope="module")
def scanner() -> PiiScanner:
    return PiiScanner(PiiPolicy())


@pytest.fixture(scope="module")
def labelled():
    return generate(EVAL_N, seed=EVAL_SEED)


@pytest.fixture(scope="module")
def evaluation(scanner, labelled):
    findings = scanner.scan([item.text for item in labelled])
    return evaluate(labelled, [[(f.start, f.end, f.entity_type) for f in fs] for fs in findings])


def spans_of(findings: list[Finding]) -> list[tuple[int, int, str]]:
    return [(f.start, f.end, f.entity_type) for f in findings]


# --------------------------------------------------------------------------------------------------
# Synthetic data
# --------------------------------------------------------------------------------------------------


def test_generator_is_deterministic_and_labels_are_valid():
    first, second = generate(300, seed=5), generate(300, seed=5)
    assert [d.text for d in first] == [d.text for d in second]
    assert generate(50, seed=6)[0].text != first[0].text or generate(50, seed=6)[1].text != first[1].text
    for item in first:
        for start, end, entity_type in item.spans:
            value = item.text[start:end]
            assert value == value.strip() and value
            if entity_type == "CREDIT_CARD":
                assert luhn_valid(value)
            if entity_type == "IBAN_CODE":
                assert iban_valid(value)
            if entity_type == "US_SSN":
                area = int(value[:3])
                assert area not in (0, 666) and area < 900
        for (start, end), kind in zip(item.business_ids, item.business_kinds, strict=True):
            assert item.text[start:end].strip() and kind
    share_without_pii = sum(1 for d in first if not d.spans) / len(first)
    assert 0.2 <= share_without_pii <= 0.45


# --------------------------------------------------------------------------------------------------
# Quality on labelled data
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("entity_type", sorted(RECALL_FLOORS))
def test_recall_per_entity_type(evaluation, entity_type):
    score = evaluation.per_type[entity_type]
    assert score.gold >= 5, "the generator must produce this type"
    assert score.recall >= RECALL_FLOORS[entity_type], f"{entity_type} recall {score.recall:.3f}"


def test_precision_overall(evaluation):
    assert evaluation.overall.precision >= PRECISION_FLOOR
    assert evaluation.precision_any_type >= PRECISION_FLOOR


def test_business_identifiers_kept_with_defaults(evaluation):
    """Every identifier-shaped kind survives; branded plan names ("Aurora", "Nimbus Max") are the one
    kind the defaults cannot tell from names, so the overall floor is lower (measured 0.974-0.987)."""
    for kind, (kept, total) in evaluation.business_by_kind.items():
        if kind != "plan":
            assert kept / total >= BUSINESS_KEPT_FLOOR, f"{kind}: {total - kept} of {total} scrubbed"
    for kind in ("order", "sku", "ticket", "invoice", "issue_key", "error_code", "version", "tracking"):
        kept, total = evaluation.business_by_kind[kind]
        assert kept == total, f"{kind}: {total - kept} of {total} scrubbed"
    assert evaluation.business_kept_share >= BUSINESS_KEPT_WITH_BRANDS_FLOOR, evaluation.business_by_kind


def test_business_identifiers_kept_once_brand_names_are_allow_listed(labelled):
    """The documented curator setup: the company's plan/product names go into the allow-list."""
    scanner = PiiScanner(PiiPolicy(allow_list=list(PLANS)))
    findings = scanner.scan([item.text for item in labelled])
    evaluation = evaluate(labelled, [spans_of(f) for f in findings])
    assert evaluation.business_kept_share >= BUSINESS_KEPT_FLOOR, evaluation.business_by_kind
    assert evaluation.overall.recall >= 0.95


def test_common_business_identifiers_survive(scanner):
    texts = [
        "Order ORD-123456 and #1234567 were both refunded, see invoice INV-2024-0001.",
        "SKU-AB-1234 and AB-12345-XL are out of stock; ticket TCK-88231 tracks it.",
        "Incident INC0012345 is linked to PROJ-123 and error E-4021 on firmware v2.4.1.",
        "The Router X200 shows 0x80070005 and ERR_CONNECTION_RESET after the update.",
        "The tracking number is 1Z999AA10123456784; the other parcel has tracking number 748923451234.",
    ]
    assert scanner.scan(texts) == [[] for _ in texts]


def test_studio_findings_match_per_message_presidio(scanner, labelled):
    """Batched, NER-only spaCy gives the same findings as Presidio's per-call full pipeline."""
    from presidio_analyzer import AnalyzerEngine

    sample = [item.text for item in labelled[:60]]
    naive = AnalyzerEngine(
        registry=scanner.registry,
        nlp_engine=pii.make_nlp_engine(full_pipeline=True),
        supported_languages=["en"],
    )
    batched = scanner.scan(sample)
    for text, found in zip(sample, batched, strict=True):
        results = naive.analyze(
            text, "en", entities=scanner.entities, score_threshold=scanner.policy.threshold
        )
        expected = [(s, e, t) for s, e, t, _, _ in scanner.postprocess(text, results)]
        assert spans_of(found) == expected


# --------------------------------------------------------------------------------------------------
# Scanner behaviour
# --------------------------------------------------------------------------------------------------


def test_scan_batches_deduplicates_and_keeps_order(scanner):
    texts = [
        "Hi, my name is Maria Garcia and my email is maria.garcia@example.com.",
        "No personal data here, just order ORD-555123.",
        "Hi, my name is Maria Garcia and my email is maria.garcia@example.com.",
        "",
    ]
    results = scanner.scan(texts)
    assert len(results) == 4 and results[1] == [] and results[3] == []
    assert [f.segment for f in results[0]] == [0] * len(results[0])
    assert [f.segment for f in results[2]] == [2] * len(results[2])
    assert spans_of(results[0]) == spans_of(results[2])
    assert {(f.entity_type, f.text) for f in results[0]} == {
        ("PERSON", "Maria Garcia"),
        ("EMAIL_ADDRESS", "maria.garcia@example.com"),
    }
    for found in results:
        assert found == sorted(found, key=lambda f: f.start)
        assert all(a.end <= b.start for a, b in zip(found, found[1:], strict=False))
    # the batch result equals scanning each text alone
    assert [spans_of(r) for r in results] == [spans_of(scanner.scan([t])[0]) for t in texts]


def test_finding_fields(scanner):
    [found] = scanner.scan(["Card 4111 1111 1111 1111 was declined."])
    [card] = found
    assert (card.segment, card.entity_type, card.text) == (0, "CREDIT_CARD", "4111 1111 1111 1111")
    assert card.score == 1.0 and card.source == "CreditCardRecognizer"
    with pytest.raises(AttributeError):
        card.score = 0.5  # frozen


def test_each_entity_type_is_detected(scanner):
    cases = {
        "PERSON": "Thanks for waiting, Oluwaseun.",
        "EMAIL_ADDRESS": "Write to jane.doe@example.co.uk please.",
        "PHONE_NUMBER": "My mobile is (415) 382-1947.",
        "CREDIT_CARD": "The card is 5500-0000-0000-0004.",
        "IBAN_CODE": "Refund to DE89 3704 0044 0532 0130 00 please.",
        "US_SSN": "My SSN is 078-05-1121.",
        "IP_ADDRESS": "The router answers on 192.168.1.23.",
        "LOCATION": "Is there an outage in Rotterdam?",
        "STREET_ADDRESS": "Ship it to 221B Baker Street, London.",
    }
    results = scanner.scan(list(cases.values()))
    for (entity_type, _), found in zip(cases.items(), results, strict=True):
        assert entity_type in {f.entity_type for f in found}, entity_type


@pytest.mark.parametrize(
    "text, address",
    [
        ("Send it to 221B Baker Street please", "221B Baker Street"),
        ("Our office is at 1600 Pennsylvania Ave NW, Washington.", "1600 Pennsylvania Ave NW"),
        ("I moved to 42 Elm St., Apt 5 last month", "42 Elm St., Apt 5"),
        ("Mail goes to PO Box 123 now", "PO Box 123"),
        ("Deliver to 7 Queen Victoria Road, Suite 12.", "7 Queen Victoria Road, Suite 12"),
    ],
)
def test_street_address_forms(scanner, text, address):
    [found] = scanner.scan([text])
    assert ("STREET_ADDRESS", address) in {(f.entity_type, f.text) for f in found}


def test_street_address_recognizer_ignores_lowercase_phrases(scanner):
    [found] = scanner.scan(["It broke 2 days ago via the main road and 3 cables lane by lane."])
    assert "STREET_ADDRESS" not in {f.entity_type for f in found}


def test_ner_post_filters_drop_product_plan_and_id_spans(scanner):
    texts = [
        "The Scanner SX90 jams on every page.",
        "Please move me to the Starter Monthly plan.",
        "Reference: CASE-410259 is open.",
    ]
    for found in scanner.scan(texts):
        assert not [f for f in found if f.entity_type in ("PERSON", "LOCATION")]


# Sentence-initial capitalised common words: the small NER model calls them names or places.
SENTENCE_INITIAL_COMMON = {
    "Email me at jane.doe@example.com if the courier needs anything.": ("PERSON", "Email"),
    "Thanks. Ping me at jane.doe@example.com if anything changes.": ("PERSON", "Ping"),
    "Refunds can vary greatly by bank, usually 5-7 business days.": ("LOCATION", "Refunds"),
    "Great. Email is the fastest way to reach me.": ("PERSON", "Email"),
}
SENTENCE_INITIAL_NAMES = {
    "Sarah will call you back tomorrow.": ("PERSON", "Sarah"),
    "Rose called yesterday about the refund.": ("PERSON", "Rose"),
    "Sorry for the wait. Jordan from billing confirmed the refund.": ("PERSON", "Jordan"),
    "Paris is where the parcel is stuck.": ("LOCATION", "Paris"),
    # tagged NN (not PROPN) by the small tagger, which is no evidence of a common word
    "Sorry for the wait. Isabella from billing is taking over.": ("PERSON", "Isabella"),
}


def ner_spans(scanner: PiiScanner, text: str) -> set[tuple[str, str]]:
    """What spaCy's NER alone reports for `text` (Presidio's raw results, before any post-filter)."""
    results = scanner.analyzer.analyze(text, "en", entities=scanner.entities, score_threshold=0.4)
    return {
        (r.entity_type, text[r.start : r.end])
        for r in results
        if r.recognition_metadata.get("recognizer_name") == "SpacyRecognizer"
    }


def test_sentence_initial_common_words_are_dropped(scanner):
    texts = list(SENTENCE_INITIAL_COMMON)
    for text, expected in SENTENCE_INITIAL_COMMON.items():
        assert expected in ner_spans(scanner, text), "the NER no longer makes this mistake"
    for text, found in zip(texts, scanner.scan(texts), strict=True):
        values = {(f.entity_type, f.text) for f in found}
        assert SENTENCE_INITIAL_COMMON[text] not in values, text
        assert {f.entity_type for f in found} <= {"EMAIL_ADDRESS"}, values
    assert ("EMAIL_ADDRESS", "jane.doe@example.com") in {
        (f.entity_type, f.text) for f in scanner.scan(texts)[0]
    }


def test_sentence_initial_names_are_kept(scanner):
    texts = list(SENTENCE_INITIAL_NAMES)
    for text, found in zip(texts, scanner.scan(texts), strict=True):
        assert SENTENCE_INITIAL_NAMES[text] in {(f.entity_type, f.text) for f in found}, text
    tags = scanner._pos_tags(texts)
    assert [tags[i][0][1] for i in (0, 1)] == ["PROPN", "PROPN"]
    isabella = texts[4].index("Isabella")
    assert tags[4][isabella][1:] == ("NOUN", "NN")  # kept although not a proper noun to the tagger


def test_the_same_word_mid_sentence_is_not_affected(scanner):
    """The rule covers sentence openers only: mid-sentence, the NER's reading stands (here a mistake)."""
    text = "I spoke to Sarah and Email support twice."
    [found] = scanner.scan([text])
    assert {("PERSON", "Sarah"), ("PERSON", "Email")} <= {(f.entity_type, f.text) for f in found}


@pytest.mark.parametrize(
    "text, word, initial",
    [
        ("Email me.", "Email", True),
        ("Thanks! Email me.", "Email", True),
        ("Ok: Email me.", "Email", True),
        ("Hi,\n  Email me.", "Email", True),
        ('He said. "Email me."', "Email", True),
        ("Done (Email me).", "Email", False),
        ("(Email me.)", "Email", True),
        ("Please Email me.", "Email", False),
        ("Dr. Rose will see you.", "Rose", False),
        ("Maria Garcia called.", "Maria Garcia", False),
    ],
)
def test_sentence_initial_word_positions(text, word, initial):
    start = text.index(word)
    assert pii._sentence_initial_word(text, start, start + len(word)) is initial


def test_tagger_runs_once_on_candidate_texts_only(monkeypatch):
    scanner = PiiScanner(PiiPolicy())
    assert {"parser", "lemmatizer", "ner"} <= set(scanner._untagging)
    assert not {"tok2vec", "tagger", "attribute_ruler"} & set(scanner._untagging)
    calls = []
    original = scanner._pos_tags

    def recording(texts):
        calls.append(list(texts))
        return original(texts)

    monkeypatch.setattr(scanner, "_pos_tags", recording)
    texts = [
        "Email me at jane.doe@example.com please.",
        "Hi, my name is Maria Garcia.",
        "Is there an outage in Rotterdam?",
        "Refunds can vary greatly by bank.",
        "Email me at jane.doe@example.com please.",
        "Order ORD-123456 was refunded.",
    ]
    found = scanner.scan(texts)
    assert calls == [[texts[0], texts[3]]]  # one batch, unique texts with a candidate
    assert [[f.text for f in fs] for fs in found] == [
        ["jane.doe@example.com"],
        ["Maria Garcia"],
        ["Rotterdam"],
        [],
        ["jane.doe@example.com"],
        [],
    ]


def test_sentence_initial_rule_is_the_same_per_message(scanner):
    """The per-message path (postprocess over Presidio's full pipeline) applies the same rule."""
    from presidio_analyzer import AnalyzerEngine

    naive = AnalyzerEngine(
        registry=scanner.registry,
        nlp_engine=pii.make_nlp_engine(full_pipeline=True),
        supported_languages=["en"],
    )
    texts = [*SENTENCE_INITIAL_COMMON, *SENTENCE_INITIAL_NAMES, "I spoke to Sarah and Email support twice."]
    for text, found in zip(texts, scanner.scan(texts), strict=True):
        results = naive.analyze(
            text, "en", entities=scanner.entities, score_threshold=scanner.policy.threshold
        )
        assert spans_of(found) == [(s, e, t) for s, e, t, _, _ in scanner.postprocess(text, results)], text


def test_place_positions_retype_ner_person_as_location(scanner):
    [found] = scanner.scan(["Please send it to 2532 Lake Blvd, Manchester."])
    assert ("LOCATION", "Manchester") in {(f.entity_type, f.text) for f in found}


def test_keep_pattern_overrides_a_would_be_finding():
    text = "Please call 415-382-1947 about it."
    assert [f.entity_type for f in PiiScanner(PiiPolicy(keep_patterns=[])).scan([text])[0]] == [
        "PHONE_NUMBER"
    ]
    kept = PiiScanner(PiiPolicy(keep_patterns=[r"\b415-382-\d{4}\b"])).scan([text])[0]
    assert kept == []


def test_keep_match_inside_a_larger_finding_does_not_hide_it(scanner):
    # "E097" looks like an error code, but it is one group of a spaced IBAN
    [found] = scanner.scan(["IBAN IT56 E097 7790 5665 3003 7264 930 please."])
    assert [(f.entity_type, f.text) for f in found] == [("IBAN_CODE", "IT56 E097 7790 5665 3003 7264 930")]


def test_allow_list_term_not_flagged():
    text = "Hi Mateo, please forward it to support@acme.example.com and to jane@example.org."
    default = {f.text for f in PiiScanner(PiiPolicy()).scan([text])[0]}
    assert {"Mateo", "support@acme.example.com"} <= default
    allowed = PiiScanner(PiiPolicy(allow_list=["SUPPORT@ACME.EXAMPLE.COM ", "mateo"])).scan([text])[0]
    assert [f.text for f in allowed] == ["jane@example.org"]


def test_custom_recognizer_finds_employee_id():
    policy = PiiPolicy(
        custom_recognizers=[CustomRecognizer(name="employee", entity_type="EMPLOYEE_ID", regex=r"EMP-\d{6}")]
    )
    [found] = PiiScanner(policy).scan(["Employee EMP-123456 asks about part ZX-9911 and order ORD-123456."])
    assert [(f.entity_type, f.text, f.source) for f in found] == [
        ("EMPLOYEE_ID", "EMP-123456", pii.CUSTOM_RECOGNIZER_SOURCE_PREFIX + "employee")
    ]
    assert policy.operator_for("EMPLOYEE_ID") == "pseudonym"


def test_custom_recognizer_context_and_case_sensitivity():
    policy = PiiPolicy(
        threshold=0.5,
        custom_recognizers=[
            CustomRecognizer(
                name="badge", entity_type="BADGE_ID", regex=r"\bB\d{5}\b", score=0.3, context=["badge"]
            )
        ],
    )
    found = PiiScanner(policy).scan(["My badge is B12345.", "Part B12345 shipped.", "my badge is b12345"])
    assert [spans_of(f) for f in found] == [[(12, 18, "BADGE_ID")], [], []]


def test_disabled_type_not_reported():
    text = "Hi Maria Garcia, we emailed maria@example.com and called (415) 382-1947."
    policy = PiiPolicy(enabled_types=[t for t in ENTITY_TYPES if t not in ("EMAIL_ADDRESS", "PERSON")])
    [found] = PiiScanner(policy).scan([text])
    assert {f.entity_type for f in found} == {"PHONE_NUMBER"}


def test_only_pattern_types_skip_the_ner(monkeypatch):
    scanner = PiiScanner(PiiPolicy(enabled_types=["EMAIL_ADDRESS", "PHONE_NUMBER"]))
    assert not scanner.uses_ner

    def no_pipe(*args, **kwargs):
        raise AssertionError("the NER must not run")

    monkeypatch.setattr(pii.get_nlp(), "pipe", no_pipe)
    [found] = scanner.scan(["Maria Garcia: maria@example.com"])
    assert [(f.entity_type, f.text) for f in found] == [("EMAIL_ADDRESS", "maria@example.com")]


def test_nothing_enabled_finds_nothing():
    scanner = PiiScanner(PiiPolicy(enabled_types=[]))
    assert scanner.analyzer is None
    assert scanner.scan(["maria@example.com", ""]) == [[], []]


def test_new_policy_reuses_the_loaded_model(scanner, monkeypatch):
    import spacy

    def no_load(*args, **kwargs):
        raise AssertionError("spaCy model loaded twice")

    monkeypatch.setattr(spacy, "load", no_load)
    started = time.perf_counter()
    for threshold in (0.3, 0.5, 0.7):
        PiiScanner(PiiPolicy(threshold=threshold, allow_list=["x"]))
    assert time.perf_counter() - started < 2.0
    assert pii.get_nlp() is scanner.nlp_engine.nlp["en"]


def test_invalid_policy_is_refused():
    with pytest.raises(ValueError, match="threshold"):
        PiiScanner(PiiPolicy(threshold=2))


def test_logs_hold_counts_not_text(scanner, caplog):
    secret_name, secret_mail = "Siobhan Okafor", "siobhan.okafor@example.com"
    with caplog.at_level(logging.DEBUG):
        scanner.scan([f"Hi, my name is {secret_name}, email {secret_mail}.", "IBAN IT56 E097 7790 5665"])
        PiiScanner(PiiPolicy(enabled_types=["IBAN_CODE"])).scan(["IBAN XX12 3456"])
    assert "pii scan: 2 texts" in caplog.text
    for needle in (secret_name, secret_mail, "IT56", "XX12"):
        assert needle not in caplog.text


def test_presidio_log_records_are_withheld(caplog):
    with caplog.at_level(logging.DEBUG):
        logging.getLogger("presidio-analyzer").error("Failed to validate text %s", "DE89370400440532013000")
        logging.getLogger("presidio-analyzer").debug("Context list is: %s", "maria garcia")
    assert "DE89370400440532013000" not in caplog.text and "maria garcia" not in caplog.text
    assert "withheld" in caplog.text


# --------------------------------------------------------------------------------------------------
# tldextract offline
# --------------------------------------------------------------------------------------------------


def test_tldextract_works_offline_without_network(monkeypatch):
    import requests
    import tldextract.tldextract

    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(requests.Session, "send", refuse)

    started = time.perf_counter()
    extractor = pii.offline_tld_extractor()
    result = extractor("mail.example.co.uk")
    assert (result.domain, result.suffix) == ("example", "co.uk")
    scanner = PiiScanner(PiiPolicy(enabled_types=["EMAIL_ADDRESS"]))
    # Presidio's EmailRecognizer goes through the module-level extractor, which pii replaced
    assert tldextract.tldextract.TLD_EXTRACTOR.suffix_list_urls == ()
    assert tldextract.extract("jane@shop.example.com.au").suffix == "com.au"
    [found] = scanner.scan(["Write to jane.doe@example.co.uk today."])
    assert [f.text for f in found] == ["jane.doe@example.co.uk"]
    assert attempts == []
    assert time.perf_counter() - started < 10


def test_importing_pii_does_not_load_spacy_or_presidio():
    """Web processes import PiiPolicy/Pseudonymizer; spaCy + Presidio (~5 s, ~400 MB) load on first scan."""
    code = (
        "import sys, datasets_app.pii as p; p.PiiPolicy().validate(); "
        "p.Pseudonymizer(b'k').replacement('PHONE_NUMBER', '(415) 382-1947', 'pseudonym'); "
        "print(sorted(m for m in ('spacy', 'presidio_analyzer', 'torch', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_constants_mirror_presidio():
    from presidio_analyzer import RecognizerResult
    from presidio_analyzer.predefined_recognizers import PhoneRecognizer

    assert tuple(PhoneRecognizer.DEFAULT_SUPPORTED_REGIONS) == pii._PHONE_REGIONS
    assert pii._RECOGNIZER_NAME_KEY == RecognizerResult.RECOGNIZER_NAME_KEY
    assert pii.StreetAddressRecognizer().name == "StreetAddressRecognizer"
    assert pii.PersonCueRecognizer().supported_entities == ["PERSON"]


# --------------------------------------------------------------------------------------------------
# Policy
# --------------------------------------------------------------------------------------------------


def test_policy_defaults():
    policy = PiiPolicy()
    assert policy.enabled_types == ENTITY_TYPES
    assert policy.threshold == pii.DEFAULT_THRESHOLD
    assert policy.keep_patterns == DEFAULT_KEEP_PATTERNS and policy.keep_patterns is not DEFAULT_KEEP_PATTERNS
    assert policy.operator_for("PERSON") == "pseudonym"
    assert policy.validate() == []


def test_policy_json_round_trip_and_missing_keys():
    policy = PiiPolicy(
        enabled_types=["PERSON", "EMAIL_ADDRESS", "EMPLOYEE_ID"],
        threshold=0.55,
        custom_recognizers=[
            CustomRecognizer(
                name="emp", entity_type="EMPLOYEE_ID", regex=r"EMP-\d{6}", score=0.7, context=["staff"]
            )
        ],
        allow_list=["Acme"],
        keep_patterns=[r"\bZX-\d{4}\b"],
        operators={"EMAIL_ADDRESS": "mask", "EMPLOYEE_ID": "hash"},
    )
    restored = PiiPolicy.from_dict(json.loads(json.dumps(policy.to_dict())))
    assert restored == policy
    assert PiiPolicy.from_dict({}) == PiiPolicy()
    assert PiiPolicy.from_dict(None) == PiiPolicy()
    partial = PiiPolicy.from_dict({"threshold": 0.6, "custom_recognizers": [{"name": "x", "regex": "X"}]})
    assert partial.threshold == 0.6 and partial.enabled_types == ENTITY_TYPES
    assert partial.custom_recognizers[0].score == 0.85 and partial.custom_recognizers[0].context == []
    assert PiiPolicy.from_dict({"enabled_types": []}).enabled_types == []


def test_policy_validation_messages_name_the_field():
    policy = PiiPolicy(
        enabled_types=["PERSON", "PASSPORT"],
        threshold=1.5,
        custom_recognizers=[
            CustomRecognizer(name="emp", entity_type="EMPLOYEE_ID", regex=r"EMP-(\d{6}"),
            CustomRecognizer(name="emp", entity_type="employee id", regex=r"x", score=3),
        ],
        allow_list=["ok", "  "],
        keep_patterns=[r"\bOK-\d+", r"[unclosed"],
        operators={"PERSON": "blur", "FOO": "mask"},
    )
    errors = policy.validate()
    text = "\n".join(errors)
    assert "enabled_types: unknown entity type 'PASSPORT'" in text
    assert "threshold: must be between 0 and 1, got 1.5" in text
    assert (
        "custom_recognizers[0].regex: invalid regex 'EMP-(\\\\d{6}': missing ), unterminated subpattern"
        in text
    )
    assert "custom_recognizers[1].name: duplicate recognizer name 'emp'" in text
    assert "custom_recognizers[1].entity_type: 'employee id' must be UPPER_SNAKE_CASE" in text
    assert "custom_recognizers[1].score: must be between 0 and 1, got 3" in text
    assert "allow_list[1]: must be a non-empty string" in text
    assert "keep_patterns[1]: invalid regex '[unclosed': unterminated character set" in text
    assert "keep_patterns[0]" not in text
    assert "operators['PERSON']: unknown operator 'blur' (choose from pseudonym, mask, hash, redact)" in text
    assert "operators: unknown entity type 'FOO'" in text
    assert len(errors) == 10
    assert PiiPolicy(threshold="high").validate() == [
        "threshold: must be a number between 0 and 1, got 'high'"
    ]


def test_custom_types_count_as_known():
    policy = PiiPolicy(
        enabled_types=["EMPLOYEE_ID"],
        custom_recognizers=[CustomRecognizer(name="e", entity_type="EMPLOYEE_ID", regex=r"EMP-\d+")],
        operators={"EMPLOYEE_ID": "redact"},
    )
    assert policy.validate() == []
    assert policy.active_types() == ["EMPLOYEE_ID"]


# --------------------------------------------------------------------------------------------------
# Pseudonymisation
# --------------------------------------------------------------------------------------------------


def scrub(pseudo: Pseudonymizer, scanner: PiiScanner, texts: list[str], operators=None) -> list[str]:
    findings = scanner.scan(texts)
    return [pseudo.apply(t, spans_of(f), operators or {}) for t, f in zip(texts, findings, strict=True)]


def test_consistent_pseudonyms_across_texts(scanner):
    pseudo = Pseudonymizer(SECRET)
    out = scrub(
        pseudo,
        scanner,
        [
            "Hi, my name is Maria Garcia. Call me on 415-382-1947.",
            "Thanks Maria Garcia, I'm Kenji Tanaka from support.",
            "Noted, I will call (415) 382 1947 tomorrow.",
            "Hi Maria Garcia, my colleague Kenji Tanaka called +1 415 382 1947.",
        ],
    )
    assert out == [
        "Hi, my name is <PERSON_1>. Call me on <PHONE_NUMBER_1>.",
        "Thanks <PERSON_1>, I'm <PERSON_2> from support.",
        "Noted, I will call <PHONE_NUMBER_1> tomorrow.",
        "Hi <PERSON_1>, my colleague <PERSON_2> called <PHONE_NUMBER_1>.",
    ]


def test_pseudonymizer_mapping_holds_no_raw_values(scanner):
    pseudo = Pseudonymizer(SECRET)
    raw = ["Maria Garcia", "maria.garcia@example.com", "415-382-1947", "4111 1111 1111 1111"]
    text = f"I'm {raw[0]}, {raw[1]}, phone {raw[2]}, card {raw[3]}."
    [scrubbed] = scrub(pseudo, scanner, [text])
    dumped = json.dumps(pseudo.mapping)
    for value in raw:
        assert value not in scrubbed
        assert value not in dumped and value.lower() not in dumped
    assert "4111111111111111" not in dumped and "4153821947" not in dumped
    assert all(len(k) == 64 and int(k, 16) >= 0 for k in pseudo.mapping)
    assert sorted(pseudo.mapping.values()) == [
        "<CREDIT_CARD_1>",
        "<EMAIL_ADDRESS_1>",
        "<PERSON_1>",
        "<PHONE_NUMBER_1>",
    ]


def test_mapping_reload_continues_numbering():
    first = Pseudonymizer(SECRET)
    assert first.replacement("PERSON", "Maria Garcia", "pseudonym") == "<PERSON_1>"
    assert first.replacement("PERSON", "Kenji Tanaka", "pseudonym") == "<PERSON_2>"
    stored = json.loads(json.dumps(first.mapping))
    second = Pseudonymizer(SECRET, stored)
    assert second.replacement("PERSON", "  maria   GARCIA ", "pseudonym") == "<PERSON_1>"
    assert second.replacement("PERSON", "Mr. Kenji Tanaka", "pseudonym") == "<PERSON_2>"
    assert second.replacement("PERSON", "Aisha Khan", "pseudonym") == "<PERSON_3>"
    assert second.replacement("EMAIL_ADDRESS", "a@b.example", "pseudonym") == "<EMAIL_ADDRESS_1>"
    # another secret gives other digests: mappings do not transfer between installations
    assert Pseudonymizer(b"other", stored).replacement("PERSON", "Maria Garcia", "pseudonym") == "<PERSON_3>"


def test_same_value_different_type_gets_different_labels():
    pseudo = Pseudonymizer(SECRET)
    assert pseudo.replacement("PERSON", "Paris", "pseudonym") == "<PERSON_1>"
    assert pseudo.replacement("LOCATION", "Paris", "pseudonym") == "<LOCATION_1>"
    assert len(pseudo.mapping) == 2


def test_operators_output():
    pseudo = Pseudonymizer(SECRET)
    digest = pseudo.digest("EMAIL_ADDRESS", "Jane@Example.com")
    assert pseudo.replacement("EMAIL_ADDRESS", "Jane@Example.com", "pseudonym") == "<EMAIL_ADDRESS_1>"
    assert pseudo.replacement("EMAIL_ADDRESS", "jane@example.com", "hash") == f"<EMAIL_ADDRESS:{digest[:10]}>"
    assert pseudo.replacement("EMAIL_ADDRESS", "jane@example.com", "redact") == "<EMAIL_ADDRESS>"
    assert pseudo.replacement("EMAIL_ADDRESS", "jane@example.com", "mask") == "*" * 16
    assert pseudo.replacement("CREDIT_CARD", "4111 1111 1111 1234", "mask") == "*" * 15 + "1234"
    assert pseudo.replacement("IBAN_CODE", "DE89370400440532013000", "mask") == "*" * 18 + "3000"
    assert pseudo.replacement("PHONE_NUMBER", "(415) 382-1947", "mask") == "**********1947"
    assert pseudo.replacement("PERSON", "Bo", "mask") == "**"
    assert len(pseudo.mapping) == 1  # only pseudonyms are recorded
    with pytest.raises(ValueError, match="unknown operator"):
        pseudo.replacement("PERSON", "Bo", "blur")


def test_apply_uses_per_type_operators_and_reading_order():
    pseudo = Pseudonymizer(SECRET)
    text = "Kenji Tanaka and Maria Garcia paid with 4111 1111 1111 1234 from bob@example.com."
    spans = [(0, 12, "PERSON"), (17, 29, "PERSON"), (40, 59, "CREDIT_CARD"), (65, 80, "EMAIL_ADDRESS")]
    out = pseudo.apply(text, list(reversed(spans)), {"CREDIT_CARD": "mask", "EMAIL_ADDRESS": "redact"})
    assert out == "<PERSON_1> and <PERSON_2> paid with ***************1234 from <EMAIL_ADDRESS>."
    with pytest.raises(ValueError, match="overlap"):
        pseudo.apply(text, [(0, 12, "PERSON"), (5, 20, "PERSON")], {})
    with pytest.raises(ValueError, match="outside"):
        pseudo.apply("short", [(0, 50, "PERSON")], {})
    with pytest.raises(ValueError, match="secret"):
        Pseudonymizer(b"")


@pytest.mark.parametrize(
    "entity_type, a, b",
    [
        ("PHONE_NUMBER", "555-010-1234", "(555) 010 1234"),
        ("PHONE_NUMBER", "(415) 382-1947", "+1 415 382 1947"),
        ("PHONE_NUMBER", "+44 20 7946 0958", "020 7946 0958"),
        ("CREDIT_CARD", "4111-1111-1111-1111", "4111 1111 1111 1111"),
        ("IBAN_CODE", "de89 3704 0044 0532 0130 00", "DE89370400440532013000"),
        ("US_SSN", "078-05-1121", "078 05 1121"),
        ("EMAIL_ADDRESS", " Jane.Doe@Example.COM", "jane.doe@example.com"),
        ("PERSON", "Dr. Maria  Garcia", "maria garcia"),
        ("LOCATION", "São Paulo", "SÃO PAULO"),
        ("IP_ADDRESS", "2001:db8:0:0::1", "2001:DB8::1"),
    ],
)
def test_normalise_value_folds_spellings(entity_type, a, b):
    assert normalise_value(entity_type, a) == normalise_value(entity_type, b)


def test_normalise_value_keeps_different_values_apart():
    assert normalise_value("PHONE_NUMBER", "(415) 382-1947") != normalise_value(
        "PHONE_NUMBER", "(415) 382-1948"
    )
    assert normalise_value("PERSON", "Maria Garcia") != normalise_value("PERSON", "Mario Garcia")


def test_patterns_that_backtrack_exponentially_are_refused():
    """A valid pattern such as ``(a|aa)+$`` makes a backtracking matcher try exponentially many ways on a
    long run of "a": one message like that stalled the scan worker for good. Such patterns are refused
    where they are saved, naming the field; ordinary identifier patterns pass in milliseconds."""
    policy = PiiPolicy(
        custom_recognizers=[CustomRecognizer(name="slow", entity_type="TICKET_ID", regex=r"T-(a|aa)+$")],
        keep_patterns=[r"\bORD-\d{6}\b", r"(x|xx)+y"],
    )
    text = "\n".join(policy.validate())
    assert "custom_recognizers[0].regex: invalid regex 'T-(a|aa)+$': it takes too long on some texts" in text
    assert "keep_patterns[1]: invalid regex '(x|xx)+y': it takes too long on some texts" in text
    assert "keep_patterns[0]" not in text
    assert PiiPolicy().validate() == []  # the defaults (order numbers, SKUs, tickets...) are fine


def test_a_keep_pattern_that_runs_out_of_time_stops_the_scan_with_its_name(monkeypatch):
    """A pattern saved before the check above still cannot stall a worker: the keep-patterns run with
    a time limit, and the scan stops with a message naming the pattern."""
    import regex

    from datasets_app import pii

    monkeypatch.setattr(pii, "KEEP_MATCH_SECONDS", 0.05)
    with pytest.raises(pii.SlowPattern, match=r"keep-pattern '\(a\|aa\)\+\$' took over 0.05 s"):
        pii._keep_spans([regex.compile(r"(a|aa)+$")], "a" * 60 + "!")
    assert pii._keep_spans([regex.compile(r"ORD-\d+")], "see ORD-12 and ORD-345") == [(4, 10), (15, 22)]
