"""Synthetic users with planted structure and known label probabilities.

Every user has latent traits: interests over categories (Dirichlet), an activity level, an
engagement and a buyer trait, and an exploration rate (the opposite of focus). Profile
attributes are correlated with the traits; behaviour (what, when, how deep in the funnel) is
drawn from them. Each task's TRUE probability is a known function of the traits, labels are
Bernoulli draws of it, so the spec can report the Bayes-optimal AUC. The traits are revealed by
what a model sees (profile + the last 50 events: counts, gaps, category mix, event types) and
all label noise lives in the Bernoulli draw. docs/data.md describes the planted structure.

Fully vectorised numpy; deterministic from the seed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from userembed.datasets.spec import DatasetSpec, iso

logger = logging.getLogger(__name__)

SECONDS_PER_DAY = 86_400
EVENT_TYPES: tuple[str, ...] = ("view", "click", "cart", "purchase")  # codes 0..3
PRICE_BANDS = 5  # the items table's price_bucket: 0 (cheapest fifth) .. 4
TASKS: tuple[str, ...] = ("click", "purchase", "churn", "explore")
LABEL_DEFINITIONS: dict[str, str] = {
    "click": "clicks anything in [cut, cut + horizon); rises with activity, engagement, focus",
    "purchase": "purchases in [cut, cut + horizon); labelled only where label_click == 1 "
    "(NaN elsewhere); rises with the buyer trait and engagement",
    "churn": "no visit in [cut, cut + horizon); falls with activity and engagement",
    "explore": "visits a category new to them in [cut, cut + horizon); rises with exploration",
}


@dataclass(frozen=True)
class SyntheticConfig:
    """Knobs of the generator. Defaults are what docs/data.md and the trainer's bar assume."""

    num_categories: int = 20
    items_per_category: int = 500
    zipf_exponent: float = 1.1  # item popularity within a category
    days: int = 63
    cut_days: tuple[int, ...] = (35, 42, 49, 56)  # two train, one validation, one test
    horizon_days: int = 7
    start: str = "2026-01-05T00:00:00+00:00"
    median_events_per_day: float = 0.7
    activity_sigma: float = 0.6  # log-normal spread of the event rate
    max_events: int = 100  # per user over the whole period (features see the last 50)
    interest_concentration: float = 0.05  # Dirichlet alpha per category (small = peaky)
    num_age_buckets: int = 7
    num_occupations: int = 20
    num_regions: int = 10


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Rank AUC (ties averaged) of scores against 1/0 labels; NaN labels are ignored."""
    y = np.asarray(labels, dtype=np.float64)
    keep = ~np.isnan(y)
    y = y[keep]
    s = np.asarray(scores, dtype=np.float64)[keep]
    pos = int(y.sum())
    neg = len(y) - pos
    if pos == 0 or neg == 0:
        return float("nan")
    ranks = pd.Series(s).rank(method="average").to_numpy()
    return float((ranks[y == 1].sum() - pos * (pos + 1) / 2) / (pos * neg))


@dataclass(frozen=True)
class Latents:
    """Per-user latent state (index = user id)."""

    z_act: np.ndarray  # (U,) activity, standard normal
    engagement: np.ndarray  # (U,)
    buyer: np.ndarray  # (U,)
    z_explore: np.ndarray  # (U,) exploration (focus = -z_explore)
    interests: np.ndarray  # (U, C) per-event category distribution


def task_probabilities(lat: Latents) -> dict[str, np.ndarray]:
    """The TRUE probability of each task for each user (constant over cuts): (U,) each.

    purchase is the probability given a click (its label exists only where click == 1).
    """
    return {
        "click": _sigmoid(-0.2 + 1.0 * lat.z_act + 0.7 * lat.engagement - 0.4 * lat.z_explore),
        "purchase": _sigmoid(-0.4 + 1.2 * lat.buyer + 0.3 * lat.engagement),
        "churn": _sigmoid(-1.0 - 1.4 * lat.z_act - 0.4 * lat.engagement),
        "explore": _sigmoid(-0.3 + 1.2 * lat.z_explore + 0.5 * lat.z_act),
    }


def _draw_users(
    n: int, cfg: SyntheticConfig, rng: np.random.Generator
) -> tuple[pd.DataFrame, Latents]:
    c = cfg.num_categories
    age = rng.integers(0, cfg.num_age_buckets, n)
    gender = rng.integers(0, 2, n)
    occupation = rng.integers(0, cfg.num_occupations, n)
    region = rng.integers(0, cfg.num_regions, n)

    # Profile -> traits (so held-out attributes are recoverable from behaviour by probes).
    occ_engagement = np.linspace(-0.6, 0.6, cfg.num_occupations)[
        rng.permutation(cfg.num_occupations)
    ]
    age_centered = (age - (cfg.num_age_buckets - 1) / 2) / ((cfg.num_age_buckets - 1) / 2)
    z_act = -0.45 * age_centered + rng.normal(0.0, 0.9, n)  # younger = more active
    engagement = occ_engagement[occupation] + rng.normal(0.0, 0.9, n)
    buyer = 0.4 * (gender - 0.5) + 0.3 * age_centered + rng.normal(0.0, 0.9, n)
    z_explore = -0.4 * age_centered + rng.normal(0.0, 0.9, n)

    # Interests: Dirichlet whose base leans by gender and region (probes can find them).
    base = np.full((n, c), cfg.interest_concentration)
    lean_g = rng.permutation(c)[:4]
    base[:, lean_g[:2]] += 0.4 * (gender == 0)[:, None]
    base[:, lean_g[2:]] += 0.4 * (gender == 1)[:, None]
    base[np.arange(n), region % c] += 0.3
    theta = rng.gamma(base)
    theta /= theta.sum(axis=1, keepdims=True)
    explore_rate = _sigmoid(-1.0 + 2.0 * z_explore)[:, None]  # share of uniform-random visits
    interests = (1.0 - explore_rate) * theta + explore_rate / c  # (U, C)

    users = pd.DataFrame(
        {
            "user_id": np.arange(n, dtype=np.int64),
            "age_bucket": age.astype(np.int64),
            "gender": gender.astype(np.int64),
            "occupation": occupation.astype(np.int64),
            "region": region.astype(np.int64),
        }
    )
    return users, Latents(z_act, engagement, buyer, z_explore, interests)


def _draw_events(
    lat: Latents, cfg: SyntheticConfig, rng: np.random.Generator
) -> tuple[pd.DataFrame, np.ndarray]:
    """(events, the item id of each (category, popularity rank), category-major)."""
    n, c = lat.interests.shape
    horizon = cfg.days * SECONDS_PER_DAY
    rate = cfg.median_events_per_day * np.exp(cfg.activity_sigma * lat.z_act)  # per day
    counts = np.minimum(rng.poisson(rate * cfg.days), cfg.max_events)
    user = np.repeat(np.arange(n, dtype=np.int64), counts)  # (E,)
    total = len(user)

    # Times: a Poisson process over the period (uniform given the count), sorted per user.
    # One in-place sort of user * horizon + t (users are already grouped) beats a lexsort.
    key = user * horizon + rng.integers(0, horizon, total)
    key.sort()
    t = key - user * horizon
    del key

    # Category from the user's interests: one searchsorted over row-offset CDFs.
    cdf = np.cumsum(lat.interests, axis=1)
    cdf[:, -1] = 1.0
    flat = (cdf + np.arange(n)[:, None]).ravel()  # strictly increasing across rows
    pos = np.searchsorted(flat, user + rng.random(total), side="right")
    category = np.minimum(pos - user * c, c - 1)

    # Item: Zipf rank within the category, through a fixed id permutation.
    k = np.arange(1, cfg.items_per_category + 1, dtype=np.float64)
    item_cdf = np.cumsum(k**-cfg.zipf_exponent)
    item_cdf /= item_cdf[-1]
    rank = np.minimum(np.searchsorted(item_cdf, rng.random(total)), cfg.items_per_category - 1)
    item_ids = rng.permutation(c * cfg.items_per_category).astype(np.int64)
    item = item_ids[category * cfg.items_per_category + rank]

    # Funnel depth: click depends on engagement and affinity, cart/purchase on the buyer trait.
    affinity = np.log(c * lat.interests[user, category])
    # Softmax over view/click/cart/purchase, so every event says something about both traits.
    e, b = lat.engagement[user], lat.buyer[user]
    # Unnormalised weights of view (1), click, cart, purchase, one (E,) column at a time.
    w_click = np.exp(-0.6 + 1.8 * e + 0.4 * affinity)
    w_cart = np.exp(-2.0 + 2.4 * b)
    w_purchase = np.exp(-2.4 + 2.4 * b + 0.3 * e)
    del e, b, affinity
    u = rng.random(total) * (1.0 + w_click + w_cart + w_purchase)
    event_type = (u >= 1.0).astype(np.int64)
    event_type += u >= 1.0 + w_click
    event_type += u >= 1.0 + w_click + w_cart
    del u, w_click, w_cart, w_purchase

    start = pd.Timestamp(cfg.start)
    events = pd.DataFrame(
        {
            "user_id": user,
            "item_id": item,
            "category_id": category.astype(np.int64),
            "event_type": event_type,
            "event_timestamp": pd.DatetimeIndex(
                (start.value + t * 1_000_000_000).view("datetime64[ns]")
            ).tz_localize("UTC"),
        }
    )
    return events, item_ids


def _items(item_ids: np.ndarray, cfg: SyntheticConfig, seed: int) -> pd.DataFrame:
    """The catalogue: every item's category and a price band 0..PRICE_BANDS-1. Prices come
    from their own generator (the events' draws stay as without items): a level per category
    plus item noise, cut at quintiles, so the band says something about the category."""
    rng = np.random.default_rng([seed, 1])
    category = np.arange(len(item_ids)) // cfg.items_per_category
    log_price = rng.normal(0.0, 1.0, cfg.num_categories)[category]
    log_price += rng.normal(0.0, 0.5, len(item_ids))
    edges = np.quantile(log_price, np.linspace(0, 1, PRICE_BANDS + 1)[1:-1])
    items = pd.DataFrame(
        {
            "item_id": item_ids,
            "categories": [np.array([c], dtype=np.int64) for c in category],
            "price_bucket": np.searchsorted(edges, log_price).astype(np.int64),
        }
    )
    return items.sort_values("item_id", ignore_index=True)


def _draw_labels(
    lat: Latents, cfg: SyntheticConfig, rng: np.random.Generator
) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    n = len(lat.z_act)
    probs = task_probabilities(lat)
    start = pd.Timestamp(cfg.start)
    frames = []
    test_draws: dict[str, np.ndarray] = {}
    for day in cfg.cut_days:
        cols: dict[str, Any] = {
            "user_id": np.arange(n, dtype=np.int64),
            "label_timestamp": pd.Series(start + pd.Timedelta(days=day), index=range(n)),
        }
        for task in TASKS:
            cols["label_" + task] = (rng.random(n) < probs[task]).astype(np.float64)
        # Sparse task: purchase is only known for users who clicked in the window.
        cols["label_purchase"] = np.where(
            cols["label_click"] == 1.0, cols["label_purchase"], np.nan
        )
        frame = pd.DataFrame(cols)
        frames.append(frame)
        if day == cfg.cut_days[-1]:
            test_draws = {t: frame["label_" + t].to_numpy() for t in TASKS}
    labels = pd.concat(frames, ignore_index=True)
    labels["label_timestamp"] = pd.to_datetime(labels["label_timestamp"], utc=True)
    bayes = {t: auc(probs[t], test_draws[t]) for t in TASKS}
    return labels, {"bayes": np.array([bayes[t] for t in TASKS]), **probs}


def generate_synthetic(
    num_users: int,
    seed: int = 0,
    config: SyntheticConfig | None = None,
    model_profile_features: tuple[str, ...] = ("age_bucket", "region"),
    heldout_profile_features: tuple[str, ...] = ("gender", "occupation"),
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, DatasetSpec]:
    """Draw (events, users, labels, spec) in the schema of userembed/schema.py.

    Deterministic from `seed`. Every user gets a label row at every cut, including users with
    no event before it (their feature row has empty sequences).
    """
    return generate_synthetic_with_items(
        num_users, seed, config, model_profile_features, heldout_profile_features
    )[:4]


def generate_synthetic_with_items(
    num_users: int,
    seed: int = 0,
    config: SyntheticConfig | None = None,
    model_profile_features: tuple[str, ...] = ("age_bucket", "region"),
    heldout_profile_features: tuple[str, ...] = ("gender", "occupation"),
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, DatasetSpec, pd.DataFrame]:
    """`generate_synthetic` plus the items table (userembed.items): every item of the
    catalogue with its category (`categories`, one each) and a price band (`price_bucket`)."""
    cfg = config or SyntheticConfig()
    rng = np.random.default_rng(seed)
    users, lat = _draw_users(num_users, cfg, rng)
    events, item_ids = _draw_events(lat, cfg, rng)
    labels, extra = _draw_labels(lat, cfg, rng)
    start = pd.Timestamp(cfg.start)
    cuts = [iso(start + pd.Timedelta(days=d)) for d in cfg.cut_days]
    spec = DatasetSpec(
        name="synthetic",
        tasks=TASKS,
        model_profile_features=model_profile_features,
        heldout_profile_features=heldout_profile_features,
        train_cuts=tuple(cuts[:-2]),
        validation_cuts=(cuts[-2],),
        test_cuts=(cuts[-1],),
        data_start=iso(start),
        data_end=iso(start + pd.Timedelta(days=cfg.days)),
        label_horizon_seconds=cfg.horizon_days * SECONDS_PER_DAY,
        bayes_auc={t: round(float(a), 4) for t, a in zip(TASKS, extra["bayes"], strict=True)},
        label_definitions=LABEL_DEFINITIONS,
        notes=f"seed={seed} users={num_users} events={len(events)}",
    )
    logger.info(
        "synthetic: %d users, %d events, %d label rows; Bayes AUC %s",
        num_users,
        len(events),
        len(labels),
        dict(spec.bayes_auc),
    )
    return events, users, labels, spec, _items(item_ids, cfg, seed)


def true_probabilities(
    num_users: int, seed: int = 0, config: SyntheticConfig | None = None
) -> dict[str, np.ndarray]:
    """The per-user true task probabilities behind `generate_synthetic(num_users, seed)`."""
    cfg = config or SyntheticConfig()
    rng = np.random.default_rng(seed)
    _, lat = _draw_users(num_users, cfg, rng)
    return task_probabilities(lat)


def true_latents(num_users: int, seed: int = 0, config: SyntheticConfig | None = None) -> Latents:
    """The per-user latent traits behind `generate_synthetic(num_users, seed)` (the planted
    targets of bench/transfer.py's probes)."""
    cfg = config or SyntheticConfig()
    _, lat = _draw_users(num_users, cfg, np.random.default_rng(seed))
    return lat
