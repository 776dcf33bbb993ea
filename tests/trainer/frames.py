"""A tiny training frame in the shape of feast_ops.training_frame, with planted structure.

Each user has a latent taste (0..3) that shows in the items/categories they touch and in one
profile attribute; `click` depends on the taste, `buy` (sparsely labelled) on taste and region.
Some users have empty histories. The long-term features (userembed.features) count the
sequence plus an older history the sequence no longer holds, drawn from the same taste; the
future targets of the self-supervised objective favour the user's main category.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from userembed.features import LongTermSpec


def tiny_frame(n_users: int = 400, seed: int = 0, max_len: int = 12) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    lt_rng = np.random.default_rng(seed + 1_000)  # its own stream: the other columns stay
    rows = []
    for u in range(n_users):
        taste = int(rng.integers(4))
        region = int(rng.integers(3))
        n = 0 if u % 25 == 0 else int(rng.integers(1, max_len + 1))
        cats = np.where(rng.random(n) < 0.8, taste, rng.integers(4, size=n))
        items = cats * 10 + rng.integers(10, size=n)
        logit_click = 2.5 * (taste >= 2) - 1.25
        logit_buy = 2.0 * (taste % 2) + 1.0 * (region == 1) - 1.5
        click = float(rng.random() < 1 / (1 + np.exp(-logit_click)))
        buy = float(rng.random() < 1 / (1 + np.exp(-logit_buy)))
        rows.append(
            {
                "user_id": u,
                "label_timestamp": pd.Timestamp("2026-01-01", tz="UTC"),
                "split": "train" if u % 5 < 3 else ("validation" if u % 5 == 3 else "test"),
                "label_click": click,
                "label_buy": buy if rng.random() < 0.4 else np.nan,
                "item_seq": items.tolist(),
                "category_seq": cats.tolist(),
                "event_type_seq": rng.integers(3, size=n).tolist(),
                "gap_bucket_seq": rng.integers(16, size=n).tolist(),
                "seq_len": n,
                "age_bucket": int(rng.integers(6)),
                "gender": taste % 2 if rng.random() < 0.3 else int(rng.integers(2)),
                "occupation": int(rng.integers(20)),
                "region": region,
            }
        )
        rows[-1].update(long_term_columns(lt_rng, taste, items, cats, rows[-1]["event_type_seq"]))
    return with_future_targets(pd.DataFrame(rows), seed)


def with_future_targets(frame: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """The future targets of the self-supervised objective (userembed.future_targets columns),
    planted like the history: 0..5 next events per user with a history, 80% in its most
    frequent category. Their own random stream: the other columns stay as they are."""
    from userembed.future_targets import FUTURE_CATEGORIES, FUTURE_ITEMS, FUTURE_OFFSETS

    rng = np.random.default_rng(seed + 2_000)
    items, cats, offsets = [], [], []
    for seq in frame["category_seq"]:
        n = int(rng.integers(0, 6)) if len(seq) else 0
        main = int(np.bincount(seq).argmax()) if len(seq) else 0
        c = np.where(rng.random(n) < 0.8, main, rng.integers(4, size=n))
        items.append((c * 10 + rng.integers(10, size=n)).tolist())
        cats.append(c.tolist())
        offsets.append(np.sort(rng.integers(1, 7 * 86_400, size=n)).tolist())
    return frame.assign(**{FUTURE_ITEMS: items, FUTURE_CATEGORIES: cats, FUTURE_OFFSETS: offsets})


def long_term_columns(
    rng: np.random.Generator, taste: int, items: np.ndarray, cats: np.ndarray, types: list[int]
) -> dict[str, object]:
    """The long-term features of the sequence plus 0..29 older events the sequence lost."""
    lt = LongTermSpec()
    n_old = int(rng.integers(0, 30)) if len(items) else 0
    old_cats = np.where(rng.random(n_old) < 0.8, taste, rng.integers(4, size=n_old))
    all_cats = np.concatenate([old_cats, cats]).astype(np.int64)
    all_items = np.concatenate([old_cats * 10 + rng.integers(10, size=n_old), items])
    all_types = np.concatenate([rng.integers(3, size=n_old), types]).astype(np.int64)
    n = len(all_cats)
    tenure = int(rng.integers(1, 90 * 86_400)) if n else -1
    return {
        "lt_category_counts": np.bincount(
            all_cats % lt.category_buckets, minlength=lt.category_buckets
        ).tolist(),
        "lt_event_type_counts": np.bincount(
            all_types % lt.event_type_buckets, minlength=lt.event_type_buckets
        ).tolist(),
        "lt_window_counts": [min(n, len(items) * k) for k in range(1, len(lt.window_days) + 1)],
        "lt_distinct_items": len(set(all_items.tolist())),
        "lt_distinct_categories": len(set(all_cats.tolist())),
        "lt_seconds_since_first": tenure,
        "lt_seconds_since_last": int(tenure * rng.random()) if n else -1,
    }
