"""Webhook outbox: HMAC signature, delivery to a real local HTTP server (exact body and headers), retries
with exponential back-off, giving up, per-URL bookkeeping, and no double sending by concurrent
deliverers."""

from __future__ import annotations

import json
import threading
import time
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import wait_for
from django.db import connection
from django.utils import timezone
from test_gate import World

from eval_app.models import WebhookEvent
from eval_app.services import webhooks
from eval_app.tasks import deliver_webhooks

pytestmark = pytest.mark.django_db

SECRET = "test-webhook-secret"


@pytest.fixture(autouse=True)
def _webhook_settings(settings):
    settings.STUDIO_WEBHOOK_SECRET = SECRET
    settings.STUDIO_WEBHOOK_URLS = []  # events are written without asking a broker; tests set URLs after
    settings.STUDIO_WEBHOOK_MAX_ATTEMPTS = 3


class Receiver:
    """A real HTTP server on 127.0.0.1 recording every request; `status` decides the answer."""

    def __init__(self, status=200, delay=0.0):
        self.status, self.delay = status, delay
        self.requests: list[dict] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                time.sleep(receiver.delay)
                self.send_response(receiver.status)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def url(self, path="/hook") -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    servers = []

    def make(**kw) -> Receiver:
        servers.append(Receiver(**kw))
        return servers[-1]

    yield make
    for server in servers:
        server.close()


def test_signature_verifies_and_a_tampered_body_fails():
    event = webhooks.enqueue_event("model.promoted", {"model": "support", "alias": "production", "n": 1})
    assert event.signature.startswith("sha256=") and len(event.signature) == 7 + 64
    assert webhooks.verify_signature(SECRET, event.body, event.signature)
    assert webhooks.verify_signature(SECRET.encode(), event.body.encode(), event.signature)
    tampered = event.body.replace('"production"', '"staging"')
    assert tampered != event.body
    assert not webhooks.verify_signature(SECRET, tampered, event.signature)
    assert not webhooks.verify_signature("another-secret", event.body, event.signature)
    assert not webhooks.verify_signature(SECRET, event.body, None)


def test_body_is_canonical_json_with_an_envelope():
    event = webhooks.enqueue_event("model.promoted", {"b": 2, "a": {"z": 1, "y": "é"}})
    assert event.body == json.dumps(json.loads(event.body), sort_keys=True, separators=(",", ":"))
    envelope = json.loads(event.body)
    assert envelope["id"] == event.pk and envelope["event"] == "model.promoted"
    assert envelope["data"] == {"b": 2, "a": {"z": 1, "y": "é"}}
    assert envelope["created_at"] == event.created_at.isoformat()


def test_secret_falls_back_to_secret_key(settings):
    settings.STUDIO_WEBHOOK_SECRET = ""
    event = webhooks.enqueue_event("model.promoted", {"x": 1})
    assert webhooks.verify_signature(settings.SECRET_KEY, event.body, event.signature)


def test_delivery_sends_the_exact_body_and_headers(receiver, settings):
    server = receiver()
    event = webhooks.enqueue_event("model.promoted", {"model": "support", "alias": "production"})
    settings.STUDIO_WEBHOOK_URLS = [server.url()]
    before = int(time.time())
    assert deliver_webhooks() == 1  # the Celery task's body, run here
    (request,) = server.requests
    assert request["path"] == "/hook"
    assert request["body"] == event.body.encode()
    headers = request["headers"]
    assert headers["Content-Type"] == "application/json"
    assert headers["X-Studio-Event"] == "model.promoted"
    assert headers["X-Studio-Delivery"] == str(event.pk)
    assert headers["X-Studio-Signature"] == event.signature
    assert before <= int(headers["X-Studio-Timestamp"]) <= int(time.time())
    assert webhooks.verify_signature(SECRET, request["body"], headers["X-Studio-Signature"])
    event.refresh_from_db()
    assert event.delivered_at is not None and event.attempts == 1 and event.last_error == ""
    assert webhooks.deliver_pending() == 0 and len(server.requests) == 1  # never sent twice


def test_failure_retries_with_back_off_then_gives_up(receiver, settings):
    server = receiver(status=500)
    event = webhooks.enqueue_event("model.rolled_back", {"alias": "production"})
    settings.STUDIO_WEBHOOK_URLS = [server.url()]
    now = timezone.now()
    assert webhooks.deliver_pending(now) == 0
    event.refresh_from_db()
    assert event.attempts == 1 and event.delivered_at is None and not event.gave_up
    assert event.last_error == f"127.0.0.1:{server.server.server_address[1]}: HTTP 500"
    assert event.next_attempt_at == now + timedelta(seconds=30)
    # not due yet: nothing is sent
    assert webhooks.deliver_pending(now + timedelta(seconds=29)) == 0 and len(server.requests) == 1
    webhooks.deliver_pending(now + timedelta(seconds=31))
    event.refresh_from_db()
    assert event.attempts == 2 and event.next_attempt_at == now + timedelta(seconds=31 + 60)
    webhooks.deliver_pending(now + timedelta(seconds=31 + 61))  # third and last attempt (max 3)
    event.refresh_from_db()
    assert event.attempts == 3 and event.gave_up and event.next_attempt_at is None
    assert len(server.requests) == 3
    server.status = 200
    assert webhooks.deliver_pending(now + timedelta(days=1)) == 0 and len(server.requests) == 3


def test_unreachable_url_is_a_recorded_failure(settings):
    event = webhooks.enqueue_event("model.promoted", {"x": 1})
    settings.STUDIO_WEBHOOK_URLS = ["http://127.0.0.1:9/nothing-listens-here"]
    assert webhooks.deliver_pending() == 0
    event.refresh_from_db()
    assert event.attempts == 1 and event.last_error.startswith("127.0.0.1:9: ")


def test_back_off_doubles_and_is_capped():
    assert [webhooks.backoff(n).total_seconds() for n in (1, 2, 3, 4)] == [30, 60, 120, 240]
    assert webhooks.backoff(30).total_seconds() == 3600


def test_a_retry_skips_urls_that_already_accepted(receiver, settings):
    good, bad = receiver(), receiver(status=503)
    event = webhooks.enqueue_event("model.promoted", {"x": 1})
    settings.STUDIO_WEBHOOK_URLS = [good.url(), bad.url()]
    now = timezone.now()
    assert webhooks.deliver_pending(now) == 0
    bad.status = 200
    assert webhooks.deliver_pending(now + timedelta(minutes=1)) == 1
    assert len(good.requests) == 1 and len(bad.requests) == 2
    event.refresh_from_db()
    assert event.delivered_at is not None and len(event.delivered_to) == 2


def test_without_urls_events_wait_in_the_outbox(settings):
    event = webhooks.enqueue_event("model.promoted", {"x": 1})
    assert webhooks.deliver_pending() == 0
    event.refresh_from_db()
    assert event.attempts == 0 and event.delivered_at is None and not event.gave_up
    summary = webhooks.outbox_summary()
    assert summary["configured"] is False and summary["pending"] == 1


def test_only_one_claim_wins():
    event = webhooks.enqueue_event("model.promoted", {"x": 1})
    seen = event.next_attempt_at
    lease = timezone.now() + timedelta(minutes=1)
    assert webhooks._claim(event.pk, seen, lease) is True
    assert webhooks._claim(event.pk, seen, lease) is False  # the second deliverer saw the same row


@pytest.mark.django_db(transaction=True)
def test_concurrent_deliverers_never_send_an_event_twice(receiver, settings):
    server = receiver(delay=0.2)
    events = [webhooks.enqueue_event("model.promoted", {"n": i}) for i in range(3)]
    settings.STUDIO_WEBHOOK_URLS = [server.url()]
    start = threading.Barrier(4)
    delivered = []

    def deliver():
        try:
            start.wait(5)
            delivered.append(webhooks.deliver_pending())
        finally:
            connection.close()

    threads = [threading.Thread(target=deliver) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sum(delivered) == 3
    assert sorted(int(r["headers"]["X-Studio-Delivery"]) for r in server.requests) == [e.pk for e in events]
    assert WebhookEvent.objects.filter(delivered_at__isnull=False, attempts=1).count() == 3


def test_receiver_example_from_the_readme_accepts_a_real_delivery(receiver, settings):
    """The README's receiver snippet, run against what the studio sends."""
    import hmac as hmac_module
    from hashlib import sha256

    server = receiver()
    webhooks.enqueue_event("model.promoted", {"serving_name": "support@production"})
    settings.STUDIO_WEBHOOK_URLS = [server.url()]
    webhooks.deliver_pending()
    (request,) = server.requests
    body, signature = request["body"], request["headers"]["X-Studio-Signature"]

    def verify(secret: bytes, body: bytes, signature: str) -> bool:
        expected = "sha256=" + hmac_module.new(secret, body, sha256).hexdigest()
        return hmac_module.compare_digest(expected, signature)

    assert verify(SECRET.encode(), body, signature)
    assert json.loads(body)["data"]["serving_name"] == "support@production"


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_an_approval_is_delivered_by_a_real_worker(start_worker, receiver, settings, make_user, curator):
    """Approve → the outbox row commits with the alias move → on commit the delivery task goes to the
    broker → a real `celery worker` on queue "curation" POSTs the signed event to a live receiver."""
    server = receiver()
    settings.STUDIO_WEBHOOK_URLS = [server.url("/deploy")]
    worker = start_worker("curation", STUDIO_WEBHOOK_URLS=server.url("/deploy"), STUDIO_WEBHOOK_SECRET=SECRET)
    world = World(make_user, curator)
    version = world.version()
    world.good_run(version)
    req = world.promote(version)
    event = WebhookEvent.objects.get()
    wait_for(lambda: server.requests, worker, timeout=120, what="the webhook delivery")
    (request,) = server.requests
    assert request["path"] == "/deploy" and request["body"] == event.body.encode()
    assert webhooks.verify_signature(SECRET, request["body"], request["headers"]["X-Studio-Signature"])
    assert json.loads(request["body"])["data"]["promotion"] == req.pk
    wait_for(
        lambda: WebhookEvent.objects.filter(pk=event.pk, delivered_at__isnull=False).exists(),
        worker,
        timeout=30,
        what="the worker to mark the event delivered",
    )


def test_credentials_in_the_url_are_sent_as_basic_authentication(receiver, settings):
    """`https://user:token@host/...` is how many receivers (CI servers, chat tools) take a token: urllib
    read the user:token part as part of the host name, so such a URL never received anything."""
    import base64

    server = receiver()
    webhooks.enqueue_event("model.promoted", {"model": "support"})
    settings.STUDIO_WEBHOOK_URLS = [server.url().replace("http://", "http://deploy:s3cr%40t@")]
    assert webhooks.deliver_pending() == 1
    (request,) = server.requests
    assert request["path"] == "/hook"
    assert request["headers"]["Authorization"] == "Basic " + base64.b64encode(b"deploy:s3cr@t").decode()
