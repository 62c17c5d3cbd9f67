"""Vote statistics: Wilson intervals, win-rate with ties, agreement, position bias, Bradley–Terry.

Pure functions are checked against values computed by hand (worked in the comments); the Bradley–Terry
fit against an independent fit written here (plain gradient ascent on the per-vote log-likelihood);
`run_summary` and `leaderboard` against votes written to the database."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
from django.template.loader import render_to_string
from django.urls import reverse

from datasets_app.models import Dataset, DatasetVersion
from eval_app import stats
from eval_app.models import Comparison, EvalRun, Generation, ModelVersion, RegisteredModel, Vote
from training_app.models import BaseModel

# =====================================================================================================
# A small world of models, runs, comparisons and votes written straight to the database (test_voting
# uses it too)
# =====================================================================================================


@dataclass
class World:
    owner: object
    base: BaseModel
    dataset_version: object
    line: RegisteredModel

    def version(self, number: int, created_by=None, training_job=None, pk=None) -> ModelVersion:
        fields = {"pk": pk} if pk else {}
        return ModelVersion.objects.create(
            registered_model=self.line,
            number=number,
            base_model=self.base,
            created_by=created_by or self.owner,
            training_job=training_job,
            **fields,
        )

    def run(
        self,
        candidate,
        baseline_version=None,
        *,
        n=4,
        wanted=None,
        swapped=None,
        tags=None,
        state=EvalRun.State.SUCCEEDED,
        outputs=None,
        prompt=None,
        generation_pks=None,
    ) -> EvalRun:
        """A run with `n` comparisons; `wanted[i]` votes wanted on the i-th (default 1), `swapped[i]`
        (default: every other one), `tags[i]` (default none), `outputs[i]` = (candidate, baseline) text."""
        run = EvalRun.objects.create(
            candidate=candidate,
            baseline_kind=EvalRun.BaselineKind.VERSION if baseline_version else EvalRun.BaselineKind.BASE,
            baseline_version=baseline_version,
            baseline_base_model=self.base,
            dataset_version=self.dataset_version,
            state=state,
            created_by=self.owner,
        )
        for i in range(n):
            messages = prompt or [{"role": "user", "content": f"question {i}"}]
            texts = outputs[i] if outputs else (f"candidate answer {i}", f"baseline answer {i}")
            gens = []
            for k, (side, text) in enumerate(
                ((Generation.Side.CANDIDATE, texts[0]), (Generation.Side.BASELINE, texts[1]))
            ):
                fields = {"pk": generation_pks[2 * i + k]} if generation_pks else {}
                gens.append(
                    Generation.objects.create(
                        run=run, side=side, position=i, prompt=messages, output=text, **fields
                    )
                )
            Comparison.objects.create(
                run=run,
                position=i,
                candidate_generation=gens[0],
                baseline_generation=gens[1],
                swapped=swapped[i] if swapped is not None else bool(i % 2),
                votes_wanted=wanted[i] if wanted else 1,
                tags=tags[i] if tags else [],
            )
        return run


@pytest.fixture
def world(make_user):
    owner = make_user("owen", "engineer")
    base = BaseModel.objects.create(
        name="tiny-base-xq", source_kind=BaseModel.Source.LOCAL_DIR, source="/nowhere", path="/nowhere"
    )
    dataset = Dataset.objects.create(name="tickets", owner=owner)
    dataset_version = DatasetVersion.objects.create(
        dataset=dataset, number=1, kind=dataset.kind, sha256="0" * 64
    )
    return World(owner, base, dataset_version, RegisteredModel.objects.create(name="helpdesk-line"))


def put_votes(comparisons, reviewers, outcomes):
    """One vote per (comparison, reviewer, outcome) triple written directly; `choice` derived from
    the outcome through the comparison's `swapped` flag. Returns the votes."""
    votes = []
    for comparison, reviewer, outcome in zip(comparisons, reviewers, outcomes, strict=True):
        if outcome in ("tie", "both_bad"):
            choice = outcome
        else:
            candidate_on_a = not comparison.swapped
            choice = "a" if (outcome == "candidate") == candidate_on_a else "b"
        votes.append(
            Vote.objects.create(comparison=comparison, reviewer=reviewer, choice=choice, outcome=outcome)
        )
        Comparison.objects.filter(pk=comparison.pk).update(votes_count=comparison.votes.count())
    return votes


# =====================================================================================================
# Pure functions
# =====================================================================================================


def test_wilson_interval_hand_computed():
    # 7/10: p = .7, z² = 3.8416; centre = (.7 + .19208)/1.38416 = .64449;
    # half = 1.96·√(.021 + .009604)/1.38416 = .24772  →  (.39677, .89221)
    low, high = stats.wilson_interval(7, 10)
    assert low == pytest.approx(0.3968, abs=5e-5)
    assert high == pytest.approx(0.8922, abs=5e-5)
    # 0/10: centre = half = .19208/1.38416 = .13877  →  (0, .27753); 10/10 mirrors it
    assert stats.wilson_interval(0, 10) == pytest.approx((0.0, 0.27753), abs=5e-5)
    assert stats.wilson_interval(10, 10) == pytest.approx((0.72247, 1.0), abs=5e-5)
    # fractional successes (half ties) are allowed: 6.5/10 → centre .84208/1.38416 = .60837,
    # half = 1.96·√(.02275 + .009604)/1.38416 = .25470 → (.35367, .86307); no data → the whole range
    assert stats.wilson_interval(6.5, 10) == pytest.approx((0.35367, 0.86307), abs=5e-5)
    assert stats.wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        stats.wilson_interval(11, 10)


def test_win_rate_counts_ties_half_and_keeps_both_bad_apart():
    outcomes = ["candidate"] * 5 + ["baseline"] * 3 + ["tie"] * 2 + ["both_bad"]
    tally = stats.Tally.of(outcomes)
    assert (tally.votes, tally.decisive, tally.both_bad) == (11, 10, 1)
    assert tally.win_rate == pytest.approx(0.6)  # (5 + 2/2) / 10, the both-bad vote not in n
    # Wilson of 6/10: centre .57225, half .25958 → (.31267, .83183)
    assert tally.interval == pytest.approx((0.3127, 0.8318), abs=5e-5)
    assert stats.Tally.of([]).win_rate is None
    assert stats.Tally.of(["both_bad"]).interval == (None, None)


def test_cohen_kappa_on_a_hand_computed_table():
    # 50 items: yes/yes 20, yes/no 5, no/yes 10, no/no 15. p_o = 35/50 = .7;
    # rater 1 says yes 25/50, rater 2 says yes 30/50: p_e = .5·.6 + .5·.4 = .5 → κ = (.7-.5)/(1-.5) = .4
    pairs = [("y", "y")] * 20 + [("y", "n")] * 5 + [("n", "y")] * 10 + [("n", "n")] * 15
    assert stats.cohen_kappa(pairs) == pytest.approx(0.4)
    assert stats.cohen_kappa([("a", "a"), ("b", "b")]) == pytest.approx(1.0)
    assert stats.cohen_kappa([]) is None
    assert stats.cohen_kappa([("tie", "tie")] * 3) is None  # chance agreement is certain: 0/0
    # Landis & Koch's words on the page
    words = {k: stats.RunSummary(agreement=k).agreement_label for k in (-0.1, 0.0, 0.4, 0.5, 0.9)}
    assert words == {-0.1: "poor", 0.0: "slight", 0.4: "fair", 0.5: "moderate", 0.9: "almost perfect"}


def test_krippendorff_alpha_hand_computed():
    # units [a,a] [a,b] [b,b] [b,b]: coincidences o_aa = 2, o_ab = o_ba = 1, o_bb = 4; n_a = 3, n_b = 5,
    # n = 8; α = 1 − (n−1)·Σ_{c≠k} o_ck / Σ_{c≠k} n_c·n_k = 1 − 7·2/30 = 0.5333
    units = [["a", "a"], ["a", "b"], ["b", "b"], ["b", "b"], ["a"]]  # the single-vote unit is unpairable
    assert stats.krippendorff_alpha_nominal(units) == pytest.approx(1 - 14 / 30)
    # three coders on one unit all agreeing, another unit in full disagreement
    assert stats.krippendorff_alpha_nominal([["x", "x", "x"], ["x", "y", "z"]]) < 0.2
    assert stats.krippendorff_alpha_nominal([["a", "a"], ["a", "a"]]) is None


def test_summarise_position_bias_agreement_and_tags():
    at = iter(range(100))

    def v(comparison, reviewer, choice, outcome):
        return {
            "id": next(at),
            "comparison": comparison,
            "reviewer": reviewer,
            "choice": choice,
            "outcome": outcome,
            "created_at": 0,
        }

    votes = [
        v(1, "r1", "a", "candidate"),
        v(1, "r2", "a", "candidate"),  # overlap item 1: agree
        v(2, "r1", "a", "baseline"),
        v(2, "r2", "b", "candidate"),  # overlap item 2: disagree
        v(3, "r1", "b", "baseline"),
        v(4, "r3", "tie", "tie"),
        v(5, "r3", "both_bad", "both_bad"),
    ]
    s = stats.summarise(votes, {1: ["billing"], 2: ["billing", "returns"], 3: ["returns"]})
    assert (s.votes, s.decisive, s.wins, s.losses, s.ties, s.both_bad) == (7, 6, 3, 2, 1, 1)
    assert s.win_rate == pytest.approx(3.5 / 6)
    assert (s.low, s.high) == pytest.approx(stats.wilson_interval(3.5, 6))
    # A-or-B votes: a, a, a, b, b → side A won 3 of 5
    assert (s.position_votes, s.position_a_rate) == (5, pytest.approx(0.6))
    assert s.overlap_items == 2 and s.observed_agreement == pytest.approx(0.5)
    # pairs (cand, cand), (base, cand): p_o = .5; rater 1: cand 1, base 1; rater 2: cand 2 → p_e = .5 → κ = 0
    assert s.agreement == pytest.approx(0.0)
    by_tag = {t.tag: t for t in s.per_tag}
    assert (by_tag["billing"].votes, by_tag["billing"].wins, by_tag["billing"].losses) == (4, 3, 1)
    assert by_tag["returns"].win_rate == pytest.approx(1 / 3)  # candidate, baseline, baseline
    assert s.reviewers == 3


# =====================================================================================================
# Bradley–Terry against an independent fit
# =====================================================================================================


def independent_bt(battles, players, l2=0.0, steps=20000, lr=0.05):
    """Gradient ascent on the per-vote BT log-likelihood Σ log σ(θ_winner − θ_loser) (a tie: half of each
    way) minus l2/2·Σθ², written without the win-matrix collapse; centred to mean 0."""
    theta = np.zeros(players)
    i = np.array([b[0] for b in battles])
    j = np.array([b[1] for b in battles])
    y = np.array([b[2] for b in battles], dtype=float)
    for _ in range(steps):
        p = 1 / (1 + np.exp(-(theta[i] - theta[j])))
        residual = y - p  # d/dθ_i of y·log p + (1−y)·log(1−p)
        grad = np.zeros(players)
        np.add.at(grad, i, residual)
        np.add.at(grad, j, -residual)
        theta += lr * (grad - l2 * theta) / len(battles) * 10
    return theta - theta.mean()


BATTLES = (
    [(0, 1, 1.0)] * 7
    + [(0, 1, 0.0)] * 3
    + [(0, 1, 0.5)] * 2
    + [(1, 2, 1.0)] * 6
    + [(1, 2, 0.0)] * 4
    + [(2, 0, 1.0)] * 2
    + [(2, 0, 0.0)] * 5
    + [(3, 2, 1.0)] * 2
    + [(3, 2, 0.0)] * 3
)


def test_bradley_terry_matches_an_independent_fit():
    wins = stats.win_matrix(BATTLES, 4)
    assert wins[0, 1] == pytest.approx(8.0) and wins[1, 0] == pytest.approx(4.0)  # ties half each way
    ours = stats.bradley_terry(wins, l2=0.0)
    reference = independent_bt(BATTLES, 4)
    np.testing.assert_allclose(ours, reference, atol=2e-3)
    assert list(np.argsort(-ours)) == [0, 1, 2, 3]  # 3 won 2 of 5 against 2, the weakest
    # the penalised fit (the one the leaderboard uses) against the same penalty written independently
    np.testing.assert_allclose(
        stats.bradley_terry(wins), independent_bt(BATTLES, 4, l2=stats.BT_L2), atol=2e-3
    )
    # Elo-like scale: a 400-point gap is 10:1 odds
    elo = stats.elo_scale(np.array([math.log(10) / 2, -math.log(10) / 2]))
    assert elo == pytest.approx([1200.0, 800.0])


def test_bradley_terry_stays_finite_when_a_player_never_lost():
    theta = stats.bradley_terry(stats.win_matrix([(0, 1, 1.0)] * 8, 2))
    assert np.all(np.isfinite(theta)) and theta[0] > 1.5 and theta[0] == pytest.approx(-theta[1])


def test_bootstrap_is_reproducible_and_narrows_with_more_votes():
    first = stats.bootstrap_bradley_terry(BATTLES, 4, rounds=100, seed=7)
    again = stats.bootstrap_bradley_terry(BATTLES, 4, rounds=100, seed=7)
    np.testing.assert_array_equal(first, again)
    point = stats.elo_scale(stats.bradley_terry(stats.win_matrix(BATTLES, 4)))
    low, high = np.percentile(first, [2.5, 97.5], axis=0)
    assert np.all(low <= point) and np.all(point <= high)
    more = stats.bootstrap_bradley_terry(BATTLES * 10, 4, rounds=100, seed=7)
    assert np.all(np.ptp(np.percentile(more, [2.5, 97.5], axis=0), axis=0) < np.ptp([low, high], axis=0))


# =====================================================================================================
# Reading the database
# =====================================================================================================


def test_run_summary_reads_votes_of_the_run(world, make_user):
    r1, r2 = make_user("rev1", "reviewer"), make_user("rev2", "reviewer")
    v1 = world.version(1)
    run = world.run(
        v1, n=4, wanted=[2, 1, 1, 1], swapped=[False, True, False, True], tags=[["a"], ["a", "b"], [], []]
    )
    other = world.run(v1, n=1)
    c = list(run.comparisons.order_by("position"))
    put_votes(
        [c[0], c[0], c[1], c[2], c[3]],
        [r1, r2, r1, r1, r2],
        ["candidate", "candidate", "baseline", "tie", "both_bad"],
    )
    put_votes([other.comparisons.get()], [r1], ["baseline"])  # another run: not counted

    s = stats.run_summary(run)
    assert (s.votes, s.decisive, s.wins, s.losses, s.ties, s.both_bad) == (5, 4, 2, 1, 1, 1)
    assert s.win_rate == pytest.approx(2.5 / 4)
    assert (s.low, s.high) == pytest.approx(stats.wilson_interval(2.5, 4))
    # choices: c0 not swapped, candidate → a (twice); c1 swapped, baseline → a  → side A won 3 of 3
    assert s.position_a_rate == pytest.approx(1.0) and s.position_votes == 3
    assert s.overlap_items == 1 and s.observed_agreement == 1.0
    assert {t.tag: t.votes for t in s.per_tag} == {"a": 3, "b": 1}
    assert (s.comparisons, s.slots, s.reviewers) == (4, 5, 2)
    # the partial other pages include: the figures, both-bad apart, and a link to the full statistics
    html = render_to_string("eval/partials/winrate.html", {"summary": s})
    assert s.bar.text in html and s.bar.interval_text in html and "2 / 1 / 1" in html
    assert reverse("eval:run_stats", args=[run.pk]) in html
    empty = stats.run_summary(world.run(v1, n=2))
    assert empty.win_rate is None and empty.low is None
    assert "No votes yet: 2 votes wanted on 2 comparisons" in render_to_string(
        "eval/partials/winrate.html", {"summary": empty}
    )


def test_leaderboard_ranks_versions_and_the_base_model(world, make_user):
    reviewers = [make_user(f"lb{i}", "reviewer") for i in range(20)]
    v1, v2 = world.version(1), world.version(2)
    # v2 beats the base model 15:5, v1 loses to it 6:14, v2 beats v1 12:8
    for candidate, baseline, wins, losses in ((v2, None, 15, 5), (v1, None, 6, 14), (v2, v1, 12, 8)):
        run = world.run(candidate, baseline, n=wins + losses)
        comparisons = list(run.comparisons.order_by("position"))
        put_votes(comparisons, reviewers, ["candidate"] * wins + ["baseline"] * losses)
    # a both-bad vote is not a battle
    extra = world.run(v1, n=1)
    put_votes([extra.comparisons.get()], [reviewers[0]], ["both_bad"])

    rows = stats.leaderboard(world.line)
    assert [r.label for r in rows] == ["helpdesk-line/2", "base model tiny-base-xq", "helpdesk-line/1"]
    assert [r.rank for r in rows] == [1, 2, 3]
    assert rows[0].version == v2 and rows[1].version is None and rows[1].base_model == world.base
    assert [r.battles for r in rows] == [40, 40, 40]
    for r in rows:
        assert r.low < r.score < r.high
    # the same fit as the pure function on the same battles (players in order v2, base, v1)
    battles = [(0, 1, 1.0)] * 15 + [(0, 1, 0.0)] * 5 + [(2, 1, 1.0)] * 6 + [(2, 1, 0.0)] * 14
    battles += [(0, 2, 1.0)] * 12 + [(0, 2, 0.0)] * 8
    expected = stats.elo_scale(stats.bradley_terry(stats.win_matrix(battles, 3)))
    assert [r.score for r in rows] == pytest.approx(list(expected))
    assert stats.leaderboard(RegisteredModel.objects.create(name="empty-line")) == []
