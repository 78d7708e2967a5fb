"""The reviewer's page in headless Chromium, and the model card on a version of a real (SQLite) MLflow store.

The inputs are a real comparison: two tiny models trained on a 600-user shop in about a second each, and a
single-task cvr baseline, scored on the same holdout (with the shop's oracle) and judged by the gate, and the
validate step's drift report of the same snapshot.
"""

from __future__ import annotations

import html.parser
import re
import shutil
from datetime import date
from pathlib import Path

import pytest
from conftest import tiny_training_env
from pydantic import SecretStr
from support import PSEUDONYMS

from mtl_core import registry as reg
from mtl_core.config import load_settings
from mtl_core.data import warehouse as wh
from mtl_core.data.extract import extract_snapshot, read_manifest
from mtl_core.data.shop import ShopSpec, write_shop
from mtl_core.judge.evaluate import score_against_champion
from mtl_core.judge.gate import decide
from mtl_core.judge.oracle import Truth
from mtl_core.learn.checkpoint import load_model
from mtl_core.learn.examples import build_examples, split_summary
from mtl_core.learn.training import train_model
from mtl_core.pipeline import add_single_task_lifts
from mtl_core.quality.drift import snapshot_drift
from mtl_core.registry.review import (
    CARD_ARTIFACT,
    CARD_MARKER,
    MAX_DESCRIPTION,
    PAGE_ARTIFACT,
    ReviewError,
    fit_card,
    logged_commit,
    model_card,
    publish_review,
    render_review_page,
)

NAME = reg.MODEL_NAME
WAREHOUSE_PASSWORD = "wh-pw-4d1f9c"
PSEUDONYM_KEY = "pseudonym-key-77ab31"
SERVE_TOKEN = "serve-token-0c9e55"
SECRETS = (WAREHOUSE_PASSWORD, PSEUDONYM_KEY, SERVE_TOKEN)
SCREENSHOT = Path("/tmp/review_page.png")


@pytest.fixture(scope="module")
def review(tmp_path_factory, tiny_bert_path):
    """Everything the gate step has: decision, comparison, holdout scores, history, snapshot and example counts."""
    root = tmp_path_factory.mktemp("review_shop")
    engine = wh.make_engine(f"sqlite:///{root / 'warehouse.db'}")
    write_shop(engine, ShopSpec(users=600, items=150, days=35, start=date(2026, 1, 5), seed=5))
    extract_snapshot(engine, "2026-01-05", "2026-02-09", root / "snap", pseudonyms=PSEUDONYMS)
    settings = load_settings(environ=tiny_training_env(root / "data", tiny_bert_path))
    examples = build_examples(root / "snap", settings.features, list(settings.tasks))
    train_model(examples, root / "champion", settings, progress=False)
    seed_1 = settings.model_copy(update={"train": settings.train.model_copy(update={"seed": 1})})
    challenger = train_model(examples, root / "challenger", seed_1, progress=False)
    train_model(examples, root / "single_cvr", settings, single_task="cvr", progress=False)
    truth = Truth(engine, PSEUDONYMS)  # the shop's oracle AUCs, as the DAG's evaluate step has them
    scored = score_against_champion(
        load_model(root / "challenger"), load_model(root / "champion"), examples, truth=truth
    )
    add_single_task_lifts(scored, {"cvr": str(root / "single_cvr")}, examples)
    decision = decide(scored.comparison, list(settings.tasks), settings.gate)
    manifest = read_manifest(root / "snap")
    # The validate step's report; its 4-day newest part differs in weekday from the rest, so something drifted.
    drift = snapshot_drift(root / "snap", settings.drift, newest_days=settings.features.holdout_days)
    assert drift["drifted"]
    # What the page must never show: the warehouse password, the pseudonym key, the serving token.
    secret_settings = settings.model_copy(
        update={
            "warehouse_url": f"postgresql+psycopg://etl:{WAREHOUSE_PASSWORD}@db/shop",
            "privacy": settings.privacy.model_copy(update={"pseudonym_key": SecretStr(PSEUDONYM_KEY)}),
            "serve": settings.serve.model_copy(update={"token": SecretStr(SERVE_TOKEN)}),
        }
    )
    inputs = dict(
        model_name=NAME,
        version=3,
        decision=decision,
        comparison_tasks=scored.comparison["tasks"],
        drift=drift,
        interval=manifest["interval"],
        manifest_counts={table: meta["rows"] for table, meta in manifest["tables"].items()},
        example_counts=split_summary(examples),
        settings=secret_settings,
        champion_version=2,
        run_id="0123456789abcdef0123456789abcdef",
        snapshot_hash=manifest["content_hash"],
        git_commit="f" * 40,
    )
    page = render_review_page(
        **inputs, labels=scored.labels, probabilities=scored.probabilities, history=challenger.history
    )
    card = model_card(**inputs)
    out = root / "run"
    return {
        "root": root,
        "decision": decision,
        "scored": scored,
        "inputs": inputs,
        "html": page,
        "card": card,
        "out": out,
    }


class _Attributes(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[str] = []
        self.links: list[tuple[str, str, str]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.links += [(tag, name, value or "") for name, value in attrs if name in ("src", "href", "action")]


def test_page_refers_to_nothing_outside_itself_and_holds_no_secret(review):
    parser = _Attributes()
    parser.feed(review["html"])
    assert parser.links and all(value.startswith("data:image/png;base64,") for _, _, value in parser.links)
    assert not {"script", "link", "iframe", "object", "embed"} & set(parser.tags)
    style = re.search(r"<style>(.*?)</style>", review["html"], re.S).group(1)
    assert "url(" not in style and "@import" not in style and "@font-face" not in style
    for text in (review["html"], review["card"]):
        assert not [s for s in SECRETS if s in text]


def test_model_card_says_use_tasks_data_metrics_verdict_encoder_limits_and_lineage(review):
    card, decision = review["card"], review["decision"]
    headings = re.findall(r"^## (.+)$", card, re.M)
    assert headings == [
        f"Model card: {NAME} v3",
        "Intended use",
        "Tasks",
        "Data",
        "Metrics on the holdout",
        "Verdict",
        "Encoder and architecture",
        "Known limitations",
        "Lineage",
    ]
    for name, row in decision.per_task.items():
        assert f"| {name} | {row['challenger_auc']:.4f} | {row['champion_auc']:.4f} | {row['delta']:+.4f} [" in card
    assert f"**{decision.verdict.upper()}** against champion v2" in card
    assert "0123456789abcdef0123456789abcdef" in card and review["inputs"]["snapshot_hash"] in card
    assert "f" * 40 in card and "frozen" in card
    assert all(name in card for name in review["inputs"]["drift"]["drifted"])  # a known limitation of this version


def test_a_first_model_without_champion_drift_lift_or_history_still_reads(review):
    """The first run: no champion (floors), no drift report, no baselines, a model fetched without history."""
    alone = {
        task: {"challenger": entry["challenger"], "champion": None, "auc_delta": None}
        for task, entry in review["scored"].comparison["tasks"].items()
    }
    settings = review["inputs"]["settings"]
    decision = decide({"tasks": alone, "split": "holdout"}, list(settings.tasks), settings.gate)
    inputs = review["inputs"] | {
        "decision": decision,
        "comparison_tasks": alone,
        "drift": None,
        "champion_version": None,
    }
    page = render_review_page(**inputs, labels={}, probabilities={}, history=[])
    for said in (
        "against the absolute floors (no champion)",
        "No drift report was made for this run",
        "No single-task baselines were trained",
        "No holdout predictions",
        "No training history",
        "reaches its floor" if any(row["passed"] for row in decision.per_task.values()) else "below its floor",
    ):
        assert said in page
    assert "<img" not in page
    card = model_card(**inputs)
    assert f"**{decision.verdict.upper()}** against the floors (no champion)" in card
    assert "No drift report" in card


def test_bad_inputs_are_named(review):
    scored = review["scored"]
    short = {task: p[:-1] for task, p in scored.probabilities.items()}
    with pytest.raises(ReviewError, match=r"task ctr has \d+ labels but \d+ probabilities"):
        render_review_page(**review["inputs"], labels=scored.labels, probabilities=short, history=[])
    with pytest.raises(ReviewError, match="lacks verdict"):
        render_review_page(
            **(review["inputs"] | {"decision": {"reason": "x", "per_task": {}, "rule": {}}}),
            labels={},
            probabilities={},
            history=[],
        )


# --------------------------------------------------------------------------------------------------
# In the browser.
@pytest.fixture(scope="module")
def browser():
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        # Not a skip: the browser test is the page's only proof that it renders; .ci/run installs Chromium.
        pytest.fail("no Chromium binary on PATH: install Debian's chromium (apt-get install chromium; .ci/run does)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        # The system browser: Playwright downloads none. It runs without Chromium's sandbox (as root in CI).
        launched = playwright.chromium.launch(executable_path=binary)
        yield launched
        launched.close()


def _open(browser, path: Path):
    """The page in a fresh tab, with every request it made (anything but file: and data: is also refused)."""
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    requests: list[str] = []
    page.on("request", lambda request: requests.append(request.url))
    page.route("**/*", lambda route: route.continue_() if route.request.url.startswith("file:") else route.abort())
    page.goto(path.as_uri(), wait_until="load")
    return page, requests


def _images(page) -> list[dict]:
    return page.eval_on_selector_all(
        "img", "els => els.map(e => ({alt: e.alt, complete: e.complete, width: e.naturalWidth}))"
    )


def test_the_browser_shows_the_table_the_verdict_and_every_plot_and_fetches_nothing(review, browser, tmp_path):
    path = tmp_path / "review_v3.html"
    path.write_text(review["html"])
    decision, tasks = review["decision"], review["scored"].comparison["tasks"]
    page, requests = _open(browser, path)
    try:
        rows = page.locator("table.comparison tbody tr:not(.mean)")
        assert rows.count() == len(decision.per_task) == 4
        for i, (name, row) in enumerate(decision.per_task.items()):
            cells = rows.nth(i).locator("td").all_inner_texts()
            assert cells[:5] == [
                name,
                str(row["n"]),
                f"{row['challenger_auc']:.4f}",
                f"{row['champion_auc']:.4f}",
                f"{row['delta']:+.4f}",
            ]
            assert cells[5] == f"[{row['low']:+.4f}, {row['high']:+.4f}]"
            assert cells[8] == ("yes" if row["passed"] else "NO")

        verdict = page.locator("#verdict")
        assert verdict.is_visible()
        assert verdict.locator(".word").inner_text() == decision.verdict.upper()
        assert decision.reason.split(";")[0][:60] in verdict.inner_text()
        colour = verdict.evaluate("e => getComputedStyle(e).backgroundColor")
        assert colour == {"promote": "rgb(230, 244, 234)", "hold": "rgb(254, 247, 224)"}.get(
            decision.verdict, "rgb(252, 232, 230)"
        )

        lift = page.locator("#lift + p + table tbody tr")
        assert lift.count() == 1 and lift.first.locator("td").first.inner_text() == "cvr"
        assert tasks["cvr"]["single_task"]["lift"]["delta"] is not None
        drift = review["inputs"]["drift"]
        features = page.locator("table.features tbody tr")
        assert features.count() == len(drift["features"])
        shown = {
            row[0]: row[-1]
            for row in (features.nth(i).locator("td").all_inner_texts() for i in range(len(drift["features"])))
        }
        assert {name for name, state in shown.items() if state == "drifted"} == set(drift["drifted"])

        images = _images(page)
        assert len(images) == 2 * len(tasks) + 1  # ROC and calibration per task, and the training curves
        assert all(image["complete"] and image["width"] > 0 for image in images), images
        assert requests == [path.as_uri()]
        page.screenshot(path=str(SCREENSHOT), full_page=True)
    finally:
        page.close()


def test_the_request_check_sees_a_page_that_reaches_out(review, browser, tmp_path):
    """The assertion above can fail: one outside image is recorded and does not render."""
    path = tmp_path / "leaky.html"
    path.write_text(review["html"].replace("</main>", '<img src="http://127.0.0.1:9/logo.png" alt="outside"></main>'))
    page, requests = _open(browser, path)
    try:
        assert requests == [path.as_uri(), "http://127.0.0.1:9/logo.png"]
        assert [image["width"] for image in _images(page) if image["alt"] == "outside"] == [0]
    finally:
        page.close()


# --------------------------------------------------------------------------------------------------
# Publishing on the registry.
def test_publish_writes_the_page_logs_it_and_adds_the_card_once(review, tmp_path):
    client = reg.configure(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = reg.run_for_key(client, "mtl", "review")
    client.create_registered_model(NAME)
    version = client.create_model_version(
        NAME, f"{client.get_run(run_id).info.artifact_uri}/model", run_id=run_id
    ).version
    decision = review["decision"]
    reg.record_decision(client, NAME, version, decision, review["scored"].comparison, None, champion_known=True)
    summary = client.get_model_version(NAME, version).description
    assert logged_commit(client, run_id) == "unknown"
    client.set_tag(run_id, "mtl.git_commit", "0" * 40)  # what register's log_training tags
    assert logged_commit(client, run_id) == "0" * 40

    out = review["out"]
    path = publish_review(client, NAME, version, run_id, review["html"], review["card"], out)
    assert path == out / f"review_v{version}.html" and path.read_text() == review["html"]
    assert [p.name for p in out.iterdir()] == [path.name]  # no staging file left behind
    described = client.get_model_version(NAME, version).description
    assert described.startswith(summary) and described.count(CARD_MARKER) == 1
    assert f"## Model card: {NAME} v3" in described and "## Lineage" in described
    assert len(described) <= MAX_DESCRIPTION

    # A retried gate step writes the summary again, then publishes again: still one card.
    reg.record_decision(client, NAME, version, decision, review["scored"].comparison, None, champion_known=True)
    publish_review(client, NAME, version, run_id, review["html"], review["card"], out)
    publish_review(client, NAME, version, run_id, review["html"], review["card"], out)
    again = client.get_model_version(NAME, version).description
    assert again == described

    logged = {a.path for a in client.list_artifacts(run_id, "review")}
    assert logged == {PAGE_ARTIFACT, CARD_ARTIFACT}
    fetched = Path(client.download_artifacts(run_id, PAGE_ARTIFACT, str(tmp_path / "fetched")))
    assert fetched.read_text() == review["html"]


def test_the_card_is_cut_to_the_registry_limit_and_says_where_the_rest_is(review):
    card = review["card"]
    summary = "**Gate: HOLD** " + "x" * 3000
    fitted = fit_card(summary, card)
    assert len(fitted) <= MAX_DESCRIPTION and fitted.startswith(summary)
    assert "## Lineage" in fitted and "## Known limitations" in fitted
    assert "## Metrics on the holdout" not in fitted and CARD_ARTIFACT in fitted
    note = fitted.split("_Left out here for the registry's 5,000-character limit: ")[1]
    assert "Metrics on the holdout" in note and "Lineage" not in note
    assert fit_card("short summary", card) == "short summary" + CARD_MARKER + card.strip().removeprefix("## Model card")
    full = "y" * (MAX_DESCRIPTION - 10)
    assert fit_card(full, card) == full  # the summary is never cut, and nothing is added past the limit
