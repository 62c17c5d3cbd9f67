"""Serving: API keys (hashed, revocable), the OpenAI-compatible /v1/ API through the Django test client on a
tiny Llama with a real LoRA adapter, streaming, validation errors, `create_api_key`, the keys page and the
playground (role matrix, CSRF, escaping). The official `openai` client against a live server is in
tests/test_openai_client.py."""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from io import StringIO
from pathlib import Path

import pytest
from django.core.exceptions import PermissionDenied
from django.core.management import CommandError, call_command
from django.urls import reverse

from eval_app.inference import get_model, spec_for_version
from eval_app.models import Alias, ApiKey, ModelVersion, RegisteredModel
from eval_app.services import serving
from studio.models import AuditEvent
from studio.roles import ADMIN, CURATOR, ENGINEER, REVIEWER

pytestmark = pytest.mark.django_db

HELLO = [{"role": "user", "content": "where is my parcel"}]


# --- fixtures (the openai-client tests import these helpers too) ------------------------------------------


def build_ascii_tiny_model(path: Path) -> Path:
    """A tiny random Llama whose tokenizer has one token per printable ASCII character: whatever it
    generates decodes to readable text, so streamed pieces and stop strings can be checked exactly
    (a byte-level tokenizer's random output is mostly broken UTF-8)."""
    import string

    from conftest import TINY_CHATML, save_tiny_llama
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    chars = [c for c in string.printable if c not in "\t\n\r\x0b\x0c"]
    backend = Tokenizer(
        models.WordLevel({t: i for i, t in enumerate(specials + chars)}, unk_token=specials[0])
    )
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    tokenizer.chat_template = TINY_CHATML
    tokenizer.save_pretrained(str(path))
    return save_tiny_llama(path, tokenizer)


def save_tiny_adapter(base_dir: Path, out_dir: Path, seed: int = 1) -> Path:
    """A real PEFT LoRA adapter on the tiny model, with non-zero B matrices so it changes the answers."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base_dir))
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(str(out_dir))
    return out_dir


def build_line(base_dir: Path, adapter_dir: Path, user, name: str = "support"):
    """A model line with version 1 (base + adapter, aliased production) and version 2 (the base alone,
    aliased staging)."""
    from training_app.services import register_local_dir

    base = register_local_dir(f"{name}-base", Path(base_dir), user)
    line = RegisteredModel.objects.create(name=name, created_by=user)
    v1 = ModelVersion.objects.create(
        registered_model=line, number=1, base_model=base, artifacts_dir=str(adapter_dir), created_by=user
    )
    v2 = ModelVersion.objects.create(registered_model=line, number=2, base_model=base, created_by=user)
    Alias.objects.create(registered_model=line, name="production", version=v1)
    Alias.objects.create(registered_model=line, name="staging", version=v2)
    return line, v1, v2


@pytest.fixture(scope="session")
def ascii_model_dir(tmp_path_factory):
    return build_ascii_tiny_model(tmp_path_factory.mktemp("ascii-llama") / "model")


@pytest.fixture(scope="session")
def ascii_adapter_dir(ascii_model_dir, tmp_path_factory):
    return save_tiny_adapter(ascii_model_dir, tmp_path_factory.mktemp("ascii-adapter") / "adapter")


@pytest.fixture
def line(ascii_model_dir, ascii_adapter_dir, admin_user):
    return build_line(ascii_model_dir, ascii_adapter_dir, admin_user)


@pytest.fixture
def key(engineer):
    return serving.create_key(engineer, "tests")  # (ApiKey, plaintext)


@pytest.fixture
def api(client_for, key):
    """A Django test client that sends the engineer's key (and no session)."""
    client = client_for(None)
    client.defaults["HTTP_AUTHORIZATION"] = f"Bearer {key[1]}"
    return client


def chat(client, **body):
    body.setdefault("model", "support@production")
    body.setdefault("messages", HELLO)
    return client.post("/v1/chat/completions", json.dumps(body), content_type="application/json")


def sse_events(response) -> list:
    text = b"".join(response.streaming_content).decode()
    assert text.endswith("data: [DONE]\n\n")
    events = [block.removeprefix("data: ") for block in text.split("\n\n") if block]
    return [json.loads(e) for e in events[:-1]]


# --- API keys ----------------------------------------------------------------------------------------------


def test_key_creation_stores_only_the_hash(engineer):
    key, raw = serving.create_key(engineer, "ci")
    assert raw.startswith("fts_") and len(raw) > 40
    row = ApiKey.objects.filter(pk=key.pk).values().get()
    assert raw not in json.dumps(row, default=str)
    assert row["hashed_key"] == hashlib.sha256(raw.encode()).hexdigest()
    assert row["prefix"] == raw[:12] and row["name"] == "ci"
    event = AuditEvent.objects.get(verb="api_key.create")
    assert event.object_id == str(key.pk) and raw not in json.dumps(event.data) + event.object_repr
    assert serving.authenticate(raw) == key
    assert serving.authenticate(raw[:-1] + ("A" if raw[-1] != "A" else "B")) is None


def test_two_keys_differ_and_both_work(engineer):
    (k1, r1), (k2, r2) = serving.create_key(engineer), serving.create_key(engineer)
    assert r1 != r2 and k1.hashed_key != k2.hashed_key
    assert serving.authenticate(r1) == k1 and serving.authenticate(r2) == k2


def test_keys_are_refused_to_roles_without_api_access(reviewer, curator):
    for user in (reviewer, curator):
        with pytest.raises(serving.KeyRefused, match="engineer or admin role"):
            serving.create_key(user)
    assert not ApiKey.objects.exists()


def test_last_used_is_written_at_most_once_a_minute(key):
    from datetime import timedelta

    from django.utils import timezone

    api_key, raw = key
    assert api_key.last_used_at is None
    serving.authenticate(raw)
    first = ApiKey.objects.get(pk=api_key.pk).last_used_at
    assert first is not None
    serving.authenticate(raw)
    assert ApiKey.objects.get(pk=api_key.pk).last_used_at == first  # within the minute: no write
    ApiKey.objects.filter(pk=api_key.pk).update(last_used_at=timezone.now() - timedelta(minutes=2))
    serving.authenticate(raw)
    assert ApiKey.objects.get(pk=api_key.pk).last_used_at > first


def test_revoke_by_owner_and_admin_only(key, make_user, admin_user):
    api_key, raw = key
    other = make_user("otto", ENGINEER)
    with pytest.raises(PermissionDenied, match="owner or an admin"):
        serving.revoke(other, api_key)
    assert serving.authenticate(raw) == api_key
    assert serving.revoke(admin_user, api_key) is True
    assert serving.authenticate(raw) is None
    assert serving.revoke(admin_user, api_key) is False  # already revoked: no second audit event
    assert AuditEvent.objects.filter(verb="api_key.revoke").count() == 1


# --- authentication on /v1/ ---------------------------------------------------------------------------------


def test_missing_key_is_401(client_for, line):
    response = client_for(None).get("/v1/models")
    assert response.status_code == 401
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "missing_api_key"
    assert "Authorization: Bearer" in error["message"]
    assert response["WWW-Authenticate"].startswith("Bearer")


def test_non_bearer_scheme_is_401(client_for, key):
    response = client_for(None).get("/v1/models", HTTP_AUTHORIZATION=f"Basic {key[1]}")
    assert response.status_code == 401 and response.json()["error"]["code"] == "missing_api_key"


def test_wrong_key_is_401(client_for, key):
    for wrong in ("fts_" + "x" * 43, "sk-not-ours", key[1] + "x"):
        response = client_for(None).get("/v1/models", HTTP_AUTHORIZATION=f"Bearer {wrong}")
        assert response.status_code == 401
        assert response.json()["error"] == {
            "message": response.json()["error"]["message"],
            "type": "authentication_error",
            "param": None,
            "code": "invalid_api_key",
        }


def test_revoked_key_is_401(api, key, engineer, line):
    assert api.get("/v1/models").status_code == 200
    serving.revoke(engineer, key[0])
    response = chat(api)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "revoked_api_key"
    assert response.json()["error"]["type"] == "authentication_error"


def test_inactive_users_key_is_401(api, engineer):
    engineer.is_active = False
    engineer.save()
    response = api.get("/v1/models")
    assert response.status_code == 401 and response.json()["error"]["code"] == "inactive_user"


def test_user_who_lost_the_engineer_role_is_403(api, engineer, roles):
    engineer.groups.remove(roles[ENGINEER])
    engineer.groups.add(roles[REVIEWER])
    response = api.get("/v1/models")
    assert response.status_code == 403
    assert response.json()["error"]["type"] == "permission_error"


def test_api_needs_no_session_and_no_csrf_token(client_for, key, line):
    client = client_for(None, enforce_csrf_checks=True)
    response = client.post(
        "/v1/chat/completions",
        json.dumps({"model": "support/9", "messages": HELLO}),
        content_type="application/json",
        HTTP_AUTHORIZATION=f"Bearer {key[1]}",
    )
    assert response.status_code == 404  # got past CSRF and auth to the model lookup
    assert "sessionid" not in response.cookies


def test_per_key_rate_limit(api, settings, line):
    settings.STUDIO_API_RATE_LIMIT = 2
    assert api.get("/v1/models").status_code == 200
    assert api.get("/v1/models").status_code == 200
    response = api.get("/v1/models")
    assert response.status_code == 429
    assert response.json()["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(response["Retry-After"]) <= 61


def test_wrong_method_and_unknown_path_answer_json(api):
    response = api.get("/v1/chat/completions")
    assert response.status_code == 405 and response["Allow"] == "POST"
    assert response.json()["error"]["code"] == "method_not_allowed"
    response = api.get("/v1/completions")
    assert response.status_code == 404 and response.json()["error"]["code"] == "unknown_url"


# --- models ------------------------------------------------------------------------------------------------


def test_models_lists_every_alias_and_version(api, line):
    body = api.get("/v1/models").json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == [
        "support@production",
        "support@staging",
        "support/1",
        "support/2",
    ]
    for model in body["data"]:
        assert (
            model["object"] == "model" and model["owned_by"] == "studio" and model["created"] > 1_600_000_000
        )


def test_model_detail(api, line):
    response = api.get("/v1/models/support/2")
    assert response.status_code == 200 and response.json()["id"] == "support/2"
    assert api.get("/v1/models/support@production").json()["id"] == "support@production"
    response = api.get("/v1/models/support@canary")
    assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"


def test_resolve_model_name(line):
    _, v1, v2 = line
    assert serving.resolve_model_name("support@production") == v1
    assert serving.resolve_model_name("support/2") == v2
    with pytest.raises(ModelVersion.DoesNotExist):
        serving.resolve_model_name("support@nope")
    with pytest.raises(ModelVersion.DoesNotExist):
        serving.resolve_model_name("other/1")
    for bad in ("support", "support/two", ""):
        with pytest.raises(ValueError):
            serving.resolve_model_name(bad)


# --- validation --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"model": None}, "model", "'model' is required"),
        ({"messages": None}, "messages", "non-empty list"),
        ({"messages": []}, "messages", "non-empty list"),
        ({"messages": ["hi"]}, "messages[0]", "must be an object"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", "system, user, assistant"),
        ({"messages": [{"role": "user"}]}, "messages[0].content", "is required"),
        ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content", "must be a string"),
        ({"max_tokens": 0}, "max_tokens", "at least 1"),
        ({"max_tokens": 100000}, "max_tokens", "at most 512"),
        ({"max_completion_tokens": 600}, "max_completion_tokens", "at most 512"),
        ({"max_tokens": "8"}, "max_tokens", "whole number"),
        ({"temperature": 2.5}, "temperature", "between 0 and 2"),
        ({"temperature": True}, "temperature", "must be a number"),
        ({"seed": 2**64}, "seed", "64-bit"),
        ({"stream_options": {"include_usage": True}}, "stream_options", "only allowed when 'stream' is true"),
        ({"n": 2}, "n", "'n' must be 1"),
        ({"stop": 5}, "stop", "string or a list"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
        ({"stream": "yes"}, "stream", "true or false"),
        ({"tools": [{"type": "function"}]}, "tools", "not supported"),
    ],
)
def test_validation_errors_name_the_field(api, line, body, param, words):
    response = chat(api, **body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert words in error["message"] and f"'{param}'" in error["message"]


def test_body_that_is_not_json_is_400(api):
    response = api.post("/v1/chat/completions", "{not json", content_type="application/json")
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_json"
    response = api.post("/v1/chat/completions", "[1, 2]", content_type="application/json")
    assert response.status_code == 400 and "JSON object" in response.json()["error"]["message"]


def test_unknown_model_is_404(api, line):
    for name in ("support@canary", "support/7", "nothing/1", "no-such-shape"):
        response = chat(api, model=name)
        assert response.status_code == 404
        error = response.json()["error"]
        assert error["code"] == "model_not_found" and error["param"] == "model" and name in error["message"]


def test_prompt_longer_than_the_context_is_400(api, line):
    long = [{"role": "user", "content": "the parcel " * 400}]
    response = chat(api, messages=long, max_tokens=8)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "context_length_exceeded" and error["param"] == "messages"
    assert "context of 512 tokens" in error["message"]


def test_missing_artifacts_answer_503_without_paths(api, line, tmp_path):
    _, v1, _ = line
    ModelVersion.objects.filter(pk=v1.pk).update(artifacts_dir=str(tmp_path / "gone"))
    (tmp_path / "gone").mkdir()
    response = chat(api, max_tokens=4)
    assert response.status_code == 503
    error = response.json()["error"]
    assert error["code"] == "model_unavailable" and str(tmp_path) not in error["message"]


# --- completions -------------------------------------------------------------------------------------------


def test_chat_completion_round_trip(api, line, key, caplog):
    _, v1, _ = line
    with caplog.at_level(logging.INFO, logger="eval_app.api"):
        response = chat(api, max_tokens=8, temperature=0)
    assert response.status_code == 200
    body = response.json()
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    assert body["model"] == "support@production" and isinstance(body["created"], int)
    # which version answered: the alias is resolved in the fingerprint and the header
    assert body["system_fingerprint"] == str(v1) == "support/1"
    assert response["X-Studio-Model-Version"] == "support/1"
    [choice] = body["choices"]
    assert choice["index"] == 0 and choice["message"]["role"] == "assistant"
    # the same answer the shared loader gives for version 1 (base + its adapter), greedy
    loaded = get_model(spec_for_version(v1))
    assert loaded.spec.adapter_dir == v1.artifacts_dir
    [expected] = loaded.generate([HELLO], max_new_tokens=8, temperature=0)
    assert choice["message"]["content"] == expected.text
    usage = body["usage"]
    prompt_ids = loaded.tokenizer(loaded.render(HELLO), add_special_tokens=False)["input_ids"]
    assert usage["prompt_tokens"] == len(prompt_ids)
    assert usage["completion_tokens"] == expected.output_tokens
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert choice["finish_reason"] == ("length" if expected.output_tokens == 8 else "stop")
    # the request log: key prefix, model and counts, never the message or the answer
    [record] = [r for r in caplog.records if "api chat:" in r.getMessage()]
    line_text = record.getMessage()
    assert key[0].prefix in line_text and "support@production" in line_text
    assert f"completion_tokens={usage['completion_tokens']}" in line_text
    assert "parcel" not in line_text and key[1] not in line_text
    if expected.text:
        assert expected.text not in line_text


def test_alias_and_version_name_give_the_same_model(api, line):
    a = chat(api, model="support@staging", max_tokens=6, temperature=0).json()
    b = chat(api, model="support/2", max_tokens=6, temperature=0).json()
    assert a["choices"][0]["message"] == b["choices"][0]["message"]
    assert a["model"] == "support@staging" and b["model"] == "support/2"
    assert a["system_fingerprint"] == b["system_fingerprint"] == "support/2"


def test_the_adapter_changes_the_answer(api, line):
    """Version 1 is base + a LoRA adapter, version 2 the base alone: the API serves them apart."""
    with_adapter = chat(api, model="support/1", max_tokens=12, temperature=0).json()
    base_only = chat(api, model="support/2", max_tokens=12, temperature=0).json()
    assert with_adapter["choices"][0]["message"]["content"] != base_only["choices"][0]["message"]["content"]


def test_sampling_with_a_seed_is_repeatable(api, line):
    first = chat(api, max_tokens=10, temperature=1.5, seed=7).json()["choices"][0]["message"]["content"]
    again = chat(api, max_tokens=10, temperature=1.5, seed=7).json()["choices"][0]["message"]["content"]
    assert first == again


def test_streaming_gives_the_same_text_in_chunks(api, line):
    plain = chat(api, max_tokens=12, temperature=0).json()
    response = chat(api, max_tokens=12, temperature=0, stream=True, stream_options={"include_usage": True})
    assert response.status_code == 200 and response["Content-Type"] == "text/event-stream"
    events = sse_events(response)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(e["object"] == "chat.completion.chunk" and e["id"] == events[0]["id"] for e in events)
    pieces = [e["choices"][0]["delta"].get("content", "") for e in events[1:] if e["choices"]]
    assert len([p for p in pieces if p]) >= 3  # token by token, not all at the end
    assert "".join(pieces).strip() == plain["choices"][0]["message"]["content"]
    finish = [e for e in events if e["choices"] and e["choices"][0]["finish_reason"]]
    assert [e["choices"][0]["finish_reason"] for e in finish] == [plain["choices"][0]["finish_reason"]]
    assert events[-1]["choices"] == [] and events[-1]["usage"] == plain["usage"]


def test_stop_sequence_cuts_the_answer(api, line):
    sampled = {"max_tokens": 24, "temperature": 1.0, "seed": 3}  # varied text, the same on every call
    text = chat(api, **sampled).json()["choices"][0]["message"]["content"]
    stop = next(c for c in text if text.index(c) >= 3)
    expected = text[: text.index(stop)]
    body = chat(api, **sampled, stop=[stop, "never-generated"]).json()
    assert body["choices"][0]["message"]["content"] == expected
    assert body["choices"][0]["finish_reason"] == "stop"
    events = sse_events(chat(api, **sampled, stop=stop, stream=True))
    streamed = "".join(e["choices"][0]["delta"].get("content", "") for e in events)
    assert streamed == expected
    assert events[-1]["choices"][0]["finish_reason"] == "stop"


def test_closing_a_stream_early_releases_the_model(api, line):
    """When a client goes away the server closes the response, which closes this iterator: generation
    stops and the model's lock is free for the next request."""
    _, v1, _ = line
    pieces = serving.stream(v1, HELLO, serving.ChatParams(max_tokens=400, temperature=0))
    assert isinstance(next(pieces), str)  # the first piece, long before 400 tokens
    started = time.perf_counter()
    pieces.close()
    assert time.perf_counter() - started < 5
    assert not [t for t in threading.enumerate() if t.name == "studio-api-stream"]
    loaded = get_model(spec_for_version(v1))
    assert loaded.lock.acquire(timeout=10), "generation kept the model's lock after the client left"
    loaded.lock.release()
    assert chat(api, max_tokens=4, temperature=0).status_code == 200


# --- create_api_key ------------------------------------------------------------------------------------------


def test_create_api_key_command_prints_a_working_key(engineer, client_for, line):
    out = StringIO()
    call_command("create_api_key", "erin", "--name", "deploy", stdout=out)
    raw = out.getvalue().strip().splitlines()[-1]
    key = ApiKey.objects.get()
    assert key.name == "deploy" and key.user == engineer and key.hashed_key == serving.hash_key(raw)
    response = client_for(None).get("/v1/models", HTTP_AUTHORIZATION=f"Bearer {raw}")
    assert response.status_code == 200
    event = AuditEvent.objects.get(verb="api_key.create")
    assert event.actor_name == "cli"


def test_create_api_key_command_refuses(reviewer):
    with pytest.raises(CommandError, match="No user named 'nobody'"):
        call_command("create_api_key", "nobody", stdout=StringIO())
    with pytest.raises(CommandError, match="engineer or admin role"):
        call_command("create_api_key", "rene", stdout=StringIO())
    assert not ApiKey.objects.exists()


# --- keys page -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("url_name", ["eval:api_keys", "eval:playground"])
def test_serving_pages_role_matrix(client_for, make_user, url_name, line):
    expected = {CURATOR: 403, REVIEWER: 403, ENGINEER: 200, ADMIN: 200}
    for role, status in expected.items():
        user = make_user(f"user-{role}", role)
        assert client_for(user).get(reverse(url_name)).status_code == status, role
    response = client_for(None).get(reverse(url_name))
    assert response.status_code == 302 and "/login/" in response["Location"]


def test_keys_page_shows_the_new_key_once(client_for, engineer):
    client = client_for(engineer)
    response = client.post(reverse("eval:api_key_create"), {"name": "chatbot"})
    assert response.status_code == 200
    key = ApiKey.objects.get()
    raw = response.context["raw_key"]
    assert key.hashed_key == serving.hash_key(raw)
    html = response.content.decode()
    assert raw in html and f'data-copy="{raw}"' in html and "cannot be recovered" in html
    assert "no-store" in response["Cache-Control"]
    page = client.get(reverse("eval:api_keys")).content.decode()
    assert raw not in page and f"{key.prefix}…" in page and "chatbot" in page


def test_resubmitting_the_key_form_does_not_mint_a_second_key(client_for, engineer):
    """A browser refresh of the page that shows a new key re-posts its form: the form's one-use token
    turns the second post into a redirect with an explanation, and no second key exists."""
    client = client_for(engineer)
    once = client.get(reverse("eval:api_keys")).context["form"]["once"].value()
    assert once and len(once) >= 16
    first = client.post(reverse("eval:api_key_create"), {"name": "chatbot", "once": once})
    assert first.status_code == 200 and ApiKey.objects.count() == 1
    # the page showing the key carries a fresh token for the next key
    assert first.context["form"]["once"].value() not in ("", once)
    again = client.post(reverse("eval:api_key_create"), {"name": "chatbot", "once": once}, follow=True)
    assert ApiKey.objects.count() == 1
    html = again.content.decode()
    assert "That form was already used" in html and first.context["raw_key"] not in html
    # the session remembers spent tokens only, never a key
    assert client.session["api_key_forms_used"] == [once]
    fresh = again.context["form"]["once"].value()
    assert client.post(reverse("eval:api_key_create"), {"name": "ci", "once": fresh}).status_code == 200
    assert ApiKey.objects.count() == 2


def test_keys_page_lists_only_own_keys_and_admin_sees_all(client_for, engineer, make_user, admin_user):
    other = make_user("otto", ENGINEER)
    mine, _ = serving.create_key(engineer, "mine")
    theirs, _ = serving.create_key(other, "theirs")
    page = client_for(engineer).get(reverse("eval:api_keys")).content.decode()
    assert mine.prefix in page and theirs.prefix not in page
    page = client_for(admin_user).get(reverse("eval:api_keys")).content.decode()
    assert mine.prefix in page and theirs.prefix in page and "otto" in page


def test_revoke_from_the_page(client_for, engineer, make_user, admin_user):
    other = make_user("otto", ENGINEER)
    mine, raw = serving.create_key(engineer)
    theirs, _ = serving.create_key(other)
    client = client_for(engineer)
    assert client.get(reverse("eval:api_key_revoke", args=[mine.pk])).status_code == 405
    assert client.post(reverse("eval:api_key_revoke", args=[theirs.pk])).status_code == 404
    response = client.post(reverse("eval:api_key_revoke", args=[mine.pk]), follow=True)
    assert "is revoked" in response.content.decode()
    assert serving.authenticate(raw) is None
    assert ApiKey.objects.get(pk=theirs.pk).active
    client_for(admin_user).post(reverse("eval:api_key_revoke", args=[theirs.pk]))
    assert not ApiKey.objects.get(pk=theirs.pk).active


def test_keys_page_forms_need_csrf(client_for, engineer):
    key, _ = serving.create_key(engineer)
    client = client_for(engineer, enforce_csrf_checks=True)
    assert client.post(reverse("eval:api_key_create"), {"name": "x"}).status_code == 403
    assert client.post(reverse("eval:api_key_revoke", args=[key.pk])).status_code == 403
    assert ApiKey.objects.count() == 1 and ApiKey.objects.get().active


# --- playground ----------------------------------------------------------------------------------------------


def send(client, **data):
    data.setdefault("model_a", "support@production")
    data.setdefault("model_b", "support/2")
    data.setdefault("message", "where is my parcel")
    data.setdefault("max_tokens", 6)
    data.setdefault("temperature", 0)
    return client.post(reverse("eval:playground_send"), data, HTTP_HX_REQUEST="true")


def test_playground_lists_servable_models(client_for, engineer, line):
    html = client_for(engineer).get(reverse("eval:playground")).content.decode()
    for name in ("support@production", "support@staging", "support/1", "support/2"):
        assert f'value="{name}"' in html


def test_playground_chats_with_two_models_side_by_side(client_for, engineer, line):
    client = client_for(engineer)
    response = send(client, system="Answer <b>briefly</b>.", history_a="[]", history_b="[]")
    assert response.status_code == 200
    assert "<html" not in response.content.decode()  # the HTMX fragment, not the page
    turns = response.context["sides"]
    api_a = serving.complete(
        serving.resolve_model_name("support@production"),
        [{"role": "system", "content": "Answer <b>briefly</b>."}, *HELLO],
        serving.ChatParams(max_tokens=6, temperature=0),
    )
    assert turns[0]["history"] == [*HELLO, {"role": "assistant", "content": api_a.text}]
    assert turns[0]["completion"].completion_tokens == api_a.completion_tokens
    assert turns[1]["completion"] is not None and turns[1]["error"] == ""
    html = response.content.decode()
    assert "Answer &lt;b&gt;briefly&lt;/b&gt;." in html and "<b>briefly</b>" not in html
    assert "Latency" in html and "Answer tokens" in html
    # the second message carries each side's own history
    response = send(
        client,
        message="and <script>x</script>?",
        history_a=turns[0]["history_json"],
        history_b=turns[1]["history_json"],
    )
    sides = response.context["sides"]
    assert [m["role"] for m in sides[0]["history"]] == ["user", "assistant", "user", "assistant"]
    assert sides[0]["history"][:2] == turns[0]["history"] and sides[1]["history"][:2] == turns[1]["history"]
    html = response.content.decode()
    assert "&lt;script&gt;x&lt;/script&gt;" in html and "<script>x</script>" not in html
    assert 'name="history_a"' in html and "&quot;role&quot;" in html


def test_playground_reports_problems_in_plain_words(client_for, engineer, line):
    client = client_for(engineer)
    response = send(client, history_a="{broken")
    assert "history on the page is damaged" in response.content.decode()
    response = send(client, message="")
    assert "Write a message" in response.content.decode()
    response = send(client, message="the parcel " * 400, max_tokens=8)
    assert response.context["sides"][0]["error"].startswith("The prompt is")
    assert response.context["sides"][0]["history"] == []


def test_playground_without_models_explains(client_for, engineer):
    html = client_for(engineer).get(reverse("eval:playground")).content.decode()
    assert "Nothing to chat with yet" in html


# --- review findings: defaults, stop strings, damaged files, concurrent loads ------------------------------


def test_without_max_tokens_the_answer_gets_what_the_context_leaves(api, line, settings):
    settings.STUDIO_API_MAX_TOKENS = 512  # the tiny model's whole context: prompt + 512 would not fit
    response = chat(api, temperature=0)
    assert response.status_code == 200, response.json()
    usage = response.json()["usage"]
    assert usage["prompt_tokens"] + usage["completion_tokens"] <= 512
    full = [{"role": "user", "content": "the parcel " * 400}]
    assert chat(api, messages=full).json()["error"]["code"] == "context_length_exceeded"


def test_stop_strings_end_generation_and_usage_counts_the_tokens_up_to_them(api, line):
    sampled = {"max_tokens": 24, "temperature": 1.0, "seed": 3}
    text = chat(api, **sampled).json()["choices"][0]["message"]["content"]
    stop = next(c for c in text if text.index(c) >= 3)
    plain = chat(api, **sampled, stop=stop).json()
    events = sse_events(chat(api, **sampled, stop=stop, stream=True, stream_options={"include_usage": True}))
    assert plain["choices"][0]["message"]["content"] == text[: text.index(stop)]
    assert plain["usage"] == events[-1]["usage"]
    assert plain["usage"]["completion_tokens"] < 24


def test_damaged_weights_answer_503(api, line, tmp_path):
    import shutil

    from eval_app.inference import clear_cache

    _, v1, _ = line
    damaged = tmp_path / "adapter"
    shutil.copytree(v1.artifacts_dir, damaged)
    weights = damaged / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    ModelVersion.objects.filter(pk=v1.pk).update(artifacts_dir=str(damaged))
    clear_cache()
    response = chat(api, max_tokens=4)
    assert response.status_code == 503 and response.json()["error"]["code"] == "model_unavailable"


def test_models_are_loaded_one_at_a_time_in_a_process(line, monkeypatch):
    """transformers' from_pretrained swaps process-wide functions while it loads: two loads at once
    (of different models) break every later load, so loads are serialised."""
    import threading
    import time

    from eval_app import inference

    _, v1, v2 = line
    inference.clear_cache()
    active, most = [0], [0]
    real_init = inference.LoadedModel.__init__

    def counting_init(self, spec, device=None):
        active[0] += 1
        most[0] = max(most[0], active[0])
        time.sleep(0.2)
        try:
            real_init(self, spec, device)
        finally:
            active[0] -= 1

    monkeypatch.setattr(inference.LoadedModel, "__init__", counting_init)
    specs = [inference.spec_for_version(v) for v in (v1, v2)]
    threads = [threading.Thread(target=inference.get_model, args=(spec,)) for spec in specs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert most[0] == 1
    assert all(spec.key in inference._cache for spec in specs)


def test_openai_values_this_server_used_to_refuse(api, line):
    greedy = chat(api, max_tokens=6, temperature=0).json()["choices"][0]["message"]["content"]
    assert (
        chat(api, max_tokens=6, temperature=1.0, top_p=0).json()["choices"][0]["message"]["content"] == greedy
    )
    assert chat(api, max_tokens=4, seed=-5).status_code == 200
    history = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None},
        {"role": "user", "content": "and?"},
    ]
    assert chat(api, max_tokens=4, messages=history).status_code == 200
