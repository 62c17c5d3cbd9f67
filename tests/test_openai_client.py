"""The official `openai` Python client against a live server (pytest-django's live_server: the studio's
WSGI app on a real HTTP socket, sharing the test database): list models, chat, stream, errors; and one
test with the real SmolLM2 answering a factual question."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest
from conftest import openai_client
from test_serving import HELLO, build_ascii_tiny_model, build_line, save_tiny_adapter

from eval_app.inference import get_model, spec_for_version
from eval_app.models import Alias, ModelVersion, RegisteredModel
from eval_app.services import serving

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(scope="module")
def served_dirs(tmp_path_factory):
    base = build_ascii_tiny_model(tmp_path_factory.mktemp("openai-ascii") / "model")
    return base, save_tiny_adapter(base, tmp_path_factory.mktemp("openai-adapter") / "adapter")


@pytest.fixture
def line(served_dirs, admin_user):
    return build_line(*served_dirs, admin_user)


@pytest.fixture
def raw_key(engineer):
    return serving.create_key(engineer, "openai-client")[1]


@pytest.fixture
def client_for_key(live_server):
    """`client_for_key(key)` → an OpenAI client for the live server. One HTTP connection per request and
    every client closed at teardown, so the server's request threads close their database connections
    (the test database can then be dropped on PostgreSQL)."""
    clients = []

    def make(key: str):
        client = openai_client(live_server.url, key)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


def test_models_and_chat_completion(client_for_key, line, raw_key):
    client = client_for_key(raw_key)
    ids = [m.id for m in client.models.list()]
    assert ids == ["support@production", "support@staging", "support/1", "support/2"]
    assert client.models.retrieve("support@production").owned_by == "studio"

    reply = client.chat.completions.create(
        model="support@production", messages=HELLO, max_tokens=8, temperature=0
    )
    [expected] = get_model(spec_for_version(line[1])).generate([HELLO], max_new_tokens=8, temperature=0)
    assert reply.object == "chat.completion" and reply.model == "support@production"
    assert reply.system_fingerprint == str(line[1])  # the version the alias pointed at
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == expected.text and expected.text
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens == expected.output_tokens
    assert reply.usage.prompt_tokens == expected.prompt_tokens
    assert reply.usage.total_tokens == expected.prompt_tokens + expected.output_tokens


def test_streaming_through_the_client(client_for_key, line, raw_key):
    client = client_for_key(raw_key)
    plain = client.chat.completions.create(model="support/1", messages=HELLO, max_tokens=16, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model="support/1",
            messages=HELLO,
            max_tokens=16,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) >= 3
    assert "".join(pieces) == plain.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        plain.choices[0].finish_reason
    ]
    assert chunks[-1].usage.total_tokens == plain.usage.total_tokens
    assert {c.system_fingerprint for c in chunks} == {"support/1"}


def test_client_errors(client_for_key, line, raw_key, engineer):
    with pytest.raises(openai.AuthenticationError) as exc:
        client_for_key("fts_wrong-key").models.list()
    assert exc.value.status_code == 401 and exc.value.code == "invalid_api_key"
    client = client_for_key(raw_key)
    with pytest.raises(openai.NotFoundError) as exc:
        client.chat.completions.create(model="support@canary", messages=HELLO, max_tokens=4)
    assert exc.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="support/1", messages=HELLO, max_tokens=4, n=2)
    assert exc.value.param == "n"
    key = serving.authenticate(raw_key)
    serving.revoke(engineer, key)
    with pytest.raises(openai.AuthenticationError) as exc:
        client.models.list()
    assert exc.value.code == "revoked_api_key"


@pytest.mark.slow
def test_smollm2_answers_through_the_openai_client(client_for_key, smollm2_dir, admin_user, raw_key):
    from training_app.services import register_local_dir

    base = register_local_dir("SmolLM2-test", Path(smollm2_dir), admin_user)
    line = RegisteredModel.objects.create(name="assistant")
    version = ModelVersion.objects.create(registered_model=line, number=1, base_model=base)
    Alias.objects.create(registered_model=line, name="production", version=version)
    client = client_for_key(raw_key)
    question = [{"role": "user", "content": "What is the capital of France?"}]
    reply = client.chat.completions.create(
        model="assistant@production", messages=question, max_tokens=24, temperature=0
    )
    assert "Paris" in reply.choices[0].message.content
    assert 0 < reply.usage.completion_tokens <= 24
    # the same answer, streamed token by token
    chunks = client.chat.completions.create(
        model="assistant@production", messages=question, max_tokens=24, temperature=0, stream=True
    )
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 3
    assert "".join(pieces).strip() == reply.choices[0].message.content
