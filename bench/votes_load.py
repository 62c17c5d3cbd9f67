"""50 concurrent reviewers × 20 votes each through the real pages, against gunicorn + PostgreSQL.

Run by hand:  DATABASE_URL=postgres://studio:studio@127.0.0.1:5432/studio .venv/bin/python bench/votes_load.py

It creates a scratch database next to the one in DATABASE_URL (<name>_votes_bench: dropped first and
at the end unless --keep), migrates it, writes 50 reviewers and one succeeded evaluation run with
1000 comparisons (20% of them wanting two votes: 1200 slots; generations written directly, no model
needed), starts gunicorn (4 workers × 8 threads by default; keep-alive 30 s, as behind a proxy, so the
clients' pooled connections are not closed under them between requests) on it, and runs one thread per
reviewer:
sign in through the login form (CSRF), then 20 times: claim the next comparison (POST, redirect), open
the blind page, post the vote from the page's form, open the reveal page; after each vote the same
thread fetches the anonymous login page as the trivial view measured under the same load.

Prints: votes expected / confirmed / stored, lost (confirmed but not stored), duplicated (two votes of
one reviewer on one comparison, comparisons with more votes than wanted, votes_count out of step),
p50/p95 of the vote POST, the claim POST and the trivial view, and the ratio vote p95 / trivial p95.
Asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
PASSWORD = "Bench-Votes-Password-42"
TOKEN = re.compile(r'name="csrfmiddlewaretoken" value="([^"]+)"')
SHOWN_AT = re.compile(r'name="shown_at" value="([^"]+)"')
REVIEW_URL = re.compile(r"/models/reviews/(\d+)/$")


def percentile(values, q):
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def scratch_database(url: str, keep_name: str | None = None) -> str:
    """Create (drop first) the scratch database next to `url`'s; return its URL."""
    import psycopg

    parts = urlsplit(url)
    name = keep_name or f"{parts.path.lstrip('/')}_votes_bench"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    return urlunsplit(parts._replace(path=f"/{name}"))


def drop_database(url: str, bench_url: str) -> None:
    import psycopg

    name = urlsplit(bench_url).path.lstrip("/")
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def build_data(clients: int, comparisons: int, overlap: float):
    """Reviewers, an engineer, a model line with one version, and a succeeded run with its comparisons."""
    from django.contrib.auth import get_user_model
    from django.contrib.auth.hashers import make_password
    from django.core.management import call_command

    from datasets_app.models import Dataset, DatasetVersion
    from eval_app.models import Comparison, EvalRun, Generation, ModelVersion, RegisteredModel
    from studio.roles import ensure_groups
    from training_app.models import BaseModel

    call_command("migrate", verbosity=0)
    groups = ensure_groups()
    User = get_user_model()
    hashed = make_password(PASSWORD)
    engineer = User.objects.create(username="bench-engineer", password=hashed)
    engineer.groups.add(groups["engineer"])
    reviewers = User.objects.bulk_create(
        [User(username=f"bench-reviewer-{i:02d}", password=hashed) for i in range(clients)]
    )
    groups["reviewer"].user_set.add(*reviewers)

    base = BaseModel.objects.create(
        name="bench-base", source_kind="local_dir", source="/nowhere", path="/nowhere"
    )
    dataset = Dataset.objects.create(name="bench-prompts", owner=engineer)
    dv = DatasetVersion.objects.create(dataset=dataset, number=1, kind=dataset.kind, sha256="0" * 64)
    line = RegisteredModel.objects.create(name="bench-line", created_by=engineer)
    version = ModelVersion.objects.create(
        registered_model=line, number=1, base_model=base, created_by=engineer
    )
    run = EvalRun.objects.create(
        candidate=version,
        baseline_base_model=base,
        dataset_version=dv,
        state=EvalRun.State.SUCCEEDED,
        created_by=engineer,
    )
    rng = random.Random(7)
    generations = []
    for i in range(comparisons):
        prompt = [
            {"role": "user", "content": f"Customer question {i}: where is parcel {rng.randint(1000, 9999)}?"}
        ]
        for side in ("candidate", "baseline"):
            generations.append(
                Generation(
                    run=run,
                    side=side,
                    position=i,
                    prompt=prompt,
                    output=f"{side} answer {i}: it ships in {rng.randint(1, 5)} days.",
                )
            )
    generations = Generation.objects.bulk_create(generations, batch_size=1000)
    overlap_positions = set(rng.sample(range(comparisons), int(round(comparisons * overlap))))
    Comparison.objects.bulk_create(
        [
            Comparison(
                run=run,
                position=i,
                candidate_generation=generations[2 * i],
                baseline_generation=generations[2 * i + 1],
                swapped=rng.random() < 0.5,
                votes_wanted=2 if i in overlap_positions else 1,
                tags=[rng.choice(["billing", "shipping", "account"])],
            )
            for i in range(comparisons)
        ],
        batch_size=1000,
    )
    return run, [r.username for r in reviewers]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_gunicorn(bench_url: str, port: int, workers: int, threads: int, log_path: Path):
    env = dict(os.environ, DATABASE_URL=bench_url, DEBUG="0", LOG_LEVEL="WARNING")
    log = open(log_path, "wb")  # noqa: SIM115 - closed by the caller with the process
    proc = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "studio.wsgi:application", "--bind", f"127.0.0.1:{port}",
         "--workers", str(workers), "--threads", str(threads), "--timeout", "120", "--keep-alive", "30", "--log-level", "warning"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    return proc, log


def wait_ready(base: str, proc, timeout: float = 60) -> None:
    import requests

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit("gunicorn exited before answering; see its log above")
        try:
            if requests.get(f"{base}/login/", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.3)
    raise SystemExit("gunicorn did not answer within a minute")


class Client(threading.Thread):
    def __init__(self, base: str, username: str, votes: int, barrier: threading.Barrier, seed: int):
        super().__init__(daemon=True)
        self.base, self.username, self.votes, self.barrier = base, username, votes, barrier
        self.rng = random.Random(seed)
        self.vote_ms: list[float] = []
        self.claim_ms: list[float] = []
        self.trivial_ms: list[float] = []
        self.confirmed: list[int] = []
        self.errors: list[str] = []

    def run(self) -> None:
        import requests

        session, anonymous = requests.Session(), requests.Session()
        try:
            page = session.get(f"{self.base}/login/")
            token = TOKEN.search(page.text).group(1)
            signed_in = session.post(
                f"{self.base}/login/",
                data={"username": self.username, "password": PASSWORD, "csrfmiddlewaretoken": token},
                allow_redirects=False,
            )
            if signed_in.status_code != 302:
                self.errors.append(f"login answered {signed_in.status_code}")
                return
        finally:
            self.barrier.wait()
        for _ in range(self.votes):
            try:
                self.one_vote(session, anonymous)
            except Exception as exc:  # noqa: BLE001 - counted and reported
                self.errors.append(f"{type(exc).__name__}: {exc}"[:200])

    def one_vote(self, session, anonymous) -> None:
        csrf = session.cookies.get("csrftoken", "")
        t0 = time.perf_counter()
        claim = session.post(
            f"{self.base}/models/reviews/next/",
            headers={"X-CSRFToken": csrf},
            allow_redirects=False,
        )
        self.claim_ms.append((time.perf_counter() - t0) * 1000)
        location = claim.headers.get("Location", "")
        match = REVIEW_URL.search(location)
        if claim.status_code != 302 or not match:
            self.errors.append(f"claim answered {claim.status_code} → {location or '-'}")
            return
        pk = int(match.group(1))
        page = session.get(f"{self.base}/models/reviews/{pk}/")
        if page.status_code != 200 or "data-vote-form" not in page.text:
            self.errors.append(f"review page answered {page.status_code}")
            return
        data = {
            "csrfmiddlewaretoken": TOKEN.search(page.text).group(1),
            "shown_at": SHOWN_AT.search(page.text).group(1),
            "choice": self.rng.choice(["a", "b", "tie", "both_bad"]),
            "comment": "",
        }
        t0 = time.perf_counter()
        voted = session.post(f"{self.base}/models/reviews/{pk}/", data=data, allow_redirects=False)
        self.vote_ms.append((time.perf_counter() - t0) * 1000)
        if voted.status_code == 302 and voted.headers.get("Location", "").endswith(
            f"/models/reviews/{pk}/done/"
        ):
            self.confirmed.append(pk)
        else:
            self.errors.append(f"vote answered {voted.status_code}")
            return
        done = session.get(f"{self.base}/models/reviews/{pk}/done/")
        if done.status_code != 200:
            self.errors.append(f"reveal page answered {done.status_code}")
        t0 = time.perf_counter()
        trivial = anonymous.get(f"{self.base}/login/")
        self.trivial_ms.append((time.perf_counter() - t0) * 1000)
        if trivial.status_code != 200:
            self.errors.append(f"login page answered {trivial.status_code}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--votes", type=int, default=20, help="votes per client")
    parser.add_argument("--comparisons", type=int, default=1000)
    parser.add_argument("--overlap", type=float, default=0.2, help="share of comparisons wanting two votes")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--keep", action="store_true", help="keep the scratch database")
    args = parser.parse_args()

    url = os.environ.get("DATABASE_URL", "")
    if not url.startswith(("postgres://", "postgresql://")):
        print(
            "bench/votes_load.py needs PostgreSQL: set DATABASE_URL, e.g.\n"
            "  DATABASE_URL=postgres://studio:studio@127.0.0.1:5432/studio .venv/bin/python bench/votes_load.py\n"
            "(the role needs CREATEDB: a scratch database <name>_votes_bench is created and dropped).",
            file=sys.stderr,
        )
        raise SystemExit(2)

    bench_url = scratch_database(url)
    os.environ["DATABASE_URL"] = bench_url
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "studio.settings")
    import django

    django.setup()
    from django.db import connection
    from django.db.models import Count, F

    from eval_app.models import Comparison, Vote
    from studio.audit import verify_chain

    proc = log = None
    try:
        t0 = time.perf_counter()
        run, usernames = build_data(args.clients, args.comparisons, args.overlap)
        slots = sum(Comparison.objects.filter(run=run).values_list("votes_wanted", flat=True))
        print(
            f"setup: {args.clients} reviewers, run {run.pk} with {args.comparisons} comparisons "
            f"({slots} vote slots) in {time.perf_counter() - t0:.1f}s"
        )
        connection.close()

        port = free_port()
        log_path = Path(tempfile.gettempdir()) / f"votes_load_gunicorn_{port}.log"
        proc, log = start_gunicorn(bench_url, port, args.workers, args.threads, log_path)
        base = f"http://127.0.0.1:{port}"
        wait_ready(base, proc)
        print(f"gunicorn: {args.workers} workers × {args.threads} threads on {base}")

        barrier = threading.Barrier(args.clients + 1)
        clients = [Client(base, name, args.votes, barrier, seed=i) for i, name in enumerate(usernames)]
        for c in clients:
            c.start()
        barrier.wait()  # everybody signed in: the load starts now
        started = time.perf_counter()
        for c in clients:
            c.join()
        wall = time.perf_counter() - started

        expected = args.clients * args.votes
        confirmed = {(c.username, pk) for c in clients for pk in c.confirmed}
        votes = Vote.objects.filter(comparison__run=run)
        stored_pairs = set(votes.values_list("reviewer__username", "comparison_id"))
        stored = votes.count()
        lost = len(confirmed - stored_pairs)
        unconfirmed = len(stored_pairs - confirmed)
        same_reviewer_twice = (
            votes.values("comparison", "reviewer").annotate(n=Count("id")).filter(n__gt=1).count()
        )
        per_comparison = Comparison.objects.filter(run=run).annotate(n=Count("votes"))
        over_wanted = per_comparison.filter(n__gt=F("votes_wanted")).count()
        count_mismatch = per_comparison.exclude(n=F("votes_count")).count()
        chain = verify_chain()
        errors = [e for c in clients for e in c.errors]
        vote_ms = [x for c in clients for x in c.vote_ms]
        claim_ms = [x for c in clients for x in c.claim_ms]
        trivial_ms = [x for c in clients for x in c.trivial_ms]

        print(f"votes expected {expected}, confirmed {len(confirmed)}, stored {stored}")
        print(
            f"lost {lost} (confirmed to a client but not stored); stored without confirmation {unconfirmed}"
        )
        print(
            f"duplicated {same_reviewer_twice + over_wanted} (same reviewer twice on a comparison "
            f"{same_reviewer_twice}, comparisons with more votes than wanted {over_wanted}); "
            f"votes_count out of step on {count_mismatch} comparisons"
        )
        print(f"client errors {len(errors)}" + (f": {sorted(set(errors))[:5]}" if errors else ""))
        print(
            f"audit chain: {'intact' if chain.ok else 'BROKEN at ' + str(chain.broken_at)} ({chain.checked} events)"
        )
        print(f"wall {wall:.1f}s, {stored / wall:.1f} votes/s")
        vote_p50, vote_p95 = percentile(vote_ms, 50), percentile(vote_ms, 95)
        trivial_p50, trivial_p95 = percentile(trivial_ms, 50), percentile(trivial_ms, 95)
        print(f"vote POST     p50 {vote_p50:7.1f} ms   p95 {vote_p95:7.1f} ms   ({len(vote_ms)} requests)")
        print(
            f"claim POST    p50 {percentile(claim_ms, 50):7.1f} ms   p95 {percentile(claim_ms, 95):7.1f} ms   "
            f"({len(claim_ms)} requests)"
        )
        print(
            f"trivial view  p50 {trivial_p50:7.1f} ms   p95 {trivial_p95:7.1f} ms   (GET /login/, {len(trivial_ms)})"
        )
        print(f"ratio vote p95 / trivial p95: {vote_p95 / trivial_p95:.2f}")
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()
            tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
            if proc.returncode not in (0, -15) and tail:
                print("gunicorn log tail:\n  " + "\n  ".join(tail))
        connection.close()
        if not args.keep:
            drop_database(url, bench_url)


if __name__ == "__main__":
    main()
