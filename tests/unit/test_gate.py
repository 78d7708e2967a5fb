"""The promotion gate: the evidence rule (default), the old point rule, the no-champion floors, and the record."""

from __future__ import annotations

import json
import math
import shutil

import pytest

from mtl_core.config import DEFAULT_TASKS, TaskSpec
from mtl_core.judge.gate import GateError, GateSettings, decide
from mtl_core.registry.decisions import describe, record_decision

TASKS = list(DEFAULT_TASKS)  # ctr, cvr, ad_ctr, churn; floor 0.6 each
POINT = GateSettings(rule="point")


def comparison(aucs: dict[str, tuple[float, float | None]], low: float = 0.001, se: float | None = None, **extra):
    """compare_models-shaped input: {task: (challenger auc, champion auc or None)}."""
    tasks = {}
    for name, (ours, theirs) in aucs.items():
        challenger = {
            "auc": ours,
            "logloss": extra.get("logloss", (0.30, 0.30))[0],
            "ece": extra.get("ece", (0.01, 0.01))[0],
            "n": 1000,
        }
        if theirs is None:
            tasks[name] = {"challenger": challenger, "champion": None, "auc_delta": None}
            continue
        champion = {
            "auc": theirs,
            "logloss": extra.get("logloss", (0.30, 0.30))[1],
            "ece": extra.get("ece", (0.01, 0.01))[1],
            "n": 1000,
        }
        delta = ours - theirs
        tasks[name] = {
            "challenger": challenger,
            "champion": champion,
            "auc_delta": {"delta": delta, "low": low, "high": delta + 0.01, **({"se": se} if se is not None else {})},
        }
    return {"tasks": tasks, "split": "holdout"}


ALL_BETTER = {"ctr": (0.71, 0.70), "cvr": (0.66, 0.65), "ad_ctr": (0.62, 0.61), "churn": (0.80, 0.79)}


def test_point_rule_all_tasks_better_promotes():
    decision = decide(comparison(ALL_BETTER), TASKS, POINT)
    assert decision.verdict == "promote" and decision.promote
    assert decision.reason.startswith("promoted: every task beats the champion")
    assert all(row["passed"] for row in decision.per_task.values())
    assert decision.per_task["ctr"]["delta"] == pytest.approx(0.01)
    assert decision.rule["name"] == "every_task_beats_champion" and decision.rule["min_delta"] == 0.0


def test_point_rule_one_task_worse_rejects_naming_it_and_by_how_much():
    aucs = {**ALL_BETTER, "churn": (0.785, 0.79)}
    decision = decide(comparison(aucs), TASKS, POINT)
    assert decision.verdict == "reject"
    assert "1 of 4 task(s) failed" in decision.reason
    assert "churn: AUC 0.7850 vs champion 0.7900 (delta -0.0050" in decision.reason
    assert "ctr" not in decision.reason  # only the failing task is named
    assert not decision.per_task["churn"]["passed"] and decision.per_task["ctr"]["passed"]


def test_point_rule_equal_auc_is_not_better():
    decision = decide(comparison({**ALL_BETTER, "cvr": (0.65, 0.65)}), TASKS, POINT)
    assert decision.verdict == "reject" and "cvr" in decision.reason and "must be above 0" in decision.reason


def test_point_rule_min_delta_must_be_exceeded():
    settings = GateSettings(rule="point", min_delta=0.015)
    aucs = {**ALL_BETTER, "ctr": (0.72, 0.70)}  # only ctr gains more than 0.015
    decision = decide(comparison(aucs), TASKS, settings)
    assert decision.verdict == "reject"
    assert [n for n, r in decision.per_task.items() if not r["passed"]] == ["cvr", "ad_ctr", "churn"]
    assert "must exceed +0.0150" in decision.reason
    assert decide(comparison(aucs), TASKS, GateSettings(rule="point", min_delta=0.005)).verdict == "promote"


def test_point_rule_significance_uses_the_intervals_lower_bound():
    settings = GateSettings(rule="point", require_significance=True)
    assert decide(comparison(ALL_BETTER, low=0.002), TASKS, settings).verdict == "promote"
    decision = decide(comparison(ALL_BETTER, low=-0.003), TASKS, settings)
    assert decision.verdict == "reject" and "not significant" in decision.reason
    assert decision.per_task["ctr"]["low"] == pytest.approx(-0.003)
    # Off by default: the same noisy gain promotes.
    assert decide(comparison(ALL_BETTER, low=-0.003), TASKS, POINT).verdict == "promote"


def test_guardrails_on_logloss_and_calibration():
    worse_logloss = comparison(ALL_BETTER, logloss=(0.35, 0.30), se=0.002)
    assert decide(worse_logloss, TASKS).verdict == "promote"  # guardrails are off by default
    decision = decide(worse_logloss, TASKS, GateSettings(max_logloss_increase=0.02))
    assert decision.verdict == "reject" and "logloss worse by 0.0500" in decision.reason
    assert decide(worse_logloss, TASKS, GateSettings(max_logloss_increase=0.06)).verdict == "promote"
    worse_ece = comparison(ALL_BETTER, ece=(0.05, 0.01), se=0.002)
    decision = decide(worse_ece, TASKS, GateSettings(max_ece_increase=0.02))
    assert decision.verdict == "reject" and "ece worse by 0.0400" in decision.reason


def test_no_champion_uses_the_floors():
    first = comparison({name: (0.65, None) for name in ALL_BETTER})
    decision = decide(first, TASKS)
    assert decision.verdict == "promote" and decision.rule["name"] == "every_task_clears_floor"
    below = comparison({**{name: (0.65, None) for name in ALL_BETTER}, "ad_ctr": (0.58, None)})
    decision = decide(below, TASKS)
    assert decision.verdict == "reject"
    assert "ad_ctr: AUC 0.5800 is below its floor 0.6000" in decision.reason
    # Floors from the gate settings override the task's own, per task.
    assert decide(below, TASKS, GateSettings(floors={"ad_ctr": 0.55})).verdict == "promote"
    # evaluate_model output (no champion at all) is accepted as is.
    evaluated = {"tasks": {name: {"auc": 0.65, "logloss": 0.3} for name in ALL_BETTER}}
    assert decide(evaluated, TASKS).verdict == "promote"


def test_task_missing_from_the_comparison_rejects():
    aucs = {name: v for name, v in ALL_BETTER.items() if name != "churn"}
    decision = decide(comparison(aucs), TASKS)
    assert decision.verdict == "reject"
    assert "churn: no holdout examples" in decision.reason
    assert decision.rule["name"] == "every_task_noninferior_and_mean_gain"
    assert decision.per_task["churn"]["mode"] == "missing"


def test_undefined_auc_rejects_and_json_has_no_nan():
    decision = decide(comparison({**ALL_BETTER, "cvr": (math.nan, 0.65)}), TASKS)
    assert decision.verdict == "reject" and "cvr: challenger AUC undefined" in decision.reason
    text = json.dumps(decision.as_dict(), allow_nan=False)  # would raise on NaN
    assert json.loads(text)["per_task"]["cvr"]["challenger_auc"] is None


def test_configured_tasks_decide_which_must_pass():
    only_two = [
        TaskSpec(name="ctr", sample_space="feed", label="clicked"),
        TaskSpec(name="churn", sample_space="users", label="churned"),
    ]
    aucs = {**ALL_BETTER, "cvr": (0.50, 0.65)}  # a worse task the configuration no longer has
    decision = decide(comparison(aucs, se=0.002), only_two)
    assert decision.verdict == "promote" and set(decision.per_task) == {"ctr", "churn"}
    with pytest.raises(GateError, match="at least one task"):
        decide(comparison(aucs), [])


# --- the evidence rule (default) -------------------------------------------------------------------------
def evidence(deltas: dict[str, float], se: dict[str, float] | float) -> dict:
    """A comparison with DeLong standard errors: {task: delta}, champion AUC 0.70 everywhere."""
    ses = se if isinstance(se, dict) else dict.fromkeys(deltas, se)
    return comparison({name: (0.70 + d, 0.70) for name, d in deltas.items()}, low=-1.0, se=None) | {
        "tasks": {
            name: {**entry, "auc_delta": {"delta": deltas[name], "se": ses[name]}}
            for name, entry in comparison({n: (0.70 + d, 0.70) for n, d in deltas.items()})["tasks"].items()
        }
    }


def test_evidence_rule_promotes_a_clear_gain_without_claiming_every_task_beats():
    decision = decide(evidence({"ctr": 0.01, "cvr": 0.01, "ad_ctr": 0.01, "churn": 0.01}, 0.003), TASKS)
    assert decision.verdict == "promote"
    assert decision.reason.startswith("promoted: no task is worse than the champion by 0.01 or more")
    assert "beats" not in decision.reason
    assert decision.rule["name"] == "every_task_noninferior_and_mean_gain"
    assert decision.rule["mean"]["delta"] == pytest.approx(0.01)
    # the mean's standard error: the holdout's sqrt(4 * 0.003^2) / 4, and two trainings' luck 2 * seed_sd^2
    assert decision.rule["mean"]["se"] == pytest.approx(math.sqrt(0.0015**2 + 2 * GateSettings().seed_sd ** 2))
    assert decision.per_task["ctr"]["lower_bound"] == pytest.approx(0.01 - 1.6449 * 0.003, abs=1e-4)


def test_evidence_rule_holds_when_a_task_lacks_evidence_and_says_how_much_more_it_needs():
    # cvr's gain is as large, but its holdout is small: it could still be 0.01 worse.
    decision = decide(
        evidence(
            {"ctr": 0.01, "cvr": 0.004, "ad_ctr": 0.01, "churn": 0.01},
            {"ctr": 0.002, "cvr": 0.012, "ad_ctr": 0.003, "churn": 0.004},
        ),
        TASKS,
    )
    assert decision.verdict == "hold" and not decision.promote
    assert decision.reason.startswith("held, champion kept: not enough evidence: cvr could still be worse by 0.01")
    factor = ((1.6449 + 0.8416) * 0.012 / 0.014) ** 2
    assert decision.per_task["cvr"]["more_data"] == pytest.approx(factor, rel=1e-3)
    assert f"about {factor:.1f} times this holdout would tell" in decision.reason
    assert "more_data" not in decision.per_task["ctr"]
    assert not any(row["passed"] for row in decision.per_task.values())


def test_evidence_rule_rejects_a_task_shown_worse_and_a_challenger_without_gain():
    worse = decide(evidence({"ctr": 0.02, "cvr": 0.02, "ad_ctr": 0.02, "churn": -0.01}, 0.003), TASKS)
    assert worse.verdict == "reject" and "churn: AUC 0.6900 vs champion 0.7000" in worse.reason
    assert "worse than the champion" in worse.reason and "ctr:" not in worse.reason
    no_gain = decide(evidence({"ctr": 0.001, "cvr": -0.004, "ad_ctr": 0.0, "churn": 0.0}, 0.005), TASKS)
    assert no_gain.verdict == "reject" and no_gain.reason.startswith("rejected: no gain, mean AUC difference")


def test_a_gain_below_min_gain_is_no_reason_to_swap():
    small = {"ctr": 0.003, "cvr": 0.003, "ad_ctr": 0.003, "churn": 0.003}
    worth = GateSettings(min_gain=0.004, seed_sd=0.0)
    decision = decide(evidence(small, 0.0005), TASKS, worth)
    assert decision.verdict == "reject" and "no gain (+0.0040 is worth a swap)" in decision.reason
    assert decide(evidence(small, 0.0005), TASKS, GateSettings(min_gain=0.0, seed_sd=0.0)).verdict == "promote"
    assert decide(evidence(dict.fromkeys(small, 0.006), 0.0005), TASKS, worth).verdict == "promote"


def test_two_trainings_luck_widens_the_mean_gains_bound_and_no_holdout_removes_it():
    gain = {"ctr": 0.006, "cvr": 0.006, "ad_ctr": 0.006, "churn": 0.006}
    no_luck = GateSettings(min_gain=0.0, seed_sd=0.0)
    lucky = GateSettings(min_gain=0.0, seed_sd=0.003)
    # A huge holdout (se 0.0002 per task) shows +0.006 plainly, but two seeds of one configuration differ by
    # about 0.003 * sqrt(2): the mean's variance adds 2 * 0.003^2, so the bound falls to 0.006 - 1.645 * 0.0042.
    assert decide(evidence(gain, 0.0002), TASKS, no_luck).verdict == "promote"
    held = decide(evidence(gain, 0.0002), TASKS, lucky)
    assert held.verdict == "hold"
    assert held.rule["mean"]["se"] == pytest.approx(math.sqrt(0.0002**2 / 4 + 2 * 0.003**2))
    assert "no holdout would tell: the gain is within what two trainings' seeds alone give" in held.reason
    assert "more_data" not in held.rule["mean"]
    assert held.rule["seed_sd"] == 0.003 and "2 x 0.003^2" in held.rule["comparison"]
    # A gain well beyond the seeds' spread is promoted, and a hold short of it says how much more data.
    assert decide(evidence(dict.fromkeys(gain, 0.012), 0.0002), TASKS, lucky).verdict == "promote"
    short = decide(evidence(dict.fromkeys(gain, 0.012), 0.012), TASKS, lucky)
    assert short.verdict == "hold"
    z = 1.6449 + 0.8416
    expected = (0.012**2 / 4) / ((0.012 / z) ** 2 - 2 * 0.003**2)
    assert short.rule["mean"]["more_data"] == pytest.approx(expected, rel=1e-3)


def test_evidence_rule_without_a_standard_error_cannot_promote():
    cmp = evidence({"ctr": 0.02, "cvr": 0.02, "ad_ctr": 0.02, "churn": 0.02}, 0.002)
    del cmp["tasks"]["cvr"]["auc_delta"]["se"]
    decision = decide(cmp, TASKS)
    assert decision.verdict == "reject" and "no standard error of the AUC difference for cvr" in decision.reason
    # an interval alone (comparisons made before the DeLong variance) gives the standard error
    cmp["tasks"]["cvr"]["auc_delta"].update(low=0.02 - 1.96 * 0.002, high=0.02 + 1.96 * 0.002)
    assert decide(cmp, TASKS).per_task["cvr"]["se"] == pytest.approx(0.002, abs=1e-5)


def test_the_record_carries_the_rules_measured_error_rates():
    decision = decide(evidence({"ctr": 0.01, "cvr": 0.01, "ad_ctr": 0.01, "churn": 0.01}, 0.003), TASKS)
    rates = decision.rule["measured_error_rates"]
    assert set(rates) >= {"aa_promotion", "one_task_worse_promotion", "all_better_promotion", "measured_by"}
    assert 0 <= rates["aa_promotion"]["rate"] <= 1
    # The stored rates name the knobs they were measured with, and the default rule is that rule.
    assert rates["settings"]["min_gain"] == GateSettings().min_gain
    assert rates["settings"]["seed_sd"] == GateSettings().seed_sd
    # They are pooled over the test shops, never a dev shop, with each shop's own rate kept.
    assert rates["shops"] and all(int(shop) > 100 for shop in rates["shops"])
    assert rates["aa_promotion"]["shop_min"] <= rates["aa_promotion"]["rate"] <= rates["aa_promotion"]["shop_max"]
    description = describe(decision, 5, 4, {"tasks": {}})
    assert "promotes a model no better (A/A) " in description and "shop by shop)" in description


def test_rates_measured_for_other_knobs_are_not_quoted_as_the_rules_own():
    cmp = evidence({"ctr": 0.01, "cvr": 0.01, "ad_ctr": 0.01, "churn": 0.01}, 0.003)
    other = GateSettings(min_gain=GateSettings().min_gain + 0.001)
    decision = decide(cmp, TASKS, other)
    assert decision.rule["measured_error_rates"] is None
    assert "error rates not measured for this rule's settings: min_gain" in decision.rule["measured_error_rates_note"]


# --- the record on the model version (real MLflow on SQLite; no training needed) -------------------------
@pytest.fixture(scope="module")
def empty_store(tmp_path_factory):
    """A migrated empty MLflow database, copied per test (migrating a new one takes seconds)."""
    from mtl_core.registry.store import configure

    path = tmp_path_factory.mktemp("mlflow_template") / "mlflow.db"
    configure(f"sqlite:///{path}")
    return path


@pytest.fixture
def client(empty_store, tmp_path):
    from mtl_core.registry.store import configure

    shutil.copy(empty_store, tmp_path / "mlflow.db")
    return configure(f"sqlite:///{tmp_path / 'mlflow.db'}")


def _version(client, tmp_path, name="mtl_recommender") -> tuple[str, str]:
    from mtl_core.registry.runs import run_for_key

    run_id = run_for_key(client, "mtl", "scheduled__2026-02-09")
    client.create_registered_model(name)
    source = tmp_path / "fake_model"
    source.mkdir()
    mv = client.create_model_version(name, source=str(source), run_id=run_id)
    return mv.version, run_id


def test_record_decision_writes_tags_description_and_comparison_artifact(client, tmp_path):
    version, run_id = _version(client, tmp_path)
    cmp = comparison({**ALL_BETTER, "churn": (0.785, 0.79)})
    decision = decide(cmp, TASKS, GateSettings(rule="point", require_significance=True))
    document = record_decision(client, "mtl_recommender", version, decision, cmp, champion_version=7)

    mv = client.get_model_version("mtl_recommender", version)
    assert mv.tags["gate.verdict"] == "reject"
    assert mv.tags["gate.reason"] == decision.reason and "churn" in mv.tags["gate.reason"]
    assert float(mv.tags["gate.churn.auc_delta"]) == pytest.approx(-0.005)
    assert float(mv.tags["gate.ctr.challenger_auc"]) == pytest.approx(0.71)
    assert float(mv.tags["gate.ctr.champion_auc"]) == pytest.approx(0.70)
    assert mv.tags["gate.churn.passed"] == "false" and mv.tags["gate.champion_version"] == "7"
    assert "**Gate: REJECT**" in mv.description and "against champion v7" in mv.description
    assert "| churn | 0.7850 | 0.7900 | -0.0050 |" in mv.description
    # The point rule's rates were measured without the significance requirement: none are quoted as this rule's.
    assert (
        "Error rates of this rule: none quoted, error rates not measured for this rule's settings: "
        "require_significance True (measured with False)." in mv.description
    )

    local = client.download_artifacts(run_id, "gate/comparison.json", str(tmp_path))
    saved = json.loads(open(local).read())
    assert saved == document
    assert saved["candidate"] == {"version": int(version), "run_id": run_id}
    assert saved["champion"] == {"version": 7}
    assert saved["verdict"] == "reject" and saved["why"] == decision.reason
    assert saved["rule"]["require_significance"] is True
    assert saved["per_task"]["churn"]["delta"] == pytest.approx(-0.005)
    assert saved["per_task"]["ctr"]["low"] == pytest.approx(0.001) and "high" in saved["per_task"]["ctr"]
    assert saved["comparison"]["tasks"]["ctr"]["champion"]["auc"] == 0.70
    assert client.get_run(run_id).data.tags["gate.verdict"] == "reject"


def test_a_pass_is_recorded_too_against_the_current_champion(client, tmp_path):
    version, _ = _version(client, tmp_path)
    first = decide(comparison({name: (0.65, None) for name in ALL_BETTER}), TASKS)
    record_decision(client, "mtl_recommender", version, first, {"tasks": {}})  # no champion alias yet
    mv = client.get_model_version("mtl_recommender", version)
    assert mv.tags["gate.verdict"] == "promote" and mv.tags["gate.champion_version"] == "none"
    assert mv.tags["gate.ctr.auc_delta"] == "none"
    assert "no champion" in mv.description


def test_an_allowed_override_of_the_gate_is_recorded_on_the_version(client, tmp_path):
    version, _ = _version(client, tmp_path)
    cmp = comparison(ALL_BETTER, se=0.002)
    decision = decide(cmp, TASKS, GateSettings())
    decision.rule["overrides"] = {"tasks.churn.floor": "0.6 -> 0.0"}  # what pipeline.gate adds for such a run
    record_decision(client, "mtl_recommender", version, decision, cmp, champion_version=7)
    mv = client.get_model_version("mtl_recommender", version)
    assert json.loads(mv.tags["gate.overrides"]) == {"tasks.churn.floor": "0.6 -> 0.0"}
    assert "overridden by the run's conf" in mv.description
    (tmp_path / "other").mkdir()
    plain_version, _ = _version(client, tmp_path / "other", name="other_model")
    record_decision(client, "other_model", plain_version, decide(cmp, TASKS, GateSettings()), cmp, champion_version=1)
    assert "gate.overrides" not in client.get_model_version("other_model", plain_version).tags


def test_a_damaged_rates_file_stops_the_gate_with_a_message_naming_it(tmp_path, monkeypatch):
    from mtl_core.judge import gate

    broken = tmp_path / "gate_error_rates.json"
    broken.write_text('{"evidence": ')
    monkeypatch.setattr(gate, "RATES_FILE", broken)
    gate.measured_error_rates.cache_clear()
    try:
        with pytest.raises(GateError, match="gate_error_rates.json is not valid JSON .* restore it from git"):
            decide(evidence({"ctr": 0.01, "cvr": 0.01, "ad_ctr": 0.01, "churn": 0.01}, 0.003), TASKS)
    finally:
        gate.measured_error_rates.cache_clear()
