"""The page's figures as PNG bytes (matplotlib, Agg: no display, nothing fetched).

auc_curves(report)      per-task validation AUC over steps; dashed: the test AUC
expert_load(report)     token share per expert and MoE layer
drift(series)           mean cosine and k-NN overlap of each refresh against the one before
projection(p)           the 2-D PCA of a sample of users, coloured by an attribute
"""

from __future__ import annotations

import io
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from userembed.ui.projection import UNKNOWN, Projection

SIZE = (6.0, 3.6)
PROJECTION_SIZE = (8.0, 6.0)
DPI = 80
# pyplot keeps global state: one figure at a time across the server's threads.
_LOCK = threading.Lock()


def _png(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _figure(size: tuple[float, float] = SIZE) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=size)


def _message(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="grey")
    ax.set_xticks([])
    ax.set_yticks([])


def warm_up() -> None:
    """Import pyplot and draw once (seconds on a cold start: the font cache), so that the first
    visitor does not wait for it; the server runs this on a thread when it starts."""
    with _LOCK:
        fig, ax = _figure()
        _message(ax, "warm-up")
        _png(fig)


def auc_curves(report: Mapping[str, Any]) -> bytes:
    with _LOCK:
        fig, ax = _figure()
        val = report.get("history", {}).get("validation", [])
        test = report.get("test", {})
        drawn = False
        for task in test:
            steps = [h["step"] for h in val if task in h.get("auc", {})]
            aucs = [h["auc"][task] for h in val if task in h.get("auc", {})]
            (line,) = ax.plot(steps, aucs, marker=".", label=task)
            if "auc" in test[task]:
                ax.axhline(test[task]["auc"], color=line.get_color(), ls="--", lw=0.8)
            drawn = True
        if drawn:
            ax.set(xlabel="step", ylabel="AUC", title="Per-task AUC (dashed: test, best model)")
            ax.legend(fontsize=8)
        else:
            _message(ax, "the report holds no per-task AUC")
        return _png(fig)


def expert_load(report: Mapping[str, Any]) -> bytes:
    with _LOCK:
        fig, ax = _figure()
        layers = report.get("expert_load", [])
        width = 0.8 / max(1, len(layers))
        for i, layer in enumerate(layers):
            share = layer.get("token_share", [])
            ax.bar(np.arange(len(share)) + i * width, share, width, label=f"MoE layer {i}")
        if layers and layers[0].get("token_share"):
            experts = len(layers[0]["token_share"])
            ax.set_xticks(np.arange(experts) + width * (len(layers) - 1) / 2, range(experts))
            ax.axhline(1.0 / len(layers[0]["token_share"]), color="grey", ls="--", lw=0.8)
            ax.set(xlabel="expert", ylabel="token share (test)", title="Expert load")
            ax.legend(fontsize=8)
        else:
            _message(ax, "the report holds no expert load")
        return _png(fig)


def drift(series: Sequence[tuple[str, str, Mapping[str, Any]]]) -> bytes:
    """One point per refreshed version (x: the version, oldest left)."""
    with _LOCK:
        fig, ax = _figure()
        if not series:
            _message(ax, "no refresh compared with a previous version yet")
            return _png(fig)
        x = np.arange(len(series))
        for key, label in (("knn_overlap", "k-NN overlap"), ("mean_cosine", "mean cosine")):
            y = [float(d[key]) if key in d else np.nan for _, _, d in series]
            ax.plot(x, y, marker="o", label=label)
        ax.set_xticks(x, [_label(v, against) for v, against, _ in series], fontsize=7)
        ax.set(
            ylim=(0, 1.05),
            ylabel="vs the version it replaced",
            title="Drift per refresh (*: new model version)",
        )
        ax.legend(fontsize=8)
        return _png(fig)


def _label(version: str, against: str) -> str:
    """`<model version>.<time>` -> the time on one line, the model version's hex below, starred
    when the refresh changed model (no cosine then: the spaces differ)."""
    model, _, when = version.rpartition(".")
    changed = "*" if against.rpartition(".")[0] != model else ""
    return f"{when[:8]}\n{when[9:15]}\n{model.rpartition('-')[2]}{changed}"


def projection(p: Projection) -> bytes:
    with _LOCK:
        fig, ax = _figure(PROJECTION_SIZE)
        import matplotlib.pyplot as plt

        values = sorted(set(p.labels.tolist()))
        cmap = plt.get_cmap("tab20" if len(values) > 10 else "tab10")
        for i, value in enumerate(values):
            mask = p.labels == value
            name = "unknown" if value == UNKNOWN else str(value)
            color = "lightgrey" if value == UNKNOWN else cmap(i % cmap.N)
            ax.scatter(p.points[mask, 0], p.points[mask, 1], s=6, color=color, label=name)
        ax.set(
            xlabel=f"PC1 ({p.explained[0]:.0%} of variance)",
            ylabel=f"PC2 ({p.explained[1]:.0%})",
            title=f"{len(p.labels)} users coloured by {p.attribute}",
        )
        if len(values) <= 20:
            ax.legend(fontsize=7, markerscale=2, loc="best", title=p.attribute)
        return _png(fig)
