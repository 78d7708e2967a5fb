"""bench/gate_power.py's trial construction: the worse and better challengers hit their AUC targets, and on
data with plenty of evidence the evidence rule tells the three settings apart."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from mtl_core.config import DEFAULT_TASKS, GateSettings
from mtl_core.judge.metrics import roc_auc

spec = importlib.util.spec_from_file_location("gate_power", Path(__file__).parents[2] / "bench" / "gate_power.py")
gate_power = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gate_power)


def synthetic(n: int, models: int, rng) -> dict:
    """Labels drawn from a true logit; each model sees the truth plus its own noise."""
    true_logit = rng.normal(-1.0, 1.0, n)
    labels = rng.random(n) < 1 / (1 + np.exp(-true_logit))
    logits = [true_logit + rng.normal(0, 1.0, n) for _ in range(models)]
    return {"labels": labels, "logits": logits, "true_logit": true_logit}


def test_the_worse_and_better_challengers_are_0_01_off_the_champion():
    rng = np.random.default_rng(0)
    d = synthetic(20_000, 2, rng)
    champion = roc_auc(d["labels"], d["logits"][1])
    worse = gate_power._worse(d["labels"], d["logits"][1], champion - 0.01, rng)
    better = gate_power._better(d["labels"], d["logits"][1], d["true_logit"], champion + 0.01)
    assert roc_auc(d["labels"], worse) == pytest.approx(champion - 0.01, abs=2e-4)
    assert roc_auc(d["labels"], better) == pytest.approx(champion + 0.01, abs=2e-4)
    # A challenger already more than 0.01 better (or worse) stays as it is: "at least 0.01".
    ahead = roc_auc(d["labels"], gate_power._better(d["labels"], d["logits"][0], d["true_logit"], champion - 0.02))
    assert ahead == pytest.approx(roc_auc(d["labels"], d["logits"][0]))
    assert gate_power._better(d["labels"], d["logits"][0], d["true_logit"], 0.999) is None


def test_with_plenty_of_evidence_the_evidence_rule_tells_the_settings_apart():
    rng = np.random.default_rng(1)
    data = {task.name: synthetic(40_000, 3, rng) for task in DEFAULT_TASKS}
    rules = {"evidence": GateSettings(), "point": GateSettings(rule="point")}
    rates = gate_power._operating_characteristics(data, list(DEFAULT_TASKS), rules, trials=40, rng=rng)
    evidence = rates["evidence"]
    assert evidence["aa_promotion"]["rate"] <= 0.1
    assert evidence["one_task_worse_promotion"]["rate"] <= 0.1
    assert evidence["all_better_promotion"]["rate"] >= 0.9
    assert rates["point"]["all_better_promotion"]["rate"] >= 0.9


def test_rates_come_with_wilson_intervals():
    assert gate_power._rate(0, 20) == {"rate": 0.0, "low": 0.0, "high": 0.161, "trials": 20}
    assert gate_power._rate(10, 20)["low"] == pytest.approx(0.299, abs=1e-3)


def test_the_seed_spread_is_the_models_auc_standard_deviation_per_task_and_of_their_mean():
    rng = np.random.default_rng(1)
    data = {"ctr": synthetic(5_000, 4, rng), "cvr": synthetic(5_000, 4, rng)}
    spread = gate_power._seed_spread(data)
    aucs = np.array([[roc_auc(d["labels"], logit) for logit in d["logits"]] for d in data.values()])
    assert spread["ctr"] == pytest.approx(np.std(aucs[0], ddof=1), abs=1e-5)
    assert spread["cvr"] == pytest.approx(np.std(aucs[1], ddof=1), abs=1e-5)
    assert spread["mean"] == pytest.approx(np.std(aucs.mean(axis=0), ddof=1), abs=1e-5)
    assert spread["mean"] > 0


def test_stored_rates_pool_the_test_shops_and_drop_those_of_other_knobs():
    knobs = {"rule": "evidence", "min_gain": 0.0, "seed_sd": 0.002}

    def measured(aa: int, better: int) -> dict:
        return {
            "aa_promotion": gate_power._rate(aa, 200),
            "aa_promotion_real_pairs": gate_power._rate(0, 30),
            "one_task_worse_promotion": gate_power._rate(0, 200),
            "all_better_promotion": gate_power._rate(better, 200),
        }

    first = gate_power._merged_rates(None, measured(8, 166), knobs, 101, "run on 101")
    both = gate_power._merged_rates(first, measured(20, 127), knobs, 103, "run on 103")
    assert both["shops"] == ["101", "103"] and both["aa_promotion"]["trials"] == 400
    assert both["aa_promotion"]["rate"] == pytest.approx(28 / 400, abs=1e-3)
    assert (both["aa_promotion"]["shop_min"], both["aa_promotion"]["shop_max"]) == (0.04, 0.1)
    assert both["all_better_promotion"]["rate"] == pytest.approx(293 / 400, abs=1e-3)
    # Measured again on 103: replaced, not counted twice.
    again = gate_power._merged_rates(both, measured(20, 127), knobs, 103, "run on 103")
    assert again["aa_promotion"]["trials"] == 400
    # Rates of other knobs say nothing about this rule: they are dropped.
    other = gate_power._merged_rates(both, measured(2, 150), {**knobs, "seed_sd": 0.003}, 102, "run on 102")
    assert other["shops"] == ["102"] and other["aa_promotion"]["trials"] == 200
