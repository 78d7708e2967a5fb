"""The gate's operating characteristics: how often each rule promotes a challenger that is no better, one
that is worse on one task, and one that is better on every task.

On a simulated shop of the demo's size, ``--models`` copies of the default model are trained on the same
window with different training seeds (the DAG's first run, interval ending 7 weeks after the shop's
start, on all of its 49 days, the newest ``--holdout-days`` of them the holdout). Each trial then

1. draws a fresh holdout of the same size by resampling the holdout's rows (a paired bootstrap: both
   models score the same drawn rows), and picks two different models, champion and challenger;
2. builds the challenger of the setting from the second model's scores:
   * A/A: as it is (the same configuration, another training seed, the same data);
   * one task worse: on one task (in turn), its logit plus Gaussian noise, scaled so that its AUC on the
     whole holdout is 0.01 below the champion's; the other tasks as they are;
   * all better: on every task, its logit moved toward the shop's true logit until its AUC on the whole
     holdout is 0.01 above the champion's;
3. compares them per task (AUC difference with DeLong's variance, as ``mtl_core.judge.evaluate`` does) and
   applies each rule of ``mtl_core.judge.gate.decide``.

Each rate comes with its 95 % Wilson interval. The A/A rate is also taken without resampling, over every
ordered pair of trained models on the real holdout, to show that the resampled trials agree.

``--holdout-days`` may list several widths: the newest N days of the (widest) holdout are the gate's
evidence. ``--write-rates`` (test shops only) adds this shop's rates at the first width to
``mtl_core/judge/gate_error_rates.json``, which every gate decision quotes: pooled over the test shops
measured with the same settings, with each shop's own rates and their range.

    .venv/bin/python bench/gate_power.py --seed 101 [--models 6 --trials 200 --holdout-days 7 14]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import sys
import time
from datetime import date, timedelta
from pathlib import Path

import numpy as np

from mtl_core.config import DEMO_ITEMS, DEMO_USERS

START = date(2026, 1, 5)
END_WEEK = 7  # the demo's third run, which under the expanding policy trains on all 49 days too
EFFECT = 0.01


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=2, help="shop seed: 1-9 to choose, 101-103 to report")
    parser.add_argument("--users", type=int, default=DEMO_USERS, help="the demo's shop size by default")
    parser.add_argument("--items", type=int, default=DEMO_ITEMS)
    parser.add_argument("--models", type=int, default=6, help="models trained with different seeds")
    parser.add_argument("--trials", type=int, default=200, help="resampled trials per setting")
    parser.add_argument("--holdout-days", type=int, nargs="+", default=[7, 14])
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--write-rates", action="store_true", help="store the rates the gate decisions quote")
    parser.add_argument("--min-gains", type=float, nargs="*", default=[], help="evidence rule variants to measure")
    parser.add_argument(
        "--seed-sds", type=float, nargs="*", default=[], help="evidence rule variants: gate.seed_sd values to measure"
    )
    args = parser.parse_args()
    if args.write_rates and args.seed < 100:
        parser.error(
            "--write-rates stores the rates every decision quotes: measure them on a test shop (101-103), "
            f"not dev shop {args.seed}"
        )
    began = time.perf_counter()
    root = (args.dir or Path(f"/tmp/mtl-gate-power-{args.seed}")).resolve()
    os.environ["MTL_DATA_DIR"] = str(root)

    from mtl_core.config import GateSettings, load_settings
    from mtl_core.data.extract import extract_snapshot
    from mtl_core.data.pseudonyms import pseudonymiser_for
    from mtl_core.data.shop import ShopSpec, write_shop
    from mtl_core.data.warehouse import make_engine
    from mtl_core.judge.oracle import Truth, oracle_probabilities
    from mtl_core.learn.checkpoint import load_model
    from mtl_core.learn.examples import build_examples
    from mtl_core.learn.training import train_model

    settings = load_settings(environ={"MTL_DATA_DIR": str(root)})
    widest = max(args.holdout_days)
    # The widest holdout asked for; a narrower one is its newest days.
    settings = settings.model_copy(
        update={
            "features": settings.features.model_copy(update={"holdout_days": widest}),
            "pipeline": settings.pipeline.model_copy(update={"policy": "scratch"}),
        }
    )
    end = START + timedelta(days=7 * END_WEEK)
    engine = make_engine(settings.resolved_warehouse_url)
    snapshot = root / "snapshot"
    if not (root / "models" / f"seed{args.models - 1}" / "settings.json").exists():
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        write_shop(
            engine,
            ShopSpec(users=args.users, items=args.items, days=(end - START).days, start=START, seed=args.seed),
            replace=True,
        )
        # All the shop's 7 weeks: a churn label needs 14 days after its cut-off, which a 14-day holdout
        # inside the 28-day window would not leave the training days.
        extract_snapshot(engine, START.isoformat(), end.isoformat(), snapshot, pseudonymiser_for(settings))
    examples = build_examples(snapshot, settings.features, settings.tasks)
    for k in range(args.models):
        out = root / "models" / f"seed{k}"
        if not (out / "settings.json").exists():
            t0 = time.perf_counter()
            run = settings.model_copy(update={"train": settings.train.model_copy(update={"seed": k})})
            train_model(examples, out, run, progress=False, source=snapshot)
            say(f"trained model {k + 1} of {args.models} in {time.perf_counter() - t0:.0f} s")
    models = [load_model(root / "models" / f"seed{k}") for k in range(args.models)]
    holdout = np.flatnonzero(examples.split == "holdout")
    scores = [m.predict(examples, holdout) for m in models]
    lookup = np.full(len(examples), -1, dtype=np.int64)
    lookup[holdout] = np.arange(len(holdout))
    truth = Truth(engine, pseudonymiser_for(settings))
    tasks = list(settings.tasks)
    rng = np.random.default_rng(args.seed)
    rules = {"evidence": GateSettings(), "point": GateSettings(rule="point")}
    # Variants of the evidence rule, to choose the default on a dev shop: each names both of its knobs.
    for gain in args.min_gains:
        rules[f"evidence_min_gain_{gain:g}_seed_sd_0"] = GateSettings(min_gain=gain, seed_sd=0.0)
    for sd in args.seed_sds:
        for gain in args.min_gains or [GateSettings().min_gain]:
            rules[f"evidence_min_gain_{gain:g}_seed_sd_{sd:g}"] = GateSettings(min_gain=gain, seed_sd=sd)
    results: dict = {}
    spread: dict = {}
    for days in args.holdout_days:
        data = {}
        for t, task in enumerate(tasks):
            # The newest days/widest of each task's holdout rows: for the event tasks the newest `days` days;
            # for churn (examples at cut-offs 14 days before their labels end) the newest cut-offs.
            rows = examples.task_rows(t, "holdout")
            rows = rows[np.argsort(examples.time[rows], kind="stable")][-round(len(rows) * days / widest) :]
            true_p = np.clip(oracle_probabilities(truth, task, examples, rows), 1e-6, 1 - 1e-6)
            data[task.name] = {
                "labels": examples.labels[rows, t].astype(bool),
                "logits": [_logit(s[lookup[rows], t]) for s in scores],
                "true_logit": _logit(true_p),
            }
        say(f"\nholdout of {days} days: " + ", ".join(f"{n} {len(d['labels']):,} rows" for n, d in data.items()))
        spread[f"{days}_days"] = _seed_spread(data)
        say(f"between-seed AUC spread: {json.dumps(spread[f'{days}_days'])}")
        results[f"{days}_days"] = _operating_characteristics(data, tasks, rules, args.trials, rng)
        say(json.dumps(results[f"{days}_days"], indent=1))
    summary = {
        "shop": {"seed": args.seed, "users": args.users, "items": args.items, "interval_end": end.isoformat()},
        "models": args.models,
        "trials": args.trials,
        "effect": EFFECT,
        "seed_spread": spread,
        "results": results,
        "seconds": round(time.perf_counter() - began, 1),
    }
    print(json.dumps(summary, indent=2))
    if args.write_rates:
        from mtl_core.judge.gate import RATES_FILE

        days = args.holdout_days[0]
        measured_by = (
            f"bench/gate_power.py --seed {args.seed} --users {args.users} --items {args.items} --models {args.models} "
            f"--trials {args.trials} --holdout-days {days}, on {date.today().isoformat()}"
        )
        stored = json.loads(RATES_FILE.read_text()) if RATES_FILE.exists() else {}
        rates = {
            rule: _merged_rates(stored.get(rule), values, _knobs(rules[rule]), args.seed, measured_by)
            for rule, values in results[f"{days}_days"].items()
            if rule in ("evidence", "point")
        }
        tmp = RATES_FILE.with_suffix(".tmp")
        tmp.write_text(json.dumps(rates, indent=2) + "\n")
        tmp.replace(RATES_FILE)
        say(f"wrote {RATES_FILE} (shops {', '.join(rates['evidence']['shops'])})")


RATE_KEYS = ("aa_promotion", "aa_promotion_real_pairs", "one_task_worse_promotion", "all_better_promotion")


def _merged_rates(stored: dict | None, measured: dict, knobs: dict, seed: int, measured_by: str) -> dict:
    """A rule's stored rates with this shop's added: each rate pooled over the test shops measured with the
    same knobs (their trials summed, with the pooled Wilson interval) and the range of the shops' own rates.
    Rates of other knobs are dropped, since they say nothing of this rule."""
    shops = dict(stored.get("by_shop", {})) if stored and stored.get("settings") == knobs else {}
    shops[str(seed)] = {**{key: measured[key] for key in RATE_KEYS}, "measured_by": measured_by}
    merged: dict = {"settings": knobs, "shops": sorted(shops), "by_shop": shops}
    for key in RATE_KEYS:
        per_shop = [shop[key] for shop in shops.values()]
        successes = sum(round(r["rate"] * r["trials"]) for r in per_shop)
        pooled = _rate(successes, sum(r["trials"] for r in per_shop))
        merged[key] = {
            **pooled,
            "shop_min": min(r["rate"] for r in per_shop),
            "shop_max": max(r["rate"] for r in per_shop),
        }
    merged["measured_by"] = f"bench/gate_power.py on test shops {', '.join(sorted(shops))}"
    return merged


def _knobs(gate) -> dict:
    """The settings that decide a rule's verdicts against a champion: all of them but the floors (which only
    apply without one) and the power (which only sizes a hold's "how much more data")."""
    return gate.model_dump(exclude={"floors", "power"})


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-7, 1 - 1e-7)
    return np.log(p / (1 - p))


def _auc(labels: np.ndarray, scores: np.ndarray) -> float:
    from mtl_core.judge.metrics import roc_auc

    return float(roc_auc(labels, scores))


def _seed_spread(data) -> dict:
    """The standard deviation over the trained models (which differ only in their seed) of each task's AUC
    and of the tasks' mean AUC, on the whole holdout: the ``gate.seed_sd`` a dev shop suggests."""
    aucs = np.array([[_auc(d["labels"], logits) for logits in d["logits"]] for d in data.values()])  # task x model
    return {
        **{name: round(float(row.std(ddof=1)), 5) for name, row in zip(data, aucs, strict=True)},
        "mean": round(float(aucs.mean(axis=0).std(ddof=1)), 5),
    }


def _solve(target: float, auc_of, low: float, high: float, steps: int = 30) -> float:
    """The parameter in [low, high] at which the (monotone) ``auc_of`` reaches ``target``, by bisection."""
    increasing = auc_of(high) > auc_of(low)
    for _ in range(steps):
        mid = (low + high) / 2
        if (auc_of(mid) < target) == increasing:
            low = mid
        else:
            high = mid
    return (low + high) / 2


def _worse(labels, logit, target, rng) -> np.ndarray:
    noise = rng.standard_normal(len(logit)) * logit.std()
    scale = _solve(target, lambda s: _auc(labels, logit + s * noise), 0.0, 5.0)
    return logit + scale * noise


def _better(labels, logit, true_logit, target) -> np.ndarray | None:
    if _auc(labels, true_logit) < target:
        return None  # even the truth is not 0.01 better on this holdout
    weight = _solve(target, lambda w: _auc(labels, (1 - w) * logit + w * true_logit), 0.0, 1.0)
    return (1 - weight) * logit + weight * true_logit


def _comparison(data, challenger, champion, rows) -> dict:
    from mtl_core.judge.delong import paired_auc_difference

    tasks = {}
    for name, d in data.items():
        take = rows[name]
        diff = paired_auc_difference(d["labels"][take], challenger[name][take], champion[name][take])
        tasks[name] = {
            "challenger": {"auc": diff["auc_a"], "n": len(take)},
            "champion": {"auc": diff["auc_b"], "n": len(take)},
            "auc_delta": diff,
        }
    return {"tasks": tasks, "split": "holdout"}


def _operating_characteristics(data, tasks, rules, trials: int, rng) -> dict:
    from mtl_core.judge.gate import decide

    n_models = len(next(iter(data.values()))["logits"])
    pairs = [(a, b) for a, b in itertools.permutations(range(n_models), 2)]
    counts = {rule: {"aa": 0, "worse": 0, "better": 0, "aa_real": 0} for rule in rules}
    held = {rule: {"aa": 0, "worse": 0, "better": 0} for rule in rules}
    everything = {name: np.arange(len(d["labels"])) for name, d in data.items()}
    # A/A without resampling: every ordered pair of trained models on the real holdout.
    for a, b in pairs:
        cmp = _comparison(data, _logits(data, a), _logits(data, b), everything)
        for rule, gate in rules.items():
            counts[rule]["aa_real"] += decide(cmp, tasks, gate).verdict == "promote"
    names = list(data)
    worse_cache: dict[tuple[int, int, str], np.ndarray] = {}
    better_cache: dict[tuple[int, int], dict[str, np.ndarray]] = {}
    for trial in range(trials):
        a, b = pairs[rng.integers(len(pairs))]
        rows = {name: rng.integers(0, len(d["labels"]), len(d["labels"])) for name, d in data.items()}
        champion = _logits(data, b)
        settings = {"aa": _logits(data, a)}
        # Worse and better are built on the whole holdout (the population the drawn rows come from), once
        # per pair of models.
        worse_task = names[trial % len(names)]
        d = data[worse_task]
        if (a, b, worse_task) not in worse_cache:
            target = _auc(d["labels"], champion[worse_task]) - EFFECT
            worse_cache[a, b, worse_task] = _worse(d["labels"], d["logits"][a], target, rng)
        settings["worse"] = {**_logits(data, a), worse_task: worse_cache[a, b, worse_task]}
        if (a, b) not in better_cache:
            better = {}
            for name, d in data.items():
                target = _auc(d["labels"], champion[name]) + EFFECT
                improved = _better(d["labels"], d["logits"][a], d["true_logit"], target)
                better[name] = improved if improved is not None else d["logits"][a]
            better_cache[a, b] = better
        settings["better"] = better_cache[a, b]
        for setting, challenger in settings.items():
            cmp = _comparison(data, challenger, champion, rows)
            for rule, gate in rules.items():
                verdict = decide(cmp, tasks, gate).verdict
                counts[rule][setting] += verdict == "promote"
                held[rule][setting] += verdict == "hold"
    out = {}
    for rule in rules:
        c = counts[rule]
        out[rule] = {
            "aa_promotion": _rate(c["aa"], trials),
            "aa_promotion_real_pairs": _rate(c["aa_real"], len(pairs)),
            "one_task_worse_promotion": _rate(c["worse"], trials),
            "all_better_promotion": _rate(c["better"], trials),
            "held": {setting: round(n / trials, 3) for setting, n in held[rule].items()},
        }
    return out


def _logits(data, k: int) -> dict[str, np.ndarray]:
    return {name: d["logits"][k] for name, d in data.items()}


def _rate(successes: int, trials: int) -> dict:
    """The rate with its 95% Wilson interval."""
    z = 1.959964
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * np.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    return {
        "rate": round(p, 3),
        "low": round(max(0.0, centre - half), 3),
        "high": round(min(1.0, centre + half), 3),
        "trials": trials,
    }


if __name__ == "__main__":
    main()
