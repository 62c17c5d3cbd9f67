"""Statistics over blind votes: win-rate with Wilson intervals, per-tag breakdown, position bias,
inter-rater agreement, and a Bradley–Terry leaderboard with bootstrap intervals.

The first half is pure functions on plain numbers (tested against hand-computed values); the second
half (`run_summary`, `leaderboard`) reads the database and feeds them.

Conventions
- A vote's `outcome` is the candidate's view: candidate (a win), baseline (a loss), tie, both_bad.
- Win-rate = (wins + ½ ties) / n with n = wins + losses + ties; "both bad" votes are not in n and are
  reported on their own (a both-bad vote says neither answer is usable, not that they are equal).
- Position bias = share of A-or-B votes in which side A won (ties and both-bad say nothing about sides).
- Agreement on items voted by two or more reviewers: Cohen's kappa over the four outcome categories
  between each item's first and second vote, and Krippendorff's alpha (nominal) over all their votes.
- Bradley–Terry: battles collapsed to win counts per ordered pair (a tie is half a win each way; both-bad
  votes are left out, as in the win-rate), fitted by Newton's method on the log-likelihood with a weak
  L2 penalty (so a player that won or lost every battle still gets a finite score), shown on an Elo-like
  scale (1000 + 400·log10 odds); 95% intervals from a bootstrap that resamples votes (fixed seed).
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import numpy as np

Z95 = 1.959963984540054
ELO_BASE, ELO_SCALE = 1000.0, 400.0
BT_L2 = 0.01  # penalty on the log-strengths: a N(0, 10²) prior, negligible once a pair has a few battles
BOOTSTRAP_ROUNDS = 200
BOOTSTRAP_SEED = 20240917
OUTCOMES = ("candidate", "baseline", "tie", "both_bad")

# =====================================================================================================
# Pure functions
# =====================================================================================================


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a proportion `successes / n` (successes may be fractional: half ties).

    (0.0, 1.0) when n == 0: with no data every rate is possible."""
    if n <= 0:
        return (0.0, 1.0)
    if successes < 0 or successes > n:
        raise ValueError(f"successes ({successes}) must lie between 0 and n ({n})")
    p = successes / n
    z2 = z * z
    denominator = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denominator
    return (max(0.0, centre - half), min(1.0, centre + half))


@dataclass
class Tally:
    """Counts of outcomes from the candidate's point of view, and the win-rate they give."""

    wins: int = 0
    losses: int = 0
    ties: int = 0
    both_bad: int = 0

    @classmethod
    def of(cls, outcomes) -> Tally:
        counts = Counter(outcomes)
        unknown = set(counts) - set(OUTCOMES)
        if unknown:
            raise ValueError(f"unknown outcomes {sorted(unknown)}")
        return cls(counts["candidate"], counts["baseline"], counts["tie"], counts["both_bad"])

    @property
    def votes(self) -> int:
        return self.wins + self.losses + self.ties + self.both_bad

    @property
    def decisive(self) -> int:
        return self.wins + self.losses + self.ties

    @property
    def win_rate(self) -> float | None:
        return (self.wins + self.ties / 2) / self.decisive if self.decisive else None

    @property
    def interval(self) -> tuple[float | None, float | None]:
        if not self.decisive:
            return (None, None)
        return wilson_interval(self.wins + self.ties / 2, self.decisive)


def cohen_kappa(pairs) -> float | None:
    """Cohen's kappa for a list of (rating 1, rating 2) pairs over nominal categories.

    None when there is no pair, or when chance agreement is already certain (both raters always used
    the same single category: kappa is 0/0 there)."""
    pairs = list(pairs)
    n = len(pairs)
    if n == 0:
        return None
    observed = sum(1 for a, b in pairs if a == b) / n
    first = Counter(a for a, _ in pairs)
    second = Counter(b for _, b in pairs)
    expected = sum(first[c] * second[c] for c in set(first) | set(second)) / (n * n)
    if expected >= 1.0:
        return None
    return (observed - expected) / (1 - expected)


def krippendorff_alpha_nominal(units) -> float | None:
    """Krippendorff's alpha for nominal data. `units` is a list of lists: the values each item received
    (items with fewer than two values are not pairable and are ignored).

    None when fewer than two pairable values exist or all values are one category (no disagreement is
    possible, alpha is 0/0)."""
    coincidence: dict[tuple, float] = defaultdict(float)
    for values in units:
        m = len(values)
        if m < 2:
            continue
        for i, a in enumerate(values):
            for j, b in enumerate(values):
                if i != j:
                    coincidence[(a, b)] += 1.0 / (m - 1)
    totals: dict = defaultdict(float)
    for (a, _b), weight in coincidence.items():
        totals[a] += weight
    n = sum(totals.values())
    if n <= 1:
        return None
    disagreement_observed = sum(w for (a, b), w in coincidence.items() if a != b)
    cats = list(totals)
    disagreement_expected = sum(totals[a] * totals[b] for a in cats for b in cats if a != b)
    if disagreement_expected == 0:
        return None
    return 1.0 - (n - 1) * disagreement_observed / disagreement_expected


def win_matrix(battles, players: int) -> np.ndarray:
    """Collapse battles [(i, j, outcome), …] with outcome 1 (i won), 0 (j won) or 0.5 (tie) into
    W[i, j] = wins of i over j, ties counted as half a win for each side."""
    wins = np.zeros((players, players))
    for i, j, outcome in battles:
        wins[i, j] += outcome
        wins[j, i] += 1.0 - outcome
    return wins


def bradley_terry(wins: np.ndarray, l2: float = BT_L2, tol: float = 1e-10, max_iter: int = 100) -> np.ndarray:
    """Maximum (penalised) likelihood Bradley–Terry log-strengths θ for a win matrix W.

    Maximises Σ_ij W_ij·log σ(θ_i − θ_j) − l2/2·Σθ² by Newton's method (the problem is concave; with
    l2 > 0 strictly). With l2 > 0 the optimum has Σθ = 0; with l2 == 0 the scores are centred to mean 0
    (the likelihood only fixes differences, and needs every player to have won and lost something)."""
    wins = np.asarray(wins, dtype=float)
    k = wins.shape[0]
    if k == 0:
        return np.zeros(0)
    games = wins + wins.T
    total_wins = wins.sum(axis=1)
    theta = np.zeros(k)
    ridge = l2 if l2 > 0 else 1e-9
    for _ in range(max_iter):
        diff = theta[:, None] - theta[None, :]
        p = 1.0 / (1.0 + np.exp(-diff))
        gradient = total_wins - (games * p).sum(axis=1) - l2 * theta
        weights = games * p * (1.0 - p)
        hessian = weights - np.diag(weights.sum(axis=1)) - ridge * np.eye(k)
        step = np.linalg.solve(hessian, gradient)
        # backtracking keeps the step inside the region where the quadratic model is trustworthy
        scale = 1.0
        while np.max(np.abs(scale * step)) > 5.0:
            scale /= 2
        theta = theta - scale * step
        if np.max(np.abs(scale * step)) < tol:
            break
    return theta - theta.mean()


def elo_scale(theta: np.ndarray) -> np.ndarray:
    """Natural-log strengths on the Elo-like scale: 1000 + 400·log10(odds)."""
    return ELO_BASE + ELO_SCALE * np.asarray(theta) / math.log(10)


def bootstrap_bradley_terry(
    battles, players: int, rounds: int = BOOTSTRAP_ROUNDS, seed: int = BOOTSTRAP_SEED, l2: float = BT_L2
) -> np.ndarray:
    """Scores (Elo scale) of `rounds` refits on battles resampled with replacement: shape (rounds, k).

    Resampling is multinomial over the distinct (i, j, outcome) triples — the same as drawing votes with
    replacement, without materialising each resample (FastChat's trick)."""
    battles = list(battles)
    if not battles or rounds <= 0:
        return np.zeros((0, players))
    distinct = Counter(battles)
    triples = list(distinct)
    probabilities = np.array([distinct[t] for t in triples], dtype=float) / len(battles)
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(len(battles), probabilities, size=rounds)
    index_i = np.array([t[0] for t in triples])
    index_j = np.array([t[1] for t in triples])
    outcome = np.array([t[2] for t in triples], dtype=float)
    results = np.empty((rounds, players))
    for r in range(rounds):
        counts = draws[r]
        wins = np.zeros((players, players))
        np.add.at(wins, (index_i, index_j), counts * outcome)
        np.add.at(wins, (index_j, index_i), counts * (1.0 - outcome))
        results[r] = elo_scale(bradley_terry(wins, l2=l2))
    return results


# =====================================================================================================
# Database: a run's summary and a model line's leaderboard
# =====================================================================================================


@dataclass
class TagSummary:
    tag: str
    votes: int
    decisive: int
    wins: int
    losses: int
    ties: int
    both_bad: int
    win_rate: float | None
    low: float | None
    high: float | None

    @property
    def bar(self) -> IntervalBar:
        return IntervalBar(self.win_rate, self.low, self.high)


CHART_LEFT, CHART_WIDTH = 24.0, 552.0  # the interval charts are 600 units wide with 24 units of margin


def chart_x(fraction: float) -> str:
    """x coordinate (as an SVG attribute string) of a 0–1 fraction on the interval charts."""
    return f"{CHART_LEFT + CHART_WIDTH * min(1.0, max(0.0, fraction)):.1f}"


def percent(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.0f}%"


@dataclass
class IntervalBar:
    """An estimate on a 0–1 scale with its interval, and its geometry on the interval charts."""

    value: float | None
    low: float | None
    high: float | None

    @property
    def empty(self) -> bool:
        return self.value is None

    @property
    def x(self) -> str:
        return chart_x(self.value or 0.0)

    @property
    def low_x(self) -> str:
        return chart_x(self.low or 0.0)

    @property
    def high_x(self) -> str:
        return chart_x(self.high or 0.0)

    @property
    def width(self) -> str:
        return f"{CHART_WIDTH * max(0.0, (self.high or 0.0) - (self.low or 0.0)):.1f}"

    @property
    def text(self) -> str:
        return percent(self.value)

    @property
    def interval_text(self) -> str:
        if self.low is None:
            return "—"
        return f"{100 * self.low:.0f}–{100 * self.high:.0f}%"

    @property
    def excludes_half(self) -> bool:
        """The interval lies entirely on one side of 0.5."""
        return self.low is not None and (self.low > 0.5 or self.high < 0.5)


@dataclass
class RunSummary:
    """Everything the pages and the gate need to know about a run's votes (candidate's point of view)."""

    votes: int = 0  # all votes, both-bad included
    decisive: int = 0  # wins + losses + ties
    wins: int = 0
    losses: int = 0
    ties: int = 0
    both_bad: int = 0
    win_rate: float | None = None  # (wins + ties/2) / decisive
    low: float | None = None  # 95% Wilson interval of win_rate
    high: float | None = None
    position_a_rate: float | None = None  # share of A-or-B votes won by side A
    agreement: float | None = None  # Cohen's kappa on overlapped items (first two votes each)
    per_tag: list[TagSummary] = field(default_factory=list)
    # extras
    position_votes: int = 0  # votes for side A or side B
    position_low: float | None = None
    position_high: float | None = None
    alpha: float | None = None  # Krippendorff's alpha (nominal) over every vote on overlapped items
    overlap_items: int = 0  # comparisons with at least two votes
    observed_agreement: float | None = None  # share of overlapped items whose first two votes agree
    comparisons: int = 0
    slots: int = 0  # Σ votes_wanted
    reviewers: int = 0
    timeline: list[tuple] = field(default_factory=list)  # (created_at, outcome) in vote order
    run_id: int | None = None  # set by run_summary(): the partial links to the run's statistics page

    @property
    def both_bad_rate(self) -> float | None:
        return self.both_bad / self.votes if self.votes else None

    @property
    def both_bad_text(self) -> str:
        return percent(self.both_bad_rate)

    @property
    def agreement_label(self) -> str:
        """Landis & Koch's words for a kappa value."""
        kappa = self.agreement
        if kappa is None:
            return ""
        if kappa < 0:
            return "poor"
        for limit, words in (
            (0.2, "slight"),
            (0.4, "fair"),
            (0.6, "moderate"),
            (0.8, "substantial"),
        ):
            if kappa <= limit:
                return words
        return "almost perfect"

    @property
    def bar(self) -> IntervalBar:
        return IntervalBar(self.win_rate, self.low, self.high)

    @property
    def position_bar(self) -> IntervalBar:
        return IntervalBar(self.position_a_rate, self.position_low, self.position_high)

    @property
    def position_biased(self) -> bool:
        return self.position_bar.excludes_half

    @property
    def verdict(self) -> str:
        """One plain sentence on what the interval says."""
        if self.win_rate is None:
            return "No decisive votes yet."
        if self.low > 0.5:
            return "The candidate is preferred: the whole 95% interval lies above 50%."
        if self.high < 0.5:
            return "The baseline is preferred: the whole 95% interval lies below 50%."
        return "No clear winner yet: the 95% interval includes 50%."


def summarise(votes, comparison_tags: dict | None = None) -> RunSummary:
    """A RunSummary from vote records: dicts with comparison (id), reviewer (id), choice, outcome,
    created_at; `comparison_tags` maps comparison id → list of tags."""
    votes = sorted(votes, key=lambda v: (v["created_at"], v.get("id", 0)))
    tally = Tally.of(v["outcome"] for v in votes)
    low, high = tally.interval
    summary = RunSummary(
        votes=tally.votes,
        decisive=tally.decisive,
        wins=tally.wins,
        losses=tally.losses,
        ties=tally.ties,
        both_bad=tally.both_bad,
        win_rate=tally.win_rate,
        low=low,
        high=high,
        reviewers=len({v["reviewer"] for v in votes}),
        timeline=[(v["created_at"], v["outcome"]) for v in votes],
    )

    sides = [v["choice"] for v in votes if v["choice"] in ("a", "b")]
    summary.position_votes = len(sides)
    if sides:
        a_wins = sides.count("a")
        summary.position_a_rate = a_wins / len(sides)
        summary.position_low, summary.position_high = wilson_interval(a_wins, len(sides))

    by_item: dict = defaultdict(list)
    for v in votes:
        by_item[v["comparison"]].append(v["outcome"])
    overlapped = [outcomes for outcomes in by_item.values() if len(outcomes) >= 2]
    summary.overlap_items = len(overlapped)
    if overlapped:
        pairs = [(o[0], o[1]) for o in overlapped]
        summary.observed_agreement = sum(1 for a, b in pairs if a == b) / len(pairs)
        summary.agreement = cohen_kappa(pairs)
        summary.alpha = krippendorff_alpha_nominal(overlapped)

    if comparison_tags:
        per_tag: dict[str, list[str]] = defaultdict(list)
        for v in votes:
            for tag in comparison_tags.get(v["comparison"]) or ():
                per_tag[str(tag)].append(v["outcome"])
        rows = []
        for tag, outcomes in per_tag.items():
            t = Tally.of(outcomes)
            t_low, t_high = t.interval
            rows.append(
                TagSummary(
                    tag, t.votes, t.decisive, t.wins, t.losses, t.ties, t.both_bad, t.win_rate, t_low, t_high
                )
            )
        summary.per_tag = sorted(rows, key=lambda r: (-r.decisive, r.tag))
    return summary


def run_summary(run) -> RunSummary:
    """The votes of one evaluation run, summarised."""
    from django.db.models import Count, Sum

    from .models import Comparison, Vote

    votes = list(
        Vote.objects.filter(comparison__run=run)
        .order_by("created_at", "id")
        .values("id", "comparison", "reviewer", "choice", "outcome", "created_at")
    )
    comparisons = Comparison.objects.filter(run=run)
    tags = {pk: t for pk, t in comparisons.exclude(tags=[]).values_list("pk", "tags") if t}
    summary = summarise(votes, tags)
    counts = comparisons.aggregate(n=Count("id"), slots=Sum("votes_wanted"))
    summary.run_id = run.pk
    summary.comparisons = counts["n"] or 0
    summary.slots = counts["slots"] or 0
    return summary


@dataclass
class LeaderboardRow:
    label: str  # "support-assistant/3" or "base model SmolLM2-135M"
    version: object | None  # the ModelVersion, None for a base model
    base_model: object | None  # the BaseModel when the player is a base model
    score: float
    low: float
    high: float
    battles: int
    wins: float = 0.0  # ties count half
    rank: int = 0
    # geometry on the interval charts (the shown score range mapped to 0–1)
    x: str = "0"
    low_x: str = "0"
    width: str = "0"


def _player_key(kind: str, pk: int) -> tuple[str, int]:
    return (kind, pk)


def leaderboard(registered_model, rounds: int = BOOTSTRAP_ROUNDS, seed: int = BOOTSTRAP_SEED) -> list:
    """Bradley–Terry rows for every version of a model line that has votes, and the base models they were
    compared with, best first. Battles are the votes of every evaluation run whose candidate or baseline
    is a version of this line (both-bad votes left out)."""
    from django.db.models import Q

    from training_app.models import BaseModel

    from .models import ModelVersion, Vote

    rows = (
        Vote.objects.filter(
            Q(comparison__run__candidate__registered_model=registered_model)
            | Q(comparison__run__baseline_version__registered_model=registered_model)
        )
        .exclude(outcome="both_bad")
        .values_list(
            "outcome",
            "comparison__run__candidate_id",
            "comparison__run__baseline_version_id",
            "comparison__run__baseline_base_model_id",
        )
    )
    index: dict[tuple[str, int], int] = {}

    def player(key) -> int:
        if key not in index:
            index[key] = len(index)
        return index[key]

    battles = []
    for outcome, candidate_id, baseline_version_id, base_id in rows:
        i = player(_player_key("version", candidate_id))
        baseline_key = (
            _player_key("version", baseline_version_id)
            if baseline_version_id
            else _player_key("base", base_id)
        )
        j = player(baseline_key)
        battles.append((i, j, {"candidate": 1.0, "baseline": 0.0, "tie": 0.5}[outcome]))
    if not battles:
        return []
    k = len(index)
    wins = win_matrix(battles, k)
    scores = elo_scale(bradley_terry(wins))
    samples = bootstrap_bradley_terry(battles, k, rounds=rounds, seed=seed)
    lows = np.percentile(samples, 2.5, axis=0)
    highs = np.percentile(samples, 97.5, axis=0)
    games = (wins + wins.T).sum(axis=1)

    versions = ModelVersion.objects.select_related("registered_model").in_bulk(
        [pk for kind, pk in index if kind == "version"]
    )
    bases = BaseModel.objects.in_bulk([pk for kind, pk in index if kind == "base"])
    result = []
    for (kind, pk), i in index.items():
        version = versions.get(pk) if kind == "version" else None
        base = bases.get(pk) if kind == "base" else None
        label = str(version) if version is not None else f"base model {base.name if base else pk}"
        result.append(
            LeaderboardRow(
                label=label,
                version=version,
                base_model=base,
                score=float(scores[i]),
                low=float(lows[i]),
                high=float(highs[i]),
                battles=int(round(games[i])),
                wins=float(wins[i].sum()),
            )
        )
    result.sort(key=lambda r: -r.score)
    lo = min(r.low for r in result)
    hi = max(r.high for r in result)
    span = (hi - lo) or 1.0
    for rank, row in enumerate(result, start=1):
        row.rank = rank
        row.x = chart_x((row.score - lo) / span)
        row.low_x = chart_x((row.low - lo) / span)
        row.width = f"{CHART_WIDTH * max(0.0, row.high - row.low) / span:.1f}"
    return result
