"""What the joint model misses of the shop's truth, term by term (run after bench/quality.py).

The oracle AUC says how far a task is from the best possible model; this says which part of the truth
is missing. The shop draws every label from a logit that is a sum of named terms (user taste x item
vector, the hidden attributes, quality, price, the ad opener, per-user biases: ``shop.logit_terms``). For
each holdout row the script rebuilds those terms, checks that their sum gives the shop's recorded true
probability, and then, per term, fits a two-feature logistic regression on [model logit, term] on half the
holdout rows: the AUC it reaches on the other half is what the model would score if it also knew that
term (the model's own AUC is taken on that half too). A term the model has learned adds
nothing; a large lift names what to work on.

The taste term is split further: users' tastes into their region x age band mean ("group") and the rest
("individual"), item vectors into what category and attributes explain ("structure") and the rest ("own").

A second view regresses the model's logit on the (unsplit) terms: the slope per term is the share of it the
model carries, and what no term explains is the model's own noise. A task can carry every term and still
trail its oracle because its logit is noisy, as a task with few labels does.

    .venv/bin/python bench/gap_anatomy.py --dir /tmp/q   # the --dir (and shop options) of quality.py
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from datetime import date
from pathlib import Path

import numpy as np

START = date(2026, 1, 5)  # quality.py's shop start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, required=True, help="a bench/quality.py directory")
    parser.add_argument("--model", default="joint", help="model directory inside --dir")
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--items", type=int, default=3_000)
    parser.add_argument("--days", type=int, default=60)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    from mtl_core.data import warehouse as wh
    from mtl_core.data.shop import LATENT_DIM, TASTE_WEIGHT, ShopSpec, generate
    from mtl_core.judge.metrics import roc_auc
    from mtl_core.judge.oracle import oracle_probabilities
    from mtl_core.learn.checkpoint import load_model
    from mtl_core.learn.examples import NUMERIC, build_examples

    if not (args.dir / args.model / "model.pt").is_file():
        sys.exit(f"{args.dir / args.model} holds no trained model: run bench/quality.py --dir {args.dir} first")
    model = load_model(args.dir / args.model)
    settings = model.settings
    examples = build_examples(args.dir / "snapshot", settings.features, settings.tasks)
    shop = generate(ShopSpec(users=args.users, items=args.items, days=args.days, start=START, seed=args.seed))
    engine = wh.make_engine(f"sqlite:///{args.dir / 'warehouse.db'}")

    # Users' tastes split into the mean of their region x age band and the rest; item vectors into the part
    # category and attributes explain (least squares) and the rest.
    group = shop.region * len(np.unique(shop.age_band)) + shop.age_band
    group_taste = np.zeros_like(shop.taste)
    for g in np.unique(group):
        group_taste[group == g] = shop.taste[group == g].mean(axis=0)
    design = np.column_stack([np.eye(shop.category.max() + 1)[shop.category], shop.attrs])
    coef, *_ = np.linalg.lstsq(design, shop.item_vec, rcond=None)
    structure = design @ coef

    position_col = NUMERIC.index("position")
    report = {}
    for task in ("ctr", "cvr", "ad_ctr"):
        if task not in model.task_names:
            continue
        t = examples.task_names.index(task)
        rows = examples.task_rows(t, "holdout")
        labels = examples.labels[rows, t]
        p = model.predict(examples, rows)[:, model.task_names.index(task)].astype(np.float64)
        logit = np.log(p / (1 - p))
        user = examples.raw["user"][rows].astype(np.int64) - 1
        item = examples.raw["item"][rows].astype(np.int64) - 1
        day = ((examples.time[rows] - shop.t0.astype("datetime64[us]")) // np.timedelta64(1, "D")).astype(np.int64)
        ad = examples.raw["ad"][rows].astype(np.int64) - 1 if task == "ad_ctr" else None
        position = np.rint(np.expm1(examples.numeric[rows, position_col])) if task == "ctr" else None
        intercept, terms = true_logit_terms(shop, task, user, item, day, position=position, ad=ad)
        taste = shop._taste_on(user, day)[0]
        w = TASTE_WEIGHT[task]
        drifted = shop.spec.drift_day is not None and (day >= shop.spec.drift_day).any()
        dot = lambda a, b: np.einsum("ij,ij->i", a, b) / math.sqrt(LATENT_DIM)  # noqa: E731
        spec = next(spec for spec in settings.tasks if spec.name == task)
        true_p = oracle_probabilities(engine, spec, examples, rows)
        rebuilt = 1 / (1 + np.exp(-(intercept + sum(terms.values()))))
        if true_p is None or not np.abs(rebuilt - true_p).max() <= 1e-6:  # None: rows the warehouse has no truth for
            sys.exit(
                f"{task}: the rebuilt terms do not match the true probabilities in {args.dir / 'warehouse.db'}: "
                "pass the shop options (--users, --items, --days, --seed) the quality run used"
            )
        carried, noise_sd = _carried(logit, terms)
        if not drifted:  # the split below uses the pre-drift tastes
            individual = taste - group_taste[user]
            own = shop.item_vec[item] - structure[item]
            terms |= {
                "  group taste x structure": w * dot(group_taste[user], structure[item]),
                "  group taste x item's own": w * dot(group_taste[user], own),
                "  individual taste x structure": w * dot(individual, structure[item]),
                "  individual taste x item's own": w * dot(individual, own),
            }
        # Fitted on half the holdout rows, scored on the other half (the model's own AUC too): no in-sample figure.
        fit_half = np.random.default_rng(0).random(len(rows)) < 0.5
        model_auc = roc_auc(labels[~fit_half], logit[~fit_half])
        lifts = {
            name: round(_two_feature_auc(logit, value, labels, fit_half, roc_auc) - model_auc, 4)
            for name, value in terms.items()
        }
        report[task] = {
            "n": len(rows),
            "model_auc": round(model_auc, 4),
            "oracle_auc": round(roc_auc(labels, true_p), 4),
            "auc_lift_if_known": lifts,
            "share_carried": carried,
            "noise_sd": noise_sd,
            "true_logit_sd": round(float(np.std(sum(terms[name] for name in carried))), 3),
        }
        print(
            f"\n{task}: model {model_auc:.4f}, oracle {roc_auc(labels, true_p):.4f}, {len(rows):,} rows",
            file=sys.stderr,
        )
        print(f"  {'term':<34} {'AUC lift if known':>17} {'share carried':>14}", file=sys.stderr)
        for name, lift in lifts.items():
            share = f"{carried[name]:14.2f}" if name in carried else ""
            print(f"  {name:<34} {lift:+17.4f} {share}", file=sys.stderr)
        print(
            f"  model logit noise (sd of what no term explains): {noise_sd:.3f}; "
            f"sd of the true logit {report[task]['true_logit_sd']:.3f}",
            file=sys.stderr,
        )
    print(json.dumps(report, indent=2))


def true_logit_terms(shop, task: str, user, item, day, position=None, ad=None) -> tuple[float, dict[str, np.ndarray]]:
    """The shop's own true-logit terms (``shop.logit_terms``), with its taste x item affinity split in two.

    Indices are the shop's own (0-based); ``position`` is needed for ctr, ``ad`` for ad_ctr. The caller
    checks the sum against the shop's recorded probabilities.
    """
    from mtl_core.data.shop import TASTE_WEIGHT

    intercept, terms = shop.logit_terms(task, user, item, day, position=position, ad=ad)
    dot, attr = shop.affinity_parts(user, item, day)
    w = TASTE_WEIGHT[task]
    split = {"taste x item": w * dot, "attribute affinity": w * attr}
    return intercept, split | {name: value for name, value in terms.items() if name != "affinity"}


def _carried(logit: np.ndarray, terms: dict[str, np.ndarray]) -> tuple[dict[str, float], float]:
    """Least squares of the model's logit on the true terms, and the spread of what they leave unexplained.

    A slope of 1: the model's logit moves one for one with that term. All slopes lower by the same factor
    (ad_ctr: 0.70-0.91) is a model that hedges everywhere, as a calibrated but uncertain one does; one slope
    near 0 (the per-user biases) is a term the model does not have. The unexplained spread is the model's
    own noise, which costs AUC however well the terms are carried."""
    names = list(terms)
    design = np.column_stack([terms[name] for name in names] + [np.ones(len(logit))])
    coef, *_ = np.linalg.lstsq(design, logit, rcond=None)
    noise = logit - design @ coef
    slopes = coef[:-1]  # the last coefficient is the intercept
    return {name: round(float(c), 3) for name, c in zip(names, slopes, strict=True)}, round(float(noise.std()), 3)


def _two_feature_auc(logit: np.ndarray, term: np.ndarray, labels: np.ndarray, fit_half: np.ndarray, roc_auc) -> float:
    """AUC of a logistic regression on [model logit, term]: fitted on ``fit_half``, scored on the other rows."""
    from mtl_core.judge.metrics import fit_logistic

    features = np.column_stack([logit, term])
    weights = fit_logistic(features[fit_half], labels[fit_half])
    return roc_auc(labels[~fit_half], features[~fit_half] @ weights[:2])


if __name__ == "__main__":
    main()
