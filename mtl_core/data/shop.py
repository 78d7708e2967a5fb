"""The synthetic shop: realistic behaviour and ad logs with known ground truth.

How the shop works (all of it vectorised with numpy, deterministic given the seed):

* Users have latent taste vectors, affinities to hidden item attributes, a click and an ad propensity,
  a price sensitivity, and a daily session rate that may decay over time (some users drift away; that is
  what churn means here). Some users exist before the first day, others sign up during the period.
* Items have a category, a brand, a price, a latent vector built partly from hidden attributes
  ("premium", "eco-friendly", ...) and a hidden quality. The hidden attributes show ONLY in the generated
  title, through synonyms ("premium", "luxury", "deluxe"), so a text encoder carries signal that ids and
  category do not; above all for items that arrived recently and have little history (cold start).
* Every session shows a feed of items; each impression may be clicked, a click may go to the cart and be
  purchased. Sessions also show ads (an ad promotes an item with its own copy): an ad click answers to
  the item's appeal as a feed click does, and to the copy's wording.
* The true probability behind each drawn label goes to ``truth_events``; each user's activity parameters
  go to ``truth_users``, from which ``true_churn_probability`` gives the exact probability of no activity
  in the 14 days after any cut-off. Training never reads these tables; evaluation reports oracle AUCs.
* From ``drift_day`` on, tastes change (user vectors partly redrawn), new categories appear and new items
  come at shifted prices, so a model trained before the drift goes stale.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from datetime import date, datetime

import numpy as np
import pandas as pd
from sqlalchemy import delete, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from mtl_core.data import warehouse as wh
from mtl_core.errors import MtlError

SECONDS_PER_DAY = 86_400
CHURN_HORIZON_DAYS = 14
# Long-time users keep this share of the session rate they had right after signing up.
ACTIVITY_FLOOR = 0.3
LATENT_DIM = 8
# How much the taste x item affinity weighs in each task's true logit.
TASTE_WEIGHT = {"ctr": 0.45, "cvr": 0.55, "ad_ctr": 0.5}

# category -> (nouns, brands, median price)
CATEGORIES: dict[str, tuple[list[str], list[str], float]] = {
    "shoes": (["sneakers", "running shoes", "boots", "loafers", "sandals"], ["Stridex", "Nordwind", "Pacer"], 70),
    "apparel": (["t-shirt", "hoodie", "jacket", "jeans", "dress"], ["Loomly", "Urbanic", "Threadly"], 40),
    "phones": (["smartphone", "phone case", "charger", "earbuds"], ["Voltix", "Nexa", "Ortel"], 250),
    "kitchen": (["frying pan", "knife set", "blender", "kettle", "coffee maker"], ["Cookwise", "Hearth"], 55),
    "beauty": (["face cream", "shampoo", "lipstick", "perfume", "serum"], ["Lumiere", "Velvetta"], 25),
    "sports": (["yoga mat", "dumbbells", "tennis racket", "bike helmet"], ["Apex", "Kinetik", "Summit"], 45),
    "home": (["lamp", "cushion", "rug", "curtains", "vase"], ["Dwello", "Nestique"], 35),
    "books": (["novel", "cookbook", "travel guide", "comic"], ["Inkwell", "Papyra"], 15),
    "toys": (["puzzle", "building blocks", "doll", "toy car", "board game"], ["Playfox", "Tinkerly"], 20),
    "electronics": (["headphones", "smartwatch", "speaker", "tablet", "camera"], ["Sonora", "Pixelon"], 150),
}
# Categories that exist only from the drift day on.
DRIFT_CATEGORIES: dict[str, tuple[list[str], list[str], float]] = {
    "smart home": (["smart plug", "smart bulb", "video doorbell", "robot vacuum"], ["Homiq", "Connecta"], 60),
    "pet supplies": (["dog bed", "cat tree", "pet feeder", "dog leash"], ["Pawly", "Furbo"], 30),
}

# Hidden attributes: the title names them with one of several synonyms; the ids do not show them.
ATTRIBUTES: list[tuple[str, list[str], float]] = [
    # (name, synonyms, effect on everyone's click logit)
    ("premium", ["premium", "luxury", "deluxe", "high-end"], 0.25),
    ("budget", ["budget", "cheap", "value", "economy"], 0.10),
    ("eco", ["eco-friendly", "sustainable", "organic", "recycled"], 0.15),
    ("sporty", ["sporty", "athletic", "performance", "active"], 0.10),
    ("vintage", ["vintage", "retro", "classic", "old-school"], -0.05),
    ("kids", ["kids", "children's", "junior", "toddler"], -0.15),
    ("defective", ["refurbished", "open-box", "second-hand", "used"], -0.55),
    ("bestseller", ["bestseller", "top-rated", "award-winning", "popular"], 0.50),
]
FILLER = ["blue", "black", "white", "red", "green", "large", "small", "medium", "2-pack", "new", "slim", "XL"]
REGIONS = ["north", "south", "east", "west", "central", "overseas"]
AGE_BANDS = ["18-24", "25-34", "35-44", "45-54", "55+"]
# Ad copy openers and how much each moves the ad click logit (hidden from the model but in the text).
AD_OPENERS: list[tuple[list[str], float]] = [
    (["Today only: 40% off", "Flash sale: half price", "Huge discount on"], 0.7),
    (["Free shipping on", "Free delivery for", "Ships free:"], 0.4),
    (["New arrival:", "Just in:", "Discover"], 0.0),
    (["Available now:", "In stock:", "Buy"], -0.4),
]


@dataclass(frozen=True)
class ShopSpec:
    users: int = 2000
    items: int = 500
    days: int = 35
    start: date = date(2026, 1, 5)
    seed: int = 7
    drift_day: int | None = None
    # Mean number of items in one feed session and mean ads per session.
    feed_length: float = 10.0
    ads_per_session: float = 2.0
    # How strongly tastes change at the drift day (0 = not at all, 1 = all new).
    drift_strength: float = 0.7

    def __post_init__(self) -> None:
        if self.users < 1 or self.items < 1 or self.days < 1:
            raise ValueError(f"users, items and days must be positive, got {self.users}, {self.items}, {self.days}")
        if self.drift_day is not None and not 0 <= self.drift_day < self.days:
            raise ValueError(f"drift day {self.drift_day} is outside the simulated days 0..{self.days - 1}")


class ShopExistsError(MtlError, FileExistsError):
    """The warehouse already holds events and ``replace`` was not asked for."""


@dataclass
class ShopSummary:
    spec: ShopSpec
    rows: dict[str, int] = field(default_factory=dict)
    rates: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return {
            "rows": self.rows,
            "rates": self.rates,
            "seconds": round(self.seconds, 2),
            "start": self.spec.start.isoformat(),
            "days": self.spec.days,
            "drift_day": self.spec.drift_day,
        }


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _summed(intercept: float, terms: dict[str, np.ndarray]) -> np.ndarray:
    """intercept + each term, left to right: the order fixes the floating-point result, hence the labels."""
    total = intercept
    for value in terms.values():
        total = total + value
    return total


class _Shop:
    """Generates the shop's tables as numpy columns; ``write_shop`` puts them into the warehouse."""

    def __init__(self, spec: ShopSpec):
        self.spec = spec
        self.rng = np.random.default_rng(spec.seed)
        self.t0 = np.datetime64(datetime(spec.start.year, spec.start.month, spec.start.day), "s")

    # ---- users -----------------------------------------------------------------------------------
    def make_users(self) -> None:
        s, rng = self.spec, self.rng
        n = s.users
        # 60 % were customers before the first day; the rest sign up during the period.
        existing = rng.random(n) < 0.6
        self.signup_day = np.where(existing, -rng.integers(1, 365, n), rng.integers(0, s.days, n))
        self.region = rng.integers(0, len(REGIONS), n)
        self.age_band = rng.integers(0, len(AGE_BANDS), n)
        # Most of what makes users differ comes from their region and age band (learnable from plenty of
        # data); a smaller individual part shows only in a user's own history. That keeps the best possible
        # model (the oracle) within reach of one that sees only the logs: with a user's ~2 training clicks
        # the individual part is beyond every model tried (ids, click-history vectors, per-category
        # counts), so it is kept small (bench/gap_anatomy.py shows what it still costs).
        self.taste, self.attr_affinity = self._tastes()
        # Young users lean to sporty, older ones to vintage.
        self.attr_affinity[:, 3] += 0.3 * (self.age_band <= 1)
        self.attr_affinity[:, 4] += 0.3 * (self.age_band >= 3)
        self.click_bias = rng.normal(0, 0.15, n)
        # A user's own taste for ads shows only in their ad clicks (one user in four clicks an ad at all in
        # the quality benchmark's training weeks), so no model of the logs can learn it; it is kept small
        # for the same reason as the individual taste above.
        self.ad_bias = rng.normal(0, 0.1, n)
        self.price_sensitivity = (0.6 + 0.25 * (len(AGE_BANDS) - 1 - self.age_band)) + rng.normal(0, 0.2, n)
        # Activity: lambda(d) = base_rate * (FLOOR + (1 - FLOOR) * exp(-decay * days since signup)): new users
        # are keen and settle down (or drift away); base rates differ by region and age band.
        # Fixed spreads (shuffled by the seed) keep the churn rate realistic for every seed.
        region_rate = np.exp(rng.permutation(np.linspace(-0.6, 0.6, len(REGIONS))))
        age_rate = np.exp(rng.permutation(np.linspace(-0.6, 0.6, len(AGE_BANDS))))
        self.base_rate = 0.32 * region_rate[self.region] * age_rate[self.age_band] * rng.lognormal(0, 0.15, n)
        self.decay = np.full(n, 1 / 20)
        if s.drift_day is not None:
            a = s.drift_strength
            taste_new, affinity_new = self._tastes()
            self.taste_after = math.sqrt(1 - a**2) * self.taste + a * taste_new
            self.attr_affinity_after = math.sqrt(1 - a**2) * self.attr_affinity + a * affinity_new

    def _tastes(self) -> tuple[np.ndarray, np.ndarray]:
        rng, n = self.rng, self.spec.users
        taste = (
            rng.normal(0, 0.7, (len(REGIONS), LATENT_DIM))[self.region]
            + rng.normal(0, 0.7, (len(AGE_BANDS), LATENT_DIM))[self.age_band]
            + rng.normal(0, 0.15, (n, LATENT_DIM))
        )
        affinity = (
            rng.normal(0, 0.45, (len(REGIONS), len(ATTRIBUTES)))[self.region]
            + rng.normal(0, 0.45, (len(AGE_BANDS), len(ATTRIBUTES)))[self.age_band]
            + rng.normal(0, 0.1, (n, len(ATTRIBUTES)))
        )
        return taste, affinity

    def daily_rate(self, days: np.ndarray) -> np.ndarray:
        """lambda[user, day] for the given day indices (a users x days matrix)."""
        return daily_session_rate(self.signup_day, self.base_rate, self.decay, days)

    # ---- items -----------------------------------------------------------------------------------
    def make_items(self) -> None:
        s, rng = self.spec, self.rng
        n = s.items
        cats = dict(CATEGORIES)
        n_base_cats = len(cats)
        if s.drift_day is not None:
            cats.update(DRIFT_CATEGORIES)
        self.category_names = list(cats)
        # 70 % of the catalogue exists before the first day; the rest arrives over time (cold start).
        preexisting = rng.random(n) < 0.7
        self.release_day = np.where(preexisting, -rng.integers(1, 200, n), rng.integers(0, s.days, n))
        category = rng.integers(0, n_base_cats, n)
        if s.drift_day is not None:
            # From the drift day on, 40 % of new items belong to the new categories.
            late = (self.release_day >= s.drift_day) & (rng.random(n) < 0.4)
            category[late] = rng.integers(n_base_cats, len(cats), late.sum())
        self.category = category
        attrs = rng.random((n, len(ATTRIBUTES))) < 0.22
        attrs[attrs[:, 0], 1] = False  # premium and budget exclude each other
        self.attrs = attrs.astype(np.float64)
        centroids = rng.normal(0, 0.8, (len(cats), LATENT_DIM))
        attr_directions = rng.normal(0, 0.6, (len(ATTRIBUTES), LATENT_DIM))
        # What an item is comes mostly from its category and its (title-only) attributes; a small part is
        # its own, learnable only from its history.
        self.item_vec = centroids[category] + self.attrs @ attr_directions + rng.normal(0, 0.25, (n, LATENT_DIM))
        self.attr_effect = self.attrs @ np.array([effect for _, _, effect in ATTRIBUTES])

        brands, titles, prices = [], [], np.empty(n)
        cat_specs = list(cats.values())
        noun_pick = rng.random(n)
        brand_pick = rng.random(n)
        filler_pick = rng.integers(0, len(FILLER), n)
        synonym_pick = rng.integers(0, 4, (n, len(ATTRIBUTES)))
        price_noise = rng.lognormal(0, 0.45, n)
        for i in range(n):
            nouns, cat_brands, median_price = cat_specs[category[i]]
            brand = cat_brands[int(brand_pick[i] * len(cat_brands))]
            words = [brand]
            words += [ATTRIBUTES[a][1][synonym_pick[i, a]] for a in np.flatnonzero(attrs[i])]
            words += [FILLER[filler_pick[i]], nouns[int(noun_pick[i] * len(nouns))]]
            brands.append(brand)
            titles.append(" ".join(words))
            factor = 1.8 if attrs[i, 0] else 0.6 if attrs[i, 1] else 1.0
            prices[i] = median_price * factor * price_noise[i]
        if s.drift_day is not None:
            # Price shift: items released from the drift day on cost 40 % more.
            prices[self.release_day >= s.drift_day] *= 1.4
        self.brand = np.asarray(brands, dtype=object)
        # Hidden quality: mostly the brand's reputation, a little the item's own.
        all_brands = sorted({b for spec in cats.values() for b in spec[1]})
        brand_quality = dict(zip(all_brands, rng.normal(0, 0.35, len(all_brands)), strict=True))
        self.quality = np.array([brand_quality[b] for b in brands]) + rng.normal(0, 0.15, n)
        self.title = np.asarray(titles, dtype=object)
        self.price = np.round(prices, 2)
        self.log_price_z = (np.log(self.price) - np.log(self.price).mean()) / np.log(self.price).std()
        self.popularity = rng.pareto(1.2, n) + 1.0

    # ---- sessions and events ---------------------------------------------------------------------
    def make_sessions(self) -> None:
        s, rng = self.spec, self.rng
        rate = self.daily_rate(np.arange(s.days))
        counts = rng.poisson(rate)
        user, day = np.nonzero(counts)
        reps = counts[user, day]
        self.sess_user = np.repeat(user, reps)
        self.sess_day = np.repeat(day, reps)
        # Sessions cluster in the evening: a mixture of a broad day and an evening peak (seconds of day).
        evening = rng.random(len(self.sess_user)) < 0.5
        sec = np.where(evening, rng.normal(20.5 * 3600, 1.5 * 3600, len(evening)), rng.uniform(0, 86_000, len(evening)))
        self.sess_sec = np.clip(sec, 0, SECONDS_PER_DAY - 600).astype(np.int64)
        order = np.lexsort((self.sess_sec, self.sess_day))
        self.sess_user, self.sess_day, self.sess_sec = self.sess_user[order], self.sess_day[order], self.sess_sec[order]
        self.sess_id = np.arange(1, len(order) + 1, dtype=np.int64)

    def _taste_on(self, users: np.ndarray, days: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        taste, aff = self.taste[users], self.attr_affinity[users]
        if self.spec.drift_day is not None:
            late = days >= self.spec.drift_day
            taste[late] = self.taste_after[users[late]]
            aff[late] = self.attr_affinity_after[users[late]]
        return taste, aff

    def _sample_items(self, days: np.ndarray, boost_new: float) -> np.ndarray:
        """One item per slot, drawn by popularity among the items released by that day."""
        out = np.empty(len(days), dtype=np.int64)
        for d in np.unique(days):
            slots = np.flatnonzero(days == d)
            available = np.flatnonzero(self.release_day <= d)
            weight = self.popularity[available].copy()
            # The shop promotes fresh items for a week, so cold-start items do get impressions.
            weight[(d - self.release_day[available]) < 7] *= boost_new
            out[slots] = self.rng.choice(available, size=len(slots), p=weight / weight.sum())
        return out

    def affinity_parts(self, users: np.ndarray, items: np.ndarray, days: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(user taste x item vector, user attribute affinities x item attributes), on each row's day."""
        taste, aff = self._taste_on(users, days)
        dot = np.einsum("ij,ij->i", taste, self.item_vec[items]) / math.sqrt(LATENT_DIM)
        attr = np.einsum("ij,ij->i", aff, self.attrs[items])
        return dot, attr

    def affinity(self, users: np.ndarray, items: np.ndarray, days: np.ndarray) -> np.ndarray:
        dot, attr = self.affinity_parts(users, items, days)
        return dot + attr

    def logit_terms(
        self,
        task: str,
        users: np.ndarray,
        items: np.ndarray,
        days: np.ndarray,
        position: np.ndarray | None = None,
        ad: np.ndarray | None = None,
    ) -> tuple[float, dict[str, np.ndarray]]:
        """The true logit of a feed click, a purchase after a click or an ad click, as (intercept, named terms).

        The label is drawn from sigmoid(intercept + the terms, summed in this order). ``position`` is needed
        for ctr, ``ad`` for ad_ctr. bench/gap_anatomy.py reads the terms to tell which part the model misses.
        """
        affinity = self.affinity(users, items, days)
        price_sensitivity = self.price_sensitivity[users]
        if task == "ctr":
            return -3.7, {
                "affinity": TASTE_WEIGHT["ctr"] * affinity,
                "attributes": self.attr_effect[items],
                "quality": 0.45 * self.quality[items],
                "user click bias": self.click_bias[users],
                "price": -0.35 * price_sensitivity * self.log_price_z[items],
                "position": -0.04 * position,
            }
        if task == "cvr":
            return -3.9, {
                "affinity": TASTE_WEIGHT["cvr"] * affinity,
                "quality": 0.5 * self.quality[items],
                "attributes": 0.6 * self.attr_effect[items],
                "price": -0.5 * price_sensitivity * self.log_price_z[items],
                "user click bias": 0.5 * self.click_bias[users],
            }
        if task == "ad_ctr":
            # An ad sells its item: the item's appeal (hidden attributes, price for this user) moves ad clicks
            # as it moves feed clicks; the copy's opener and the user's taste for ads come on top.
            return -4.45, {
                "affinity": TASTE_WEIGHT["ad_ctr"] * affinity,
                "ad opener": self.ad_effect[ad],
                "quality": 0.5 * self.quality[items],
                "attributes": self.attr_effect[items],
                "price": -0.35 * price_sensitivity * self.log_price_z[items],
                "user ad bias": self.ad_bias[users],
            }
        raise ValueError(f"the shop draws no label for task {task!r} from a logit (ctr, cvr and ad_ctr only)")

    def make_feed(self) -> None:
        s, rng = self.spec, self.rng
        n_sess = len(self.sess_id)
        length = 1 + rng.poisson(s.feed_length - 1, n_sess)
        imp_sess = np.repeat(np.arange(n_sess), length)
        starts = np.cumsum(length) - length
        position = np.arange(len(imp_sess)) - np.repeat(starts, length)
        user, day = self.sess_user[imp_sess], self.sess_day[imp_sess]
        item = self._sample_items(day, boost_new=4.0)
        click_logit = _summed(*self.logit_terms("ctr", user, item, day, position=position))
        p_click = _sigmoid(click_logit)
        clicked = rng.random(len(p_click)) < p_click
        # Purchase after a click shares the taste term with clicking (that is what a joint model can
        # exploit: cvr has ~20x fewer labels) and cares more about price and hidden quality.
        purchase_logit = _summed(*self.logit_terms("cvr", user, item, day))
        p_purchase = _sigmoid(purchase_logit)
        p_cart = _sigmoid(purchase_logit + 1.3)
        carted = clicked & (rng.random(len(p_click)) < p_cart)
        purchased = carted & (rng.random(len(p_click)) < p_purchase / p_cart)

        imp_ts = self.t0 + (day * SECONDS_PER_DAY + self.sess_sec[imp_sess] + 7 * position).astype("timedelta64[s]")
        self.feed = dict(
            user=user,
            item=item,
            session=self.sess_id[imp_sess],
            position=position,
            ts=imp_ts,
            p_click=p_click,
            clicked=clicked,
            p_purchase=p_purchase,
            carted=carted,
            purchased=purchased,
        )

    def make_ads(self) -> None:
        s, rng = self.spec, self.rng
        n_ads = max(1, s.items // 4)
        ad_item = rng.choice(s.items, n_ads, replace=False) if n_ads <= s.items else rng.integers(0, s.items, n_ads)
        opener_group = rng.integers(0, len(AD_OPENERS), n_ads)
        opener_word = rng.integers(0, 3, n_ads)
        self.ad_item = ad_item
        self.ad_text = np.asarray(
            [
                f"{AD_OPENERS[g][0][w]} {self.title[i]}"
                for g, w, i in zip(opener_group, opener_word, ad_item, strict=True)
            ],
            dtype=object,
        )
        self.ad_effect = np.array([AD_OPENERS[g][1] for g in opener_group])
        self.ad_release = self.release_day[ad_item]

        n_sess = len(self.sess_id)
        count = rng.poisson(s.ads_per_session, n_sess)
        imp_sess = np.repeat(np.arange(n_sess), count)
        user, day = self.sess_user[imp_sess], self.sess_day[imp_sess]
        ad = np.empty(len(imp_sess), dtype=np.int64)
        for d in np.unique(day):
            slots = np.flatnonzero(day == d)
            live = np.flatnonzero(self.ad_release <= d)
            ad[slots] = live[rng.integers(0, len(live), len(slots))]
        item = ad_item[ad]
        logit = _summed(*self.logit_terms("ad_ctr", user, item, day, ad=ad))
        p_click = _sigmoid(logit)
        clicked = rng.random(len(p_click)) < p_click
        within = rng.integers(0, 300, len(imp_sess))
        ts = self.t0 + (day * SECONDS_PER_DAY + self.sess_sec[imp_sess] + within).astype("timedelta64[s]")
        self.ads = dict(
            user=user, ad=ad, item=item, session=self.sess_id[imp_sess], ts=ts, p_click=p_click, clicked=clicked
        )


def daily_session_rate(
    signup_day: np.ndarray, base_rate: np.ndarray, decay: np.ndarray, days: np.ndarray
) -> np.ndarray:
    """Expected sessions of each user on each day: zero before signup, settling from keen to the floor."""
    days = np.asarray(days)[None, :]
    signup = np.asarray(signup_day)[:, None]
    age = np.maximum(days - signup, 0)
    keen = np.exp(-np.asarray(decay)[:, None] * age)
    rate = np.asarray(base_rate)[:, None] * (ACTIVITY_FLOOR + (1 - ACTIVITY_FLOOR) * keen)
    return np.where(days >= signup, rate, 0.0)


def true_churn_probability(truth_users: pd.DataFrame, cutoff_day: int) -> pd.Series:
    """P(no session in [cutoff, cutoff + 14 days)) per user, from the activity model's parameters.

    ``cutoff_day`` counts days from the shop's start. Indexed by user_id. Evaluation only.
    """
    horizon = np.arange(cutoff_day, cutoff_day + CHURN_HORIZON_DAYS)
    rate = daily_session_rate(
        truth_users["signup_day"].to_numpy(),
        truth_users["base_rate"].to_numpy(),
        truth_users["decay"].to_numpy(),
        horizon,
    )
    return pd.Series(np.exp(-rate.sum(axis=1)), index=truth_users["user_id"].to_numpy(), name="p_churn")


def generate(spec: ShopSpec) -> _Shop:
    shop = _Shop(spec)
    shop.make_users()
    shop.make_items()
    shop.make_sessions()
    shop.make_feed()
    shop.make_ads()
    return shop


def _behavior_columns(shop: _Shop) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Impressions, clicks, carts and purchases as one id-ordered event table plus its truth rows."""
    f = shop.feed
    n = len(f["user"])
    imp_idx = np.arange(n)
    click_idx = np.flatnonzero(f["clicked"])
    cart_idx = np.flatnonzero(f["carted"])
    buy_idx = np.flatnonzero(f["purchased"])
    rng = shop.rng
    click_delay = rng.integers(1, 6, len(click_idx))
    cart_delay = click_delay[np.searchsorted(click_idx, cart_idx)] + rng.integers(20, 120, len(cart_idx))
    buy_delay = cart_delay[np.searchsorted(cart_idx, buy_idx)] + rng.integers(30, 300, len(buy_idx))

    src = np.concatenate([imp_idx, click_idx, cart_idx, buy_idx])
    kind = np.concatenate(
        [np.full(n, 0), np.full(len(click_idx), 1), np.full(len(cart_idx), 2), np.full(len(buy_idx), 3)]
    )
    delay = np.concatenate([np.zeros(n, np.int64), click_delay, cart_delay, buy_delay]).astype("timedelta64[s]")
    ts = f["ts"][src] + delay
    # Ids increase with time; ties keep impression < click < cart < purchase.
    order = np.lexsort((kind, ts))
    src, kind, ts = src[order], kind[order], ts[order]
    event_id = np.arange(1, len(src) + 1, dtype=np.int64)
    # Parent of a click is its impression, of a cart its click, of a purchase its cart.
    id_of = np.zeros((4, n), dtype=np.int64)
    id_of[kind, src] = event_id
    parent = np.where(kind > 0, id_of[np.maximum(kind - 1, 0), src], 0)
    types = np.asarray(["impression", "click", "add_to_cart", "purchase"], dtype=object)[kind]
    events = {
        "event_id": event_id,
        "user_id": f["user"][src] + 1,
        "item_id": f["item"][src] + 1,
        "event_type": types,
        "ts": ts,
        "session_id": f["session"][src],
        "parent_event_id": np.where(parent > 0, parent, None).astype(object),
        "position": np.where(kind == 0, f["position"][src], None).astype(object),
    }
    truth_ids = np.concatenate([id_of[0][imp_idx], id_of[1][click_idx]])
    truth = {
        "event_id": truth_ids,
        "task": np.concatenate([np.full(n, "ctr", dtype=object), np.full(len(click_idx), "cvr", dtype=object)]),
        "p_true": np.concatenate([f["p_click"], f["p_purchase"][click_idx]]),
    }
    return events, truth


def _ad_columns(shop: _Shop, first_id: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    a = shop.ads
    n = len(a["user"])
    click_idx = np.flatnonzero(a["clicked"])
    src = np.concatenate([np.arange(n), click_idx])
    kind = np.concatenate([np.zeros(n, np.int64), np.ones(len(click_idx), np.int64)])
    delay = np.concatenate([np.zeros(n, np.int64), shop.rng.integers(1, 8, len(click_idx))])
    ts = a["ts"][src] + delay.astype("timedelta64[s]")
    order = np.lexsort((kind, ts))
    src, kind, ts = src[order], kind[order], ts[order]
    event_id = np.arange(first_id, first_id + len(src), dtype=np.int64)
    id_of = np.zeros((2, n), dtype=np.int64)
    id_of[kind, src] = event_id
    parent = np.where(kind == 1, id_of[0, src], 0)
    events = {
        "event_id": event_id,
        "user_id": a["user"][src] + 1,
        "ad_id": a["ad"][src] + 1,
        "item_id": a["item"][src] + 1,
        "ad_text": shop.ad_text[a["ad"][src]],
        "event_type": np.asarray(["ad_impression", "ad_click"], dtype=object)[kind],
        "ts": ts,
        "session_id": a["session"][src],
        "parent_event_id": np.where(parent > 0, parent, None).astype(object),
    }
    truth = {"event_id": id_of[0], "task": np.full(n, "ad_ctr", dtype=object), "p_true": a["p_click"]}
    return events, truth


def write_shop(engine: Engine, spec: ShopSpec, replace: bool = False) -> ShopSummary:
    """Simulate the shop and write it into the warehouse in one transaction.

    A warehouse that already holds events is refused unless ``replace`` is set (then the shop's tables are
    emptied first, in the same transaction, so a failure leaves the old contents in place).
    """
    began = time.perf_counter()
    try:
        wh.create_schema(engine)  # the first contact: a warehouse that does not answer fails before simulating
    except SQLAlchemyError as exc:
        raise wh.connection_problem(engine, exc) from exc
    shop = generate(spec)
    day_ts = lambda d: shop.t0 + (np.asarray(d) * SECONDS_PER_DAY).astype("timedelta64[s]")  # noqa: E731
    users = {
        "user_id": np.arange(1, spec.users + 1),
        "signup_ts": day_ts(shop.signup_day),
        "region": np.asarray(REGIONS, dtype=object)[shop.region],
        "age_band": np.asarray(AGE_BANDS, dtype=object)[shop.age_band],
    }
    items = {
        "item_id": np.arange(1, spec.items + 1),
        "title": shop.title,
        "category": np.asarray(shop.category_names, dtype=object)[shop.category],
        "brand": shop.brand,
        "price": shop.price,
        "created_ts": day_ts(shop.release_day),
    }
    behavior, behavior_truth = _behavior_columns(shop)
    ads, ad_truth = _ad_columns(shop, first_id=len(behavior["event_id"]) + 1)
    truth_events = {k: np.concatenate([behavior_truth[k], ad_truth[k]]) for k in behavior_truth}
    truth_users = {
        "user_id": users["user_id"],
        "signup_day": shop.signup_day,
        "base_rate": shop.base_rate,
        "decay": shop.decay,
    }
    facts = {
        "start": spec.start.isoformat(),
        "days": spec.days,
        "seed": spec.seed,
        "drift_day": spec.drift_day,
        "drift_strength": spec.drift_strength,
    }
    tables = {
        wh.users: users,
        wh.items: items,
        wh.behavior_events: behavior,
        wh.ad_events: ads,
        wh.truth_events: truth_events,
        wh.truth_users: truth_users,
        wh.truth_shop: {
            "key": np.asarray(list(facts), dtype=object),
            "value": np.asarray([json.dumps(v) for v in facts.values()], dtype=object),
        },
    }
    try:
        with engine.begin() as conn:
            already = conn.execute(select(wh.behavior_events.c.event_id).limit(1)).first()
            if already is not None and not replace:
                raise ShopExistsError(
                    f"the warehouse at {engine.url.render_as_string(hide_password=True)} already holds events; "
                    "simulate into an empty warehouse or pass --replace to overwrite it"
                )
            for table in (*wh.SOURCE_TABLES, *wh.TRUTH_TABLES):
                conn.execute(delete(wh.metadata.tables[table]))
            for table, columns in tables.items():
                wh.bulk_insert(conn, table, columns)
    except SQLAlchemyError as exc:
        raise wh.connection_problem(engine, exc) from exc
    f = shop.feed
    summary = ShopSummary(spec=spec, seconds=time.perf_counter() - began)
    summary.rows = {
        "users": spec.users,
        "items": spec.items,
        "behavior_events": len(behavior["event_id"]),
        "ad_events": len(ads["event_id"]),
        "impressions": len(f["user"]),
    }
    summary.rates = {
        "ctr": float(f["clicked"].mean()) if len(f["clicked"]) else 0.0,
        "cvr": float(f["purchased"].sum() / max(f["clicked"].sum(), 1)),
        "ad_ctr": float(shop.ads["clicked"].mean()) if len(shop.ads["clicked"]) else 0.0,
    }
    return summary
