"""Faults in the backing services: PostgreSQL or Redis down while people use the web UI.

Each test runs against a PRIVATE PostgreSQL cluster (initdb into a temporary folder, its own port) and
a PRIVATE redis-server, and a real gunicorn process of the studio pointing at them, so stopping a
service here never disturbs the suite's own database and broker. The web server is never restarted:
it must answer a calm 503 page within seconds while a service is down, and work again once it is back.

PostgreSQL and Redis come from Debian packages (`.ci/run` installs them); without them the tests fail
with a message saying what to install.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from glob import glob
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration]

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "Correct-Horse-Battery-9"
FAST = 5.0  # seconds: "answers quickly" while a service is down (connect timeout is 2 s here)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listens on port {port} after {timeout} s")


# =====================================================================================================
# Private services
# =====================================================================================================


class Postgres:
    """A throwaway PostgreSQL cluster (trust auth, loopback only). As root, run as the `postgres` user."""

    def __init__(self):
        pg_bins = sorted(glob("/usr/lib/postgresql/*/bin/initdb"))
        if not pg_bins:
            pytest.fail(
                "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb): "
                "apt-get install postgresql (the CI script .ci/run does)"
            )
        self.bin = Path(pg_bins[-1]).parent
        self.dir = Path(tempfile.mkdtemp(prefix="studio-faults-pg-"))
        self.data = self.dir / "data"
        self.port = _free_port()
        self.user = None
        if os.geteuid() == 0:
            import pwd

            try:
                self.user = pwd.getpwnam("postgres")
            except KeyError:
                pytest.fail("running as root but there is no `postgres` user to run PostgreSQL as")
            os.chown(self.dir, self.user.pw_uid, self.user.pw_gid)
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "studio", "--no-sync", "-E", "UTF8")

    def _run(self, tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [str(self.bin / tool), *args]
        if self.user is not None:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=self.dir)
        if check and result.returncode != 0:
            raise RuntimeError(f"{tool} failed ({result.returncode}): {result.stdout}\n{result.stderr}")
        return result

    @property
    def url(self) -> str:
        return f"postgres://studio@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.dir / "log"), "-w", "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop", check=False)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class Redis:
    def __init__(self):
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.fail(
                "redis-server is not installed: apt-get install redis-server (the CI script .ci/run does)"
            )
        self.exe = exe
        self.port = _free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="studio-faults-redis-"))
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.dir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        _wait_port(self.port)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def services():
    pg = Postgres()
    redis = Redis()
    try:
        pg.start()
        redis.start()
        yield pg, redis
    finally:
        redis.cleanup()
        pg.cleanup()


# =====================================================================================================
# The studio, as gunicorn, against those services
# =====================================================================================================


@pytest.fixture(scope="module")
def studio(services, tmp_path_factory):
    """Migrated database, one curator with a dataset, and a gunicorn process on a free port."""
    pg, redis = services
    var = tmp_path_factory.mktemp("faults-var")
    port = _free_port()
    env = dict(os.environ)
    env.update(
        DJANGO_SETTINGS_MODULE="studio.settings",
        DATABASE_URL=pg.url,
        DATABASE_CONNECT_TIMEOUT="2",
        CELERY_BROKER_URL=redis.url,
        REDIS_URL=redis.url,
        STUDIO_VAR_DIR=str(var),
        STUDIO_DATA_DIR=str(var / "data"),
        STUDIO_LOG_DIR=str(var / "log"),
        PYTHONUNBUFFERED="1",
    )
    for name in ("STUDIO_BROKER_DIR", "STUDIO_TEST_BACKENDS", "DEBUG"):
        env.pop(name, None)
    manage = [sys.executable, str(ROOT / "manage.py")]
    subprocess.run([*manage, "migrate", "--noinput", "-v", "0"], env=env, cwd=ROOT, check=True, timeout=180)
    script = (
        "from studio.roles import ensure_groups\n"
        "from django.contrib.auth import get_user_model\n"
        "from datasets_app.services.datasets import create_dataset\n"
        "groups = ensure_groups()\n"
        f"u = get_user_model().objects.create_user('carla', 'carla@example.test', {PASSWORD!r})\n"
        "u.groups.add(groups['curator'])\n"
        "print('DATASET', create_dataset('support', 'sft', u).pk)\n"
    )
    out = subprocess.run(
        [*manage, "shell", "-c", script],
        env=env,
        cwd=ROOT,
        check=True,
        timeout=120,
        capture_output=True,
        text=True,
    ).stdout
    dataset_id = int(re.search(r"DATASET (\d+)", out).group(1))
    log_path = var / "gunicorn.out"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "gunicorn"), "studio.wsgi:application",
             "--bind", f"127.0.0.1:{port}", "--workers", "1", "--threads", "4", "--timeout", "60"],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        _wait_port(port, 60)
        yield {
            "url": f"http://127.0.0.1:{port}",
            "dataset": dataset_id,
            "env": env,
            "log": log_path,
            "pg": pg,
        }
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def sign_in(base: str, username: str = "carla"):
    import requests

    session = requests.Session()
    session.get(f"{base}/login/", timeout=10)
    response = session.post(
        f"{base}/login/",
        data={
            "username": username,
            "password": PASSWORD,
            "csrfmiddlewaretoken": session.cookies["csrftoken"],
        },
        headers={"Referer": f"{base}/login/"},
        timeout=10,
        allow_redirects=False,
    )
    assert response.status_code == 302, response.text[-2000:]
    return session


def timed_get(session, url: str):
    started = time.monotonic()
    response = session.get(url, timeout=30)
    return response, time.monotonic() - started


def assert_service_page(response, elapsed: float) -> None:
    assert response.status_code == 503, (response.status_code, response.text[-1500:])
    assert elapsed < FAST, f"the 503 page took {elapsed:.1f} s"
    assert "Back in a moment" in response.text
    assert "can't reach its database" in response.text.replace("&#x27;", "'")
    assert response.headers.get("Retry-After") == "60"
    assert "Traceback" not in response.text


# =====================================================================================================
# PostgreSQL down
# =====================================================================================================


def test_postgres_down_gives_503_quickly_and_recovers_without_restart(studio):
    base, pg = studio["url"], studio["pg"]
    session = sign_in(base)
    page = f"{base}/datasets/{studio['dataset']}/"
    response, _ = timed_get(session, page)
    assert response.status_code == 200

    pg.stop()
    try:
        for _ in range(3):  # the pooled connection goes bad, then every new one is refused: same answer
            response, elapsed = timed_get(session, page)
            assert_service_page(response, elapsed)
        response, elapsed = timed_get(session, f"{base}/datasets/")
        assert_service_page(response, elapsed)
        # an action (a file upload) too, and it leaves no stray file behind in the data dir
        response, elapsed = upload(session, base, studio["dataset"], csrf_from=page)
        assert_service_page(response, elapsed)
        uploads_dir = Path(studio["env"]["STUDIO_DATA_DIR"]) / "uploads"
        assert not uploads_dir.exists() or not any(p.is_file() for p in uploads_dir.rglob("*"))
    finally:
        pg.start()

    response, _ = timed_get(session, page)
    assert response.status_code == 200, response.text[-1500:]
    assert "support" in response.text
    # the session survived: still signed in, not bounced to the login page
    assert "/login/" not in response.url


# =====================================================================================================
# Redis down
# =====================================================================================================

JSONL = b'{"messages": [{"role": "user", "content": "where is my parcel"}, {"role": "assistant", "content": "it ships tomorrow"}]}\n'


def upload(session, base: str, dataset: int, name: str = "chats.jsonl", csrf_from: str | None = None):
    """POST a one-line JSONL file to the upload form; (response, seconds). `csrf_from`: the form's
    page is not fetched (it could not be, with the database down): the session's CSRF cookie is used."""
    referer = csrf_from or session.get(f"{base}/datasets/{dataset}/upload/", timeout=10).url
    token = session.cookies["csrftoken"]
    started = time.monotonic()
    response = session.post(
        f"{base}/datasets/{dataset}/upload/",
        data={"csrfmiddlewaretoken": token, "format": ""},
        files={"file": (name, JSONL, "application/jsonl")},
        headers={"Referer": referer},
        timeout=30,
        allow_redirects=False,
    )
    return response, time.monotonic() - started


def sql(pg, query: str, *params):
    import psycopg

    with psycopg.connect(
        f"host=127.0.0.1 port={pg.port} user=studio dbname=postgres", connect_timeout=5
    ) as conn:
        return conn.execute(query, params).fetchall()


def queued_upload_ids(redis) -> list[int]:
    """The upload ids of the process_upload messages waiting on queue "curation"."""
    import json

    import redis as redis_lib

    client = redis_lib.Redis(port=redis.port, socket_timeout=5)
    ids = []
    for raw in client.lrange("curation", 0, -1):
        message = json.loads(raw)
        if message["headers"]["task"] == "datasets_app.tasks.process_upload":
            ids.append(json.loads(__import__("base64").b64decode(message["body"]))[0][0])
    return ids


def test_redis_down_upload_answers_503_fails_with_reason_and_recovers_without_restart(studio, services):
    pg, redis = services
    base, dataset = studio["url"], studio["dataset"]
    session = sign_in(base)
    before = {row[0] for row in sql(pg, "SELECT id FROM datasets_app_upload")}
    redis.stop()
    try:
        # pages that only read the database still answer
        response, _ = timed_get(session, f"{base}/datasets/{dataset}/")
        assert response.status_code == 200
        # the upload cannot be queued: the 503 page, quickly, and the row is not left queued forever
        response, elapsed = upload(session, base, dataset)
        assert_service_page(response, elapsed)
        rows = sql(
            pg, "SELECT id, status, error FROM datasets_app_upload WHERE NOT (id = ANY(%s))", list(before)
        )
        assert len(rows) == 1, rows
        lost_id, status, error = rows[0]
        assert status == "failed", "an upload queued with no message behind it would never be imported"
        assert "queue was unreachable" in error and "Upload the file again" in error
        assert sql(pg, "SELECT count(*) FROM datasets_app_example WHERE dataset_id = %s", dataset)[0][0] == 0
        # and its plaintext original is not left behind in the data dir
        assert sql(pg, "SELECT raw_path FROM datasets_app_upload WHERE id = %s", lost_id)[0][0] == ""
        incoming = Path(studio["env"]["STUDIO_DATA_DIR"]) / "uploads" / "incoming"
        assert not incoming.exists() or not any(incoming.iterdir())
    finally:
        redis.start()

    # its page tells the person what happened
    page = session.get(f"{base}/datasets/uploads/{lost_id}/", timeout=10)
    assert page.status_code == 200
    assert "Upload the file again" in page.text.replace("&#x27;", "'")

    # Redis is back: the same web server queues the next upload (one message, for the new upload only)
    response, elapsed = upload(session, base, dataset)
    assert response.status_code == 302, response.text[-1500:]
    assert elapsed < FAST
    new_id = int(re.search(r"/datasets/uploads/(\d+)/", response.headers["Location"]).group(1))
    assert sql(pg, "SELECT status FROM datasets_app_upload WHERE id = %s", new_id)[0][0] == "queued"
    assert queued_upload_ids(redis) == [new_id]


# =====================================================================================================
# Disk nearly full in the data dir during checkpointing (a real size-limited filesystem)
# =====================================================================================================


@pytest.fixture
def small_disk(tmp_path):
    """A 32 MiB tmpfs mounted for the test (needs root, as in CI's container; skipped elsewhere: the
    simulated ENOSPC of tests/test_trainer.py covers the trainer there)."""
    mountpoint = tmp_path / "small-disk"
    mountpoint.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=32m,mode=0700", "tmpfs", str(mountpoint)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip() or result.returncode}); needs root")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)


def fill(disk: Path, leave: int = 8192) -> None:
    """Fill the filesystem for real (until ENOSPC), then give back `leave` bytes: nearly full."""
    import errno

    filler = disk / "filler.bin"
    chunk = b"\0" * (1 << 20)
    with open(filler, "wb", buffering=0) as fh:
        try:
            while True:
                fh.write(chunk)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    for size in (1 << 16, 1 << 12, 1 << 8, 1):
        try:
            with open(filler, "ab", buffering=0) as fh:
                while True:
                    fh.write(b"\0" * size)
        except OSError:
            pass
    os.truncate(filler, max(filler.stat().st_size - leave, 0))


def fill_after_first_publish(monkeypatch, disk: Path) -> list[str]:
    """Patch the trainer so that the disk fills up right after its first checkpoint is published.
    Returns the names of the published checkpoints, appended as they come. To stop filling, set
    ``trainer_run._atomic_publish`` back to the original with ``monkeypatch.setattr``."""
    from training_app.trainer import run as trainer_run

    published = []
    original_publish = trainer_run._atomic_publish

    def publish_then_fill(tmp: str, final: str) -> None:
        original_publish(tmp, final)
        published.append(os.path.basename(final))
        if len(published) == 1:
            fill(disk)  # the first checkpoint is on disk; now the disk is (nearly) full

    monkeypatch.setattr(trainer_run, "_atomic_publish", publish_then_fill)
    return published


@pytest.mark.django_db
def test_disk_full_during_checkpoint_fails_job_with_reason_and_keeps_earlier_checkpoint(
    small_disk, settings, monkeypatch, tiny_model_dir, curator, engineer, admin_user
):
    from conftest import make_version, smoke_request

    from training_app.models import TrainingJob
    from training_app.services import jobs, register_local_dir
    from training_app.trainer import run as trainer_run

    base = register_local_dir("tiny-llama", Path(tiny_model_dir), admin_user)
    version = make_version(curator, train=16, eval_=2)
    settings.DATA_DIR = small_disk  # jobs write their data files and checkpoints under DATA_DIR/jobs/

    published = fill_after_first_publish(monkeypatch, small_disk)
    job = jobs.create_job(
        smoke_request(version, base, max_steps=12, checkpoint_every=2, batch_size=2, max_length=128), engineer
    )
    job = jobs.run_claimed(jobs.claim(job.pk, "test"))

    assert published == ["checkpoint-2"]
    assert job.state == TrainingJob.State.FAILED
    assert job.error_code == "disk_full", (job.error_code, job.error_message, job.error_traceback[-2000:])
    assert "disk is full" in job.error_message
    assert (
        "Free some disk space" in job.error_suggestion
        and "earlier checkpoints are intact" in job.error_suggestion
    )
    assert "No space left on device" in job.error_traceback  # a real ENOSPC, from the filesystem
    checkpoints = job.output_dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-2"]  # nothing half-written
    assert not list(job.output_dir.rglob(".tmp-checkpoint-*"))
    assert trainer_run.check_checkpoint(str(checkpoints / "checkpoint-2")) == 2

    # space freed, the job put back in the queue (what the watchdog does after a lost worker): the next
    # attempt resumes from that checkpoint and finishes
    (small_disk / "filler.bin").unlink()
    TrainingJob.objects.filter(pk=job.pk).update(state=TrainingJob.State.QUEUED, error_code="")
    job = jobs.run_claimed(jobs.claim(job.pk, "test"))
    assert job.state == TrainingJob.State.SUCCEEDED, (job.error_code, job.error_traceback[-2000:])
    assert job.attempt == 2 and job.attempt_started_step == 2 and job.step == 12


# =====================================================================================================
# Redis restarted while a real worker runs a training job
# =====================================================================================================


@pytest.fixture
def private_redis():
    redis = Redis()
    redis.start()
    try:
        yield redis
    finally:
        redis.cleanup()


STEPS = 200  # about 5 s on an idle CPU, 35 s on a busy one: the outage (~1 s) lands mid-run


@pytest.mark.django_db(transaction=True)
def test_redis_restarted_mid_job_the_job_still_ends_once_and_the_worker_keeps_working(
    private_redis, start_worker, tiny_model_dir, curator, engineer, admin_user
):
    from conftest import make_version, smoke_request, wait_for

    from studio.celery import app
    from studio.models import AuditEvent
    from training_app.models import TrainingJob
    from training_app.services import jobs, register_local_dir
    from training_app.tasks import run_next

    redis = private_redis
    base = register_local_dir("tiny-llama", Path(tiny_model_dir), admin_user)
    version = make_version(curator, train=16, eval_=2)
    worker = start_worker(
        "gpu", CELERY_BROKER_URL=redis.url, REDIS_URL=redis.url, STUDIO_JOB_HEARTBEAT_SECONDS="0.5"
    )

    def launch(steps: int) -> int:
        job = jobs.create_job(
            smoke_request(version, base, max_steps=steps, checkpoint_every=25, batch_size=2, max_length=128),
            engineer,
            enqueue=False,
        )
        with app.connection_for_write(redis.url) as connection:
            run_next.apply_async(connection=connection)
        return job.pk

    def job(pk: int) -> TrainingJob:
        return TrainingJob.objects.get(pk=pk)

    first = launch(STEPS)
    wait_for(lambda: job(first).step >= 3, worker, timeout=60, what="the job to start stepping")
    redis.stop()
    wait_for(
        lambda: "Connection to broker lost" in worker["log"].read_text(errors="replace"),
        worker,
        timeout=15,
        what="the worker to notice the broker is gone",
    )
    assert job(first).state == "running", "the outage must happen while the job runs"
    time.sleep(1)
    redis.start()  # same port, empty: the broker lost the message the worker is running
    wait_for(
        lambda: job(first).state not in ("queued", "running"), worker, timeout=120, what="the job to end"
    )
    done = job(first)
    assert done.state == "succeeded", (done.error_code, done.error_message, done.error_traceback[-2000:])
    assert done.step == STEPS and done.attempt == 1
    # run once: one start, every step's loss once
    starts = AuditEvent.objects.filter(object_id=str(first), verb="training.job.start").count()
    assert starts == 1
    steps = list(done.metrics.filter(name="loss").order_by("step").values_list("step", flat=True))
    assert steps == list(range(1, STEPS + 1))

    # the same worker process, reconnected, takes the next job from the restarted Redis
    assert worker["proc"].poll() is None, "the worker must survive the broker restart"
    second = launch(4)
    wait_for(lambda: job(second).state not in ("queued", "running"), worker, timeout=60, what="the next job")
    assert job(second).state == "succeeded" and job(second).attempt == 1


# =====================================================================================================
# A training job launched while the broker is down
# =====================================================================================================


@pytest.fixture
def dead_broker(monkeypatch):
    """The studio's Celery app pointed at a port where nothing listens (a stopped Redis)."""
    from conftest import _reset_producers

    from studio.celery import app

    dead = f"redis://127.0.0.1:{_free_port()}/0"
    monkeypatch.setenv("CELERY_BROKER_URL", dead)  # Celery reads it before its own setting (as in CI)
    monkeypatch.setitem(app.conf, "broker_url", dead)
    monkeypatch.setitem(app.conf, "broker_transport_options", {"visibility_timeout": 3600})
    _reset_producers(app)
    yield app
    monkeypatch.undo()
    _reset_producers(app)


@pytest.mark.django_db(transaction=True)
def test_job_launched_while_broker_is_down_fails_with_reason_not_queued_forever(
    dead_broker, tiny_model_dir, curator, engineer, admin_user
):
    from conftest import make_version, smoke_request
    from kombu.exceptions import OperationalError

    from studio.models import AuditEvent
    from training_app.models import TrainingJob
    from training_app.services import jobs, register_local_dir

    base = register_local_dir("tiny-llama", Path(tiny_model_dir), admin_user)
    version = make_version(curator, train=16, eval_=2)
    started = time.monotonic()
    with pytest.raises(OperationalError):  # the web view turns this into the 503 page
        jobs.create_job(smoke_request(version, base, max_steps=4), engineer)
    assert time.monotonic() - started < FAST
    job = TrainingJob.objects.get()
    # not left queued: it would take the run_next message of the next job launched, stranding that one
    assert job.state == "failed" and job.error_code == "queue_unreachable"
    assert "queue was unreachable" in job.error_message and "Launch the job again" in job.error_suggestion
    assert not jobs.queue_order().exists()
    assert AuditEvent.objects.filter(object_id=str(job.pk), verb="training.job.fail").count() == 1


@pytest.mark.django_db(transaction=True)
def test_eval_run_started_while_broker_is_down_fails_with_reason_not_queued_forever(
    dead_broker, tiny_model_dir, curator, engineer, admin_user
):
    from conftest import make_version
    from kombu.exceptions import OperationalError
    from test_eval_runs import golden_version, make_candidate

    from eval_app.models import EvalRun
    from eval_app.services import evaluation
    from studio.models import AuditEvent
    from training_app.services import register_local_dir

    base = register_local_dir("tiny-llama", Path(tiny_model_dir), admin_user)
    candidate = make_candidate(
        "support", base, tiny_model_dir, engineer, dataset_version=make_version(curator, train=4, eval_=0)
    )
    golden = golden_version(curator)
    started = time.monotonic()
    with pytest.raises(OperationalError):  # the web view turns this into the 503 page
        evaluation.create_run(engineer, candidate, "base", golden)
    assert time.monotonic() - started < FAST
    run = EvalRun.objects.get()
    assert run.state == "failed" and "queue was unreachable" in run.error_message
    assert AuditEvent.objects.filter(object_id=str(run.pk), verb="eval.run.fail").count() == 1


# =====================================================================================================
# PostgreSQL restarted while a real worker runs a training job
# =====================================================================================================


def test_postgres_restarted_mid_job_the_job_ends_visibly(studio, tiny_model_dir, tmp_path):
    """The worker's database goes away mid-run and comes back: the job ends succeeded or failed with a
    reason, perhaps after the beat watchdog's requeue (run here by hand), never stuck in running."""
    pg, env = studio["pg"], dict(studio["env"], STUDIO_JOB_HEARTBEAT_SECONDS="0.5")
    manage = [sys.executable, str(ROOT / "manage.py")]
    script = (
        "import sys; sys.path.insert(0, 'tests')\n"
        "from pathlib import Path\n"
        "from django.contrib.auth import get_user_model\n"
        "from conftest import make_version, smoke_request\n"
        "from studio.roles import ensure_groups\n"
        "from training_app.services import jobs, register_local_dir\n"
        "groups = ensure_groups()\n"
        "User = get_user_model()\n"
        f"eng = User.objects.create_user('erin', 'erin@example.test', {PASSWORD!r})\n"
        "eng.groups.add(groups['engineer'], groups['admin'], groups['curator'])\n"
        f"base = register_local_dir('tiny-pg', Path({str(tiny_model_dir)!r}), eng)\n"
        "version = make_version(eng, name='pg-restart', train=16, eval_=2)\n"
        "job = jobs.create_job(smoke_request(version, base, max_steps=200, checkpoint_every=10,"
        " batch_size=2, max_length=128), eng)\n"
        "print('JOB', job.pk)\n"
    )
    out = subprocess.run(
        [*manage, "shell", "-c", script], env=env, cwd=ROOT, timeout=120, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-3000:]
    job_id = int(re.search(r"JOB (\d+)", out.stdout).group(1))
    log_path = tmp_path / "worker.out"
    with open(log_path, "wb") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "studio", "worker", "-Q", "gpu", "--concurrency", "1",
             "--without-gossip", "--without-mingle", "--without-heartbeat", "-n", "pg-restart@%h"],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip

    def state() -> tuple[str, int]:
        return tuple(sql(pg, "SELECT state, step FROM training_app_trainingjob WHERE id = %s", job_id)[0])

    def wait(predicate, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if predicate():
                    return
            except Exception:  # noqa: BLE001,S110 - the database may still be coming back
                pass
            time.sleep(0.3)
        pytest.fail(f"timed out waiting for {what}; worker log:\n{log_path.read_text()[-3000:]}")

    try:
        wait(lambda: state()[1] >= 12, 90, "the job to step past its first checkpoint")
        pg.stop()
        time.sleep(2)
        pg.start()
        # the job either carries on, or its attempt ends; a stale "running" row is the watchdog's to requeue
        deadline = time.monotonic() + 90
        requeued = False
        while time.monotonic() < deadline:
            current, _step = state()
            if current not in ("queued", "running"):
                break
            heartbeat_age = sql(
                pg,
                "SELECT extract(epoch FROM now() - heartbeat_at) FROM training_app_trainingjob WHERE id = %s",
                job_id,
            )[0][0]
            if current == "running" and heartbeat_age is not None and heartbeat_age > 10 and not requeued:
                watchdog = subprocess.run(
                    [*manage, "shell", "-c", "from studio.tasks import watchdog; print(watchdog())"],
                    env=dict(env, STUDIO_JOB_STALE_SECONDS="5"), cwd=ROOT, timeout=60, capture_output=True,
                    text=True,
                )  # fmt: skip
                requeued = str(job_id) in watchdog.stdout
            time.sleep(0.5)
        final, step = state()
        error = sql(
            pg, "SELECT error_code, error_message FROM training_app_trainingjob WHERE id = %s", job_id
        )[0]
        assert final in ("succeeded", "failed"), (final, step, log_path.read_text()[-3000:])
        if final == "failed":
            assert error[0] and error[1]
        else:  # every step's loss once, whether or not an attempt was requeued and resumed
            assert step == 200
            steps = sql(
                pg,
                "SELECT step FROM training_app_trainingmetric WHERE job_id = %s AND name = 'loss' ORDER BY step",
                job_id,
            )
            assert [s for (s,) in steps] == list(range(1, 201))
        assert worker.poll() is None, "the worker must survive the database restart"
    finally:
        worker.terminate()
        try:
            worker.wait(20)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait(10)
