"""Garbled input on every URL of the studio: never a 500, never a traceback.

Every URL pattern of the project is enumerated from the resolver (a new one fails
`test_every_url_has_a_spec` until it is described in SPEC below), reversed with real ids of a small world,
and sent, as an admin and as a user of the role the view is meant for:

- GETs with each query parameter the view reads set to garbled values, one at a time and all at once
  (also as an HTMX request, which some views answer with a fragment);
- POSTs with each form field set to garbled values, one at a time, the other fields valid;
- ids that do not exist, and ids no database integer holds, in the path: 404;

and a POST without a CSRF token is refused (403) on every URL that takes POSTs, except the API (bearer keys).

The parameter names come from two places: every lookup a view makes in request.GET / request.POST /
request.FILES while answering a plain request is recorded (so a form's fields are found without listing
them), and SPEC adds the names read only on other paths. The API's "fields" are the keys of its JSON body.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from types import SimpleNamespace

import pytest
from conftest import TEST_PASSWORD
from django.core import signing
from django.core.files.uploadedfile import SimpleUploadedFile
from django.http import QueryDict
from django.test import Client
from django.urls import URLPattern, URLResolver, get_resolver, reverse
from django.utils.datastructures import MultiValueDict
from test_datasets_roles import world as world  # noqa: F401 - the fixture: a dataset, upload, version…
from test_eval_stats import World as VotesWorld
from test_gate import World as GateWorld

pytestmark = pytest.mark.django_db

# =====================================================================================================
# Garbled values
# =====================================================================================================

# Each value a person (or a tampered form) can send: empty, negative, zero, a number int() reads but no
# 64-bit database column holds, thousands of digits (int() refuses more than 4,300), a fraction, letters,
# a NUL byte, a lone percent sign, a very long string, a float that overflows to infinity, the same name
# twice, a non-ASCII letter, markup.
HUGE = "9" * 20
GARBLED = (
    "",
    "-3",
    "0",
    HUGE,
    "9" * 5000,
    "1.5",
    "abc",
    "\x00",
    "%",
    "x" * 10_000,
    "1e309",
    ["1", "2"],
    "ı",
    "<script>",
)
# One parameter or field at a time gets the values that tell apart what can go wrong with its kind of
# value; every value of GARBLED still reaches every one in the all-at-once requests. (Markup and a
# non-ASCII letter are about escaping and encoding, which a page does alike for every field, and a fraction
# is "letters" to int() and a valid value to float(): those three only go all at once.) A form field is
# "numeric" when its valid value is a number; a query parameter, or a field without a valid value, gets
# QUERY.
QUERY = tuple(v for v in GARBLED if v not in ("<script>", "ı", "1.5"))
NUMERIC = ("", "-3", "0", HUGE, "9" * 5000, "1e309", "abc", ["1", "2"])
TEXT = ("", "\x00", "x" * 10_000, ["1", "2"])
# The second person (the role the URL is for, when not admin) repeats the classes most often mishandled:
# one field at a time a sign and too many digits, all fields at once a few more.
SECOND = ("-3", "9" * 5000)
SECOND_ALL = ("", "-3", HUGE, "9" * 5000, "abc", "\x00", ["1", "2"])
# The HTMX variant, for the views that ask whether a request came from HTMX (and answer it with a fragment):
# all parameters at once for a GET, one field at a time for a POST.
HTMX_VALUES = ("", "-3", HUGE, "9" * 5000, "abc", "\x00")


def values_for(valid) -> tuple:
    """The values one form field gets on its own."""
    if valid is None:
        return QUERY
    try:
        float(valid)
    except (TypeError, ValueError):
        return TEXT
    return NUMERIC


# The same, as JSON values of the API's body (plus what only JSON can carry).
GARBLED_JSON = (
    "",
    -3,
    0,
    1.5,
    "abc",
    "\x00",
    "x" * 10_000,
    10**30,
    -(10**30),
    1e308,
    float("inf"),  # json.dumps writes Infinity and NaN, and json.loads reads them back
    float("nan"),
    ["1", "2"],
    [],
    {},
    None,
    True,
    "<script>",
)
# Raw bodies json.loads itself refuses or chokes on (digits past int()'s limit, nesting past recursion).
GARBLED_API_BODIES = (
    b"",
    b"\x00",
    b"\xff\xfe",
    b"9" * 5000,
    b'{"model": ' + b"9" * 5000 + b"}",
    b"[" * 100_000,
    b'{"model": "x", "messages": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    b"Infinity",
    b"NaN",
    b'"text"',
)

# Path segments standing for an id: none of them names a row (the last two no database integer holds).
MISSING_IDS = ("999999", "0", HUGE, "9" * 5000)


def shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:30]}…({len(text)} chars)"


# =====================================================================================================
# Every URL pattern of the project
# =====================================================================================================

INTERNAL_MODULES = ("django.contrib.admin", "django.contrib.staticfiles", "django.views.static")


def url_patterns() -> dict[str, str]:
    """{key: route}: every pattern of the project, keyed by its namespaced name (unnamed ones by their
    route), Django's admin and static-file views left out."""

    def walk(patterns, route="", namespace=""):
        for p in patterns:
            if isinstance(p, URLResolver):
                ns = f"{namespace}:{p.namespace}" if namespace and p.namespace else p.namespace or namespace
                yield from walk(p.url_patterns, route + str(p.pattern), ns)
            elif isinstance(p, URLPattern):
                if p.callback.__module__.startswith(INTERNAL_MODULES) or namespace == "admin":
                    continue
                full = route + str(p.pattern)
                key = (f"{namespace}:{p.name}" if namespace else p.name) if p.name else full
                yield key, full

    return dict(walk(get_resolver().url_patterns))


PATTERNS = url_patterns()


# =====================================================================================================
# What each URL is for, the ids it is reversed with, a valid POST
# =====================================================================================================


@dataclass(frozen=True)
class Url:
    role: str  # who the view is for: a key of the world's users, "anon" or "api"
    kwargs: Callable = lambda w, who: {}  # path arguments from the world (per user where it matters)
    get: tuple = ()  # query parameters read only on paths a plain GET does not take
    post: tuple = ()  # form fields read only on paths a plain POST does not take
    data: Callable = lambda w, who: {}  # a valid POST, called afresh for each request
    reset: Callable | None = None  # puts the world back after a POST that used up its object
    path: str = ""  # for an unnamed pattern: the path to request
    relogin: bool = False  # the URL signs the user out


def pk(attr: str) -> Callable:
    return lambda w, who: {"pk": getattr(w, attr).pk}


def _user_create(w, who):
    return {
        "username": "newbie",
        "email": "newbie@example.test",
        "first_name": "New",
        "last_name": "Bie",
        "password1": TEST_PASSWORD,
        "password2": TEST_PASSWORD,
        "roles": "reviewer",
    }


def _job_form(w, who):
    from training_app import forms as training_forms

    data = training_forms.initial_for("smoke")
    data.update(dataset_version=w.dsv.pk, base_model=w.base.pk, model_name="fuzz-line", replay_version="")
    return {k: ("on" if v is True else "" if v in (False, None) else v) for k, v in data.items()}


def _run_form(w, who):
    return {
        "candidate": w.v1.pk,
        "baseline_kind": "base",
        "baseline_version": "",
        "dataset_version": w.dsv.pk,
        "split": "golden",
        "max_new_tokens": 16,
        "temperature": 0,
        "seed": 0,
        "batch_size": 4,
        "limit": "",
    }


def _example_edit(w, who):
    from datasets_app.services import datasets

    w.ex.refresh_from_db()
    return {
        "content_0": "hi there",
        "content_1": "hello",
        "split": "train",
        "tags": "greeting",
        "chosen": "",
        "rejected": "",
        "loaded": datasets.edit_token(w.ex),
    }


def _example_mark(w, who):
    from datasets_app.services import datasets

    w.ex.refresh_from_db()
    return {"segment": 0, "start": 0, "end": 2, "entity_type": "PERSON", "loaded": datasets.edit_token(w.ex)}


def _upload_file(w, who):
    line = b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n'
    return {"file": SimpleUploadedFile("more.jsonl", line), "format": ""}


def _reopen_mapping(w):
    from datasets_app.models import Upload

    Upload.objects.filter(pk=w.csv_upload.pk).update(status=Upload.Status.NEEDS_MAPPING)


def _vote(w, who):
    from eval_app.views_votes import SHOWN_AT_SALT

    return {"choice": "a", "comment": "", "shown_at": signing.dumps(f"{time.time():.3f}", salt=SHOWN_AT_SALT)}


def _unvote(w):
    """The reviewers' open comparisons claimed and unvoted again, so each POST meets a comparison to vote on."""
    from eval_app.models import Assignment, Comparison, Vote

    open_ids = list(w.open_comparisons.values())
    Vote.objects.filter(comparison_id__in=open_ids).delete()
    Comparison.objects.filter(pk__in=open_ids).update(votes_count=0)
    Assignment.objects.filter(comparison_id__in=open_ids).update(skipped=False)


def _reactivate_canary(w):
    from eval_app.models import Canary

    Canary.objects.filter(pk=w.canary.pk).update(active=True)


def _playground(w, who):
    return {
        "model_a": w.serving_name,
        "model_b": w.serving_name,
        "system": "",
        "message": "hi",
        "temperature": 0,
        "max_tokens": 4,
        "history_a": "",
        "history_b": "",
    }


def _approve(w, who):
    return {
        "comment": "looks good",
        "override": "",
        "justification": "",
        "override_seen": "",
        "evidence_seen": str(w.evidence.pk),
    }


def comparison(w, who):
    return {"pk": w.open_comparisons.get(who, w.voted_comparison.pk)}


SPEC: dict[str, Url] = {
    # --- studio shell --------------------------------------------------------------------------------
    "home": Url("curator"),
    "login": Url(
        "anon", get=("next",), data=lambda w, who: {"username": "ada", "password": "not-the-password"}
    ),
    "logout": Url("curator", get=("next",), post=("next",), relogin=True),
    "users": Url("admin", get=("q", "role", "status", "page")),
    "user_create": Url("admin", data=_user_create),
    "user_edit": Url(
        "admin",
        kwargs=pk("target"),
        data=lambda w, who: {
            "email": "t@example.test",
            "first_name": "T",
            "last_name": "U",
            "roles": "reviewer",
        },
    ),
    "user_set_active": Url("admin", kwargs=pk("target"), data=lambda w, who: {"active": "1"}),
    "user_password": Url(
        "admin",
        kwargs=pk("target"),
        data=lambda w, who: {"new_password1": "Another-Horse-7-x", "new_password2": "Another-Horse-7-x"},
    ),
    "audit": Url("admin", get=("actor", "verb", "object_type", "object_id", "since", "until", "page")),
    "audit_event": Url("admin", kwargs=pk("event")),
    "audit_event_json": Url("admin", kwargs=pk("event")),
    # --- datasets ------------------------------------------------------------------------------------
    "datasets:list": Url("curator"),
    "datasets:create": Url(
        "curator",
        data=lambda w, who: {"name": "Fuzzed", "kind": "sft", "description": "", "base_model": ""},
    ),
    "datasets:detail": Url("curator", kwargs=pk("ds")),
    "datasets:settings": Url(
        "curator",
        kwargs=pk("ds"),
        data=lambda w, who: {
            "enabled_types": "PERSON",
            "threshold": "0.5",
            "custom_recognizers": "",
            "allow_list": "",
            "keep_patterns": "",
            "op_PERSON": "mask",
        },
    ),
    "datasets:scan_status": Url("curator", kwargs=pk("ds")),
    "datasets:upload_new": Url("curator", kwargs=pk("ds"), data=_upload_file),
    "datasets:pii": Url("curator", kwargs=pk("ds"), get=("decision", "type", "page")),
    "datasets:pii_decide": Url(
        "curator", kwargs=pk("ds"), data=lambda w, who: {"action": "reject", "finding": str(w.finding.pk)}
    ),
    "datasets:pii_decide_type": Url(
        "curator", kwargs=pk("ds"), data=lambda w, who: {"action": "reject", "type": "PERSON"}
    ),
    "datasets:pii_rescan": Url("curator", kwargs=pk("ds")),
    "datasets:examples": Url("curator", kwargs=pk("ds"), get=("q", "tag", "split", "state", "page")),
    "datasets:duplicates": Url("curator", kwargs=pk("ds"), get=("show", "page")),
    "datasets:duplicate_decide_all": Url(
        "curator", kwargs=pk("ds"), data=lambda w, who: {"decision": "keep_all"}
    ),
    "datasets:split": Url(
        "curator",
        kwargs=pk("ds"),
        data=lambda w, who: {"train": 80, "eval": 10, "golden": 10, "seed": 42},
    ),
    "datasets:freeze": Url("curator", kwargs=pk("ds"), data=lambda w, who: {"changelog": "fuzz"}),
    "datasets:upload": Url("curator", kwargs=pk("upload")),
    "datasets:upload_mapping": Url(
        "curator",
        kwargs=pk("csv_upload"),
        data=lambda w, who: {"prompt": "question", "response": "answer", "system": "", "tags": ""},
        reset=_reopen_mapping,
    ),
    "datasets:upload_rejects": Url("curator", kwargs=pk("upload")),
    "datasets:example": Url(
        "curator",
        kwargs=pk("ex"),
        post=("content_0", "content_1", "split", "tags", "chosen", "rejected", "loaded"),
        data=_example_edit,
    ),
    "datasets:example_mark": Url(
        "curator",
        kwargs=pk("ex"),
        post=("segment", "start", "end", "entity_type", "loaded"),
        data=_example_mark,
    ),
    "datasets:example_drop": Url("curator", kwargs=pk("ex"), data=lambda w, who: {"drop": "0"}),
    "datasets:duplicate_decide": Url(
        "curator", kwargs=pk("group"), data=lambda w, who: {"decision": "keep_all"}
    ),
    "datasets:version": Url(
        "engineer", kwargs=pk("version"), get=("epochs", "batch_size", "grad_accum", "max_length")
    ),
    "datasets:version_export": Url("engineer", kwargs=pk("version")),
    "datasets:version_diff": Url(
        "engineer", kwargs=lambda w, who: {"pk": w.version.pk, "other": w.version.pk}, get=("page",)
    ),
    # --- training ------------------------------------------------------------------------------------
    "training:base_models": Url("engineer"),
    "training:base_model_add": Url(
        "admin",
        data=lambda w, who: {
            "name": "Fuzz",
            "source_kind": "local_dir",
            "source": "/nonexistent",
            "license": "",
        },
    ),
    "training:base_model_status": Url("admin", kwargs=pk("base"), data=lambda w, who: {"status": "active"}),
    "training:jobs": Url("engineer"),
    "training:job_new": Url("engineer", get=("preset", "dataset_version"), data=_job_form),
    "training:job_estimate": Url("engineer", data=_job_form),
    "training:job": Url("engineer", kwargs=pk("job")),
    "training:job_live": Url("engineer", kwargs=pk("job")),
    "training:job_cancel": Url("engineer", kwargs=pk("queued_job")),
    "training:job_resume": Url("engineer", kwargs=pk("failed_job")),
    "training:job_priority": Url(
        "engineer", kwargs=pk("queued_job"), data=lambda w, who: {"direction": "up"}
    ),
    "training:job_merge": Url("engineer", kwargs=pk("job")),
    "training:job_artifact": Url(
        "engineer", kwargs=lambda w, who: {"pk": w.job.pk, "name": "adapter/adapter_config.json"}
    ),
    # --- model registry, runs, canaries --------------------------------------------------------------
    "eval:models": Url("engineer"),
    "eval:model": Url("engineer", kwargs=pk("promoted_line")),
    "eval:version": Url("engineer", kwargs=pk("v1"), get=("alias",)),
    "eval:lineage": Url("engineer", kwargs=pk("v1")),
    "eval:runs": Url("engineer"),
    "eval:run_new": Url("engineer", get=("version",), data=_run_form),
    "eval:run": Url("engineer", kwargs=pk("evidence"), get=("page",)),
    "eval:run_live": Url("engineer", kwargs=pk("evidence"), get=("was",)),
    "eval:run_cancel": Url("engineer", kwargs=pk("evidence")),
    "eval:canaries": Url(
        "curator", data=lambda w, who: {"value": f"canary-{time.monotonic_ns()}", "label": "fuzz"}
    ),
    "eval:canary_deactivate": Url("curator", kwargs=pk("canary"), reset=_reactivate_canary),
    # --- blind reviews -------------------------------------------------------------------------------
    "eval:reviews": Url("reviewer"),
    "eval:review_next": Url("reviewer", post=("run",), data=lambda w, who: {"run": str(w.vote_run.pk)}),
    "eval:review": Url(
        "reviewer", kwargs=comparison, post=("choice", "comment", "shown_at"), data=_vote, reset=_unvote
    ),
    "eval:review_skip": Url("reviewer", kwargs=comparison, reset=_unvote),
    "eval:review_done": Url("reviewer", kwargs=lambda w, who: {"pk": w.voted_comparison.pk}),
    "eval:run_stats": Url("engineer", kwargs=pk("evidence")),
    # --- approval gate -------------------------------------------------------------------------------
    "eval:promotions": Url("admin"),
    "eval:promotion": Url("engineer", kwargs=pk("req")),
    "eval:promotion_approve": Url(
        "admin",
        kwargs=pk("req"),
        post=("comment", "override", "justification", "override_seen", "evidence_seen"),
        data=_approve,
    ),
    "eval:promotion_reject": Url(
        "admin", kwargs=pk("req"), data=lambda w, who: {"comment": "not yet, sorry"}
    ),
    "eval:promotion_cancel": Url("requester", kwargs=pk("req")),
    "eval:promotion_request": Url(
        "engineer",
        kwargs=lambda w, who: {"version_pk": w.v3.pk},
        post=("alias", "eval_run", "comment"),
        data=lambda w, who: {"alias": "staging", "eval_run": str(w.evidence.pk), "comment": "fuzz"},
    ),
    "eval:rollback": Url("admin", kwargs=pk("promoted_line"), data=lambda w, who: {"alias": "production"}),
    # --- serving pages -------------------------------------------------------------------------------
    "eval:api_keys": Url("engineer"),
    "eval:api_key_create": Url("engineer", data=lambda w, who: {"name": "fuzz", "once": ""}),
    "eval:api_key_revoke": Url("engineer", kwargs=pk("key")),
    "eval:playground": Url("engineer", get=("a", "b")),
    "eval:playground_send": Url("engineer", data=_playground),
    # --- the API (bearer keys; its fields are the JSON body's keys, see test_api_json_fields) -------
    "api_models": Url("api"),
    "api_model": Url("api", kwargs=lambda w, who: {"name": w.serving_name}),
    "api_chat_completions": Url("api"),
    "v1/^(?P<rest>.*)$": Url("api", path="/v1/no/such/endpoint"),
}

API_FIELDS = (
    "model",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "seed",
    "n",
    "stop",
    "stream",
    "stream_options",
    "user",
)


# =====================================================================================================
# The world: a dataset with an upload, findings, duplicates and a version (test_datasets_roles), a model
# line with versions, runs, votes, aliases and a pending promotion (test_gate), open comparisons
# (test_eval_stats), jobs in several states, a canary, an API key, people in every role
# =====================================================================================================


class FuzzWorld(SimpleNamespace):
    """The world's objects as attributes; the parts that cost most to build are made when a URL first
    needs them (one world is built for each URL)."""

    @cached_property
    def req(self):
        """A pending promotion of v3 to production, after production went to v1 and then v2 (so a
        rollback has somewhere to go and the playground and API have a model to name)."""
        from eval_app.services import gate

        self.g.promote(self.v1)
        self.g.promote(self.v2)
        return gate.request_promotion(self.g.requester, self.v3, "production")

    @cached_property
    def promoted_line(self):
        return self.req.version.registered_model

    @cached_property
    def serving_name(self) -> str:
        return f"{self.promoted_line.name}@production"

    @cached_property
    def vote_run(self):
        """A finished run of v3 with four comparisons no one has voted on yet."""
        return VotesWorld(self.g.trainer, self.g.base, self.g.data, self.g.line).run(self.v3, n=4)

    @cached_property
    def open_comparisons(self) -> dict:
        """{person: the comparison of vote_run they hold (claimed, not voted)}."""
        from eval_app.services import voting

        return {who: voting.claim_next(self.users[who], self.vote_run).pk for who in ("reviewer", "admin")}


@pytest.fixture
def fz(world, make_user, curator, admin_user, settings, tmp_path):  # noqa: F811 - `world` is the fixture
    from datasets_app.models import Upload
    from datasets_app.services import imports
    from eval_app.models import Canary, Comparison
    from eval_app.services import serving
    from studio.models import AuditEvent
    from training_app.models import TrainingJob

    settings.STUDIO_API_RATE_LIMIT = 0  # the limiter still runs; it must not answer for the parser
    settings.STUDIO_LOGIN_MAX_ATTEMPTS = settings.STUDIO_LOGIN_MAX_ATTEMPTS_PER_IP = 10**6

    g = GateWorld(make_user, curator)
    w = FuzzWorld(**world, g=g, dsv=g.data, base=g.base, line=g.line)
    w.v1, w.v2, w.v3 = g.version(), g.version(), g.version()
    g.good_run(w.v1)
    g.good_run(w.v2)
    w.evidence = g.good_run(w.v3)
    w.voted_comparison = Comparison.objects.filter(run=w.evidence).first()  # voted by g.voter
    w.users = {
        "admin": admin_user,
        "curator": curator,
        "engineer": g.trainer,
        "requester": g.requester,
        "reviewer": g.voter,
    }

    w.job = w.v1.training_job
    artifacts = tmp_path / "artifacts" / "job"
    (artifacts / "adapter").mkdir(parents=True)
    (artifacts / "adapter" / "adapter_config.json").write_text("{}")
    TrainingJob.objects.filter(pk=w.job.pk).update(artifacts_dir=str(artifacts))
    common = {"dataset_version": g.data, "base_model": g.base, "method": "lora", "created_by": g.trainer}
    w.queued_job = TrainingJob.objects.create(state=TrainingJob.State.QUEUED, **common)
    w.failed_job = TrainingJob.objects.create(state=TrainingJob.State.FAILED, **common)

    csv = tmp_path / "pairs.csv"
    csv.write_text("question,answer\nwhere is it,on its way\n")
    w.csv_upload = imports.receive_path(w.ds, curator, csv)
    Upload.objects.filter(pk=w.csv_upload.pk).update(status=Upload.Status.NEEDS_MAPPING)

    w.target = make_user("target", "reviewer")
    w.canary = Canary.objects.create(value="canary-fuzz-0001", label="fuzz", created_by=curator)
    w.key, w.raw_key = serving.create_key(g.trainer, "fuzz")
    w.event = AuditEvent.objects.order_by("id").last()
    return w


@pytest.fixture(autouse=True)
def _no_template_contexts(monkeypatch):
    """The test client keeps a copy of every template's context for response.context; these tests never
    read it, and the copies cost a third of the time of a large page."""
    import django.test.client

    monkeypatch.setattr(django.test.client, "store_rendered_templates", lambda *args, **kwargs: None)


def client_as(w, who: str, **kwargs) -> Client:
    """A client that turns a 500 into a status (response.exc_info keeps the exception)."""
    if who == "api":
        return Client(
            raise_request_exception=False, headers={"authorization": f"Bearer {w.raw_key}"}, **kwargs
        )
    client = Client(raise_request_exception=False, **kwargs)
    if who != "anon":
        client.force_login(w.users[who])
    return client


def people(spec: Url) -> tuple[str, ...]:
    """Who sends the requests: an admin (who may do everything) and the role the URL is for."""
    if spec.role in ("anon", "api"):
        return (spec.role,)
    return tuple(dict.fromkeys(("admin", spec.role)))


def url_for(key: str, w, who: str) -> str:
    spec = SPEC[key]
    return spec.path or reverse(key, kwargs=spec.kwargs(w, who))


# =====================================================================================================
# Which names a view reads: every MultiValueDict lookup during one request
# =====================================================================================================

IGNORED_NAMES = {"csrfmiddlewaretoken", "_probe", "HX-Request"}


@contextlib.contextmanager
def recording_lookups():
    """The names looked up in the request's data while the block runs, and "HX-Request" when the view
    asked whether the request came from HTMX (then it has a fragment answer of its own to check)."""
    from django_htmx.middleware import HtmxDetails

    names: set[str] = set()
    originals = {
        name: getattr(MultiValueDict, name) for name in ("__getitem__", "get", "getlist", "__contains__")
    }
    htmx_bool = HtmxDetails.__bool__

    def wrap(original):
        def looked_up(self, key, *args, **kwargs):
            # request.GET or request.POST, whichever carries the probe (not reverse()'s dicts)
            if isinstance(self, QueryDict) and dict.__contains__(self, "_probe") and isinstance(key, str):
                names.add(key)
            return original(self, key, *args, **kwargs)

        return looked_up

    def asked_htmx(self):
        names.add("HX-Request")
        return htmx_bool(self)

    for name, original in originals.items():
        setattr(MultiValueDict, name, wrap(original))
    HtmxDetails.__bool__ = asked_htmx
    try:
        yield names
    finally:
        for name, original in originals.items():
            setattr(MultiValueDict, name, original)
        HtmxDetails.__bool__ = htmx_bool


# =====================================================================================================
# Checking one response
# =====================================================================================================


# Far beyond any page's time, even on a loaded machine: a garbled value that holds the request this long
# (a 10,000-character keep-pattern took minutes) ties up a web worker, as bad as a 500.
SLOW_SECONDS = 20


def problem(response) -> str | None:
    """What is wrong with a response (None: nothing): a 500, or a traceback in the body. A 503 counts too:
    the "database unavailable" page (studio.middleware) answering a bad value says the wrong thing; only
    the API's JSON 503 (the named model cannot be loaded here) is an answer."""
    api_503 = response.status_code == 503 and response.get("Content-Type") == "application/json"
    if response.status_code >= 500 and not api_503:
        exc = getattr(response, "exc_info", None)
        cause = f"{exc[0].__name__}: {str(exc[1])[:200]}" if exc else "no exception recorded"
        return f"{response.status_code} ({cause})"
    # (read through the test client's wrapper, which closes a streamed response; closing one here would
    # fire request_finished, and with it close the test's database connection)
    body = b"".join(response.streaming_content) if response.streaming else response.content
    if b"Traceback" in body:
        return "a traceback in the body"
    return None


class Sender:
    """Sends requests for one URL as one person and records every failure."""

    def __init__(self, key: str, w, who: str, failures: list[str]):
        self.key, self.w, self.who, self.failures = key, w, who, failures
        self.spec = SPEC[key]
        self.client = client_as(w, who)
        self.url = url_for(key, w, who)
        self.sent = 0

    def send(self, method: str, what: str, data=None, *, htmx=False, content_type=None, body=None):
        started = time.monotonic()
        headers = {"HX-Request": "true"} if htmx else {}
        if method == "GET":
            response = self.client.get(self.url, data or {}, headers=headers)
        elif body is not None:
            response = self.client.post(self.url, body, content_type=content_type, headers=headers)
        else:
            response = self.client.post(self.url, data or {}, headers=headers)
        self.sent += 1
        found = problem(response)
        seconds = time.monotonic() - started
        if not found and seconds > SLOW_SECONDS:
            found = f"{response.status_code} after {seconds:.0f} s (a web worker held that long: refuse the input)"
        if found:
            self.failures.append(f"{self.who} {method} {self.url} {what}: {found}")
        if self.spec.reset and method == "POST":
            self.spec.reset(self.w)
        if self.spec.relogin:
            self.client.force_login(self.w.users[self.who])
        return response


# =====================================================================================================
# The tests
# =====================================================================================================


def test_every_url_has_a_spec():
    """A URL added to the project must be described in SPEC (its role, ids, form) to be checked here."""
    assert set(PATTERNS) - set(SPEC) == set(), "URL patterns without a SPEC entry"
    assert set(SPEC) - set(PATTERNS) == set(), "SPEC entries for URL patterns that no longer exist"


def discover(sender: Sender, method: str, data: dict) -> tuple[object, set[str]]:
    """Send a plain request marked with `_probe` and return the response and the names the view looked up
    in the request's data (`_probe` keeps a form bound and tells that QueryDict from the other one)."""
    with recording_lookups() as names:
        response = sender.send(method, f"(a plain {method})", {**data, "_probe": "1"})
    return response, names


@pytest.mark.parametrize("key", sorted(PATTERNS))
def test_garbled_input_never_gives_a_500(fz, key):
    """Garbled query parameters and form fields, one at a time and all at once, as an admin and as the
    role the URL is for; and ids that name no row in its path, which must give 404."""
    spec = SPEC[key]
    failures: list[str] = []
    for n, who in enumerate(people(spec)):
        s = Sender(key, fz, who, failures)
        valid = spec.data(fz, who)
        first, get_names = discover(s, "GET", {})
        posted, post_names = discover(s, "POST", valid)
        gets, posts = first.status_code != 405, posted.status_code != 405
        assert gets or posts, f"{key}: neither GET nor POST is answered"
        if gets:
            names = sorted((get_names | set(spec.get)) - IGNORED_NAMES)
            for name in names:
                for value in QUERY if n == 0 else SECOND:
                    s.send("GET", f"{name}={shown(value)}", {name: value})
            for value in (GARBLED if n == 0 else SECOND_ALL) if names else ():  # every parameter at once
                s.send("GET", f"all of {names}={shown(value)}", dict.fromkeys(names, value))
            for value in HTMX_VALUES if names and "HX-Request" in get_names and n == 0 else ():  # fragment
                s.send("GET", f"HTMX, all of {names}={shown(value)}", dict.fromkeys(names, value), htmx=True)
        if posts:
            names = sorted((post_names | set(spec.post) | set(valid)) - IGNORED_NAMES)
            for name in names:
                for value in values_for(valid.get(name)) if n == 0 else SECOND:
                    s.send("POST", f"{name}={shown(value)}", {**spec.data(fz, who), name: value})
            for value in (GARBLED if n == 0 else SECOND_ALL) if names else ():
                s.send("POST", f"all of {names}={shown(value)}", dict.fromkeys(names, value))
            if "HX-Request" in post_names and n == 0:  # the HTMX answer, one field at a time
                for name in names:
                    for value in HTMX_VALUES:
                        data = {**spec.data(fz, who), name: value}
                        s.send("POST", f"HTMX, {name}={shown(value)}", data, htmx=True)
        check_missing_ids(key, fz, who, gets, posts, failures, MISSING_IDS if n == 0 else MISSING_IDS[:1])
    assert not failures, f"{len(failures)} failures:\n" + "\n".join(failures[:40])


def check_missing_ids(key, w, who, gets, posts, failures, missing) -> None:
    """Each id in the path replaced by one that names no row, or that no database integer holds: 404."""
    spec = SPEC[key]
    if spec.path:
        return
    client = client_as(w, who)
    kwargs = spec.kwargs(w, who)
    for arg in [a for a, v in kwargs.items() if isinstance(v, int)]:
        for value in missing:
            url = reverse(key, kwargs={**kwargs, arg: 999999}).replace("999999", value)
            for method in ("GET",) * gets + ("POST",) * posts:
                if method == "GET":
                    response = client.get(url)
                else:
                    response = client.post(url, spec.data(w, who))
                found = problem(response)
                if found or response.status_code != 404:
                    status = found or response.status_code
                    failures.append(f"{who} {method} {shown(url)}: {status} (expected 404: no such {arg})")


GARBLED_NAMES = ("../../../etc/passwd", "a" * 5000, "%00", "%2e%2e/%2e%2e/x", "ı/<script>", "adapter/")


@pytest.mark.parametrize("key", ["training:job_artifact", "api_model"])
def test_garbled_names_in_the_path_give_404(fz, key):
    failures = []
    for who in people(SPEC[key]):
        client = client_as(fz, who)
        kwargs = SPEC[key].kwargs(fz, who)
        for name in GARBLED_NAMES:
            url = reverse(key, kwargs={**kwargs, "name": "NAME"}).replace("NAME", name)
            response = client.get(url)
            found = problem(response)
            if found or response.status_code != 404:
                failures.append(f"{who} GET {shown(url)}: {found or response.status_code} (expected 404)")
    assert not failures, "\n".join(failures)


def test_api_json_fields(fz):
    """POST /v1/chat/completions with each field of its body garbled, one at a time, the others valid;
    then bodies the JSON parser itself refuses."""
    failures: list[str] = []
    s = Sender("api_chat_completions", fz, "api", failures)
    valid = {"model": fz.serving_name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    for name in API_FIELDS:
        for value in GARBLED_JSON:
            body = json.dumps({**valid, name: value})
            s.send("POST", f"json {name}={shown(value)}", body=body, content_type="application/json")
    for value in GARBLED_JSON:  # inside a message
        for part in ("role", "content"):
            body = json.dumps({**valid, "messages": [{"role": "user", "content": "hi", part: value}]})
            s.send(
                "POST", f"json messages[0].{part}={shown(value)}", body=body, content_type="application/json"
            )
    for raw in GARBLED_API_BODIES:
        s.send("POST", f"body {shown(raw)}", body=raw, content_type="application/json")
    assert not failures, "\n".join(failures[:40])


def test_posts_without_a_csrf_token_are_refused(fz):
    """Every URL that takes POSTs refuses one without a CSRF token (403), except the API (bearer keys)."""
    checked = []
    for key, spec in SPEC.items():
        if spec.role == "api":
            continue
        who = "admin" if spec.role != "anon" else "anon"
        client = client_as(fz, who, enforce_csrf_checks=True)
        url = url_for(key, fz, who)
        response = client.post(url, spec.data(fz, who))
        if response.status_code == 405:  # a page without a form
            continue
        assert response.status_code == 403, f"{key}: POST without a CSRF token gave {response.status_code}"
        checked.append(key)
    assert "datasets:freeze" in checked and "eval:promotion_approve" in checked and "login" in checked


def test_patterns_too_long_to_check_are_form_errors(world, curator):  # noqa: F811 - `world` is the fixture
    """A keep-pattern or recognizer of thousands of characters is refused with the line and the limit, at
    once (checking it for backtracking took minutes); one that does not compile still says why."""
    client = client_as(SimpleNamespace(users={"curator": curator}), "curator")
    url = reverse("datasets:settings", args=[world["ds"].pk])
    valid = SPEC["datasets:settings"].data(None, "curator")
    for field, line in (("keep_patterns", "x" * 10_000), ("custom_recognizers", "LONG_ID: " + "9" * 5000)):
        started = time.monotonic()
        response = client.post(url, {**valid, field: f"ORD-\\d{{6}}\n{line}"})
        page = response.content.decode()
        assert response.status_code == 200 and time.monotonic() - started < SLOW_SECONDS
        assert "Line 2: the " in page and "characters long; at most 500 are allowed" in page, field
    response = client.post(url, {**valid, "keep_patterns": "(" * 600})
    assert response.status_code == 200 and "invalid regex" in response.content.decode()
