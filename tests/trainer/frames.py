"""A tiny training frame in the shape of feast_ops.training_frame, with planted structure.

Each user has a latent taste (0..3) that shows in the items/categories they touch and in one
profile attribute; `click` depends on the taste, `buy` (sparsely labelled) on taste and region.
Some users have empty histories.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def tiny_frame(n_users: int = 400, seed: int = 0, max_len: int = 12) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
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
    return pd.DataFrame(rows)
