"""bench/gap_anatomy.py splits the shop's own true-logit terms; they must add up to the drawn probabilities."""

import importlib.util
from pathlib import Path

import numpy as np

from mtl_core.data.shop import SECONDS_PER_DAY, ShopSpec, generate

spec = importlib.util.spec_from_file_location("gap_anatomy", Path(__file__).parents[2] / "bench" / "gap_anatomy.py")
gap_anatomy = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gap_anatomy)


def _sigmoid(intercept, terms):
    return 1 / (1 + np.exp(-(intercept + sum(terms.values()))))


def test_true_logit_terms_add_up_to_the_shops_probabilities():
    shop = generate(ShopSpec(users=300, items=80, days=12, seed=3, drift_day=6))
    f = shop.feed
    day = ((f["ts"] - shop.t0) // np.timedelta64(SECONDS_PER_DAY, "s")).astype(np.int64)
    ctr = gap_anatomy.true_logit_terms(shop, "ctr", f["user"], f["item"], day, position=f["position"])
    cvr = gap_anatomy.true_logit_terms(shop, "cvr", f["user"], f["item"], day)
    np.testing.assert_allclose(_sigmoid(*ctr), f["p_click"], rtol=1e-9)
    np.testing.assert_allclose(_sigmoid(*cvr), f["p_purchase"], rtol=1e-9)
    a = shop.ads
    day = ((a["ts"] - shop.t0) // np.timedelta64(SECONDS_PER_DAY, "s")).astype(np.int64)
    ad = gap_anatomy.true_logit_terms(shop, "ad_ctr", a["user"], a["item"], day, ad=a["ad"])
    np.testing.assert_allclose(_sigmoid(*ad), a["p_click"], rtol=1e-9)
    assert set(ad[1]) >= {"taste x item", "ad opener", "user ad bias"}


def test_carried_recovers_each_terms_slope_and_the_models_own_noise():
    rng = np.random.default_rng(0)
    terms = {"taste": rng.normal(0, 1, 20_000), "bias": rng.normal(0, 0.5, 20_000)}
    logit = -3 + 0.7 * terms["taste"] + 0.0 * terms["bias"] + rng.normal(0, 0.4, 20_000)
    carried, noise_sd = gap_anatomy._carried(logit, terms)
    assert abs(carried["taste"] - 0.7) < 0.01 and abs(carried["bias"]) < 0.02
    assert abs(noise_sd - 0.4) < 0.01
