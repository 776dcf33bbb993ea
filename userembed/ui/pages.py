"""Server-rendered HTML of each page: plain tables, forms and <img> plots, no JavaScript.

Every value shown goes through `esc` (html.escape); links carry their parameters URL-encoded.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

from userembed.manifest import Manifest
from userembed.status import OK, Status
from userembed.ui.data import (
    EmbeddingRow,
    EmbeddingState,
    TransferTable,
    UserAnswer,
    VersionRow,
    vector_bytes,
)

NAV = (
    ("/", "Models"),
    ("/transfer", "Transfer"),
    ("/user", "User"),
    ("/projection", "Projection"),
    ("/status", "Status"),
)
STYLE = """
body{font-family:sans-serif;margin:0 2em 2em;color:#222;max-width:1100px}
nav{background:#234;padding:.6em 1em;margin:0 -2em 1em}
nav a{color:#fff;margin-right:1.5em;text-decoration:none}
nav span{color:#9ab;float:right;font-size:.85em}
table{border-collapse:collapse;margin:.5em 0 1em}
td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left;font-size:.9em}
th{background:#eef}
tr.serving td{background:#efe}
.tag{background:#ddf;border-radius:3px;padding:0 .4em;margin-right:.3em;font-size:.85em}
.bad{color:#a00}.ok{color:#070}.muted{color:#777;font-size:.85em}
img{border:1px solid #ddd;margin:.3em .6em .6em 0}
code{background:#f4f4f4;padding:0 .2em}
"""


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def link(path: str, text: str, **params: str) -> str:
    query = f"?{urlencode(params)}" if params else ""
    return f'<a href="{esc(path + query)}">{esc(text)}</a>'


def img(path: str, alt: str, **params: str) -> str:
    return f'<img src="{esc(path + "?" + urlencode(params))}" alt="{esc(alt)}">'


def when_ms(ms: int) -> str:
    if not ms:
        return "-"
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def mib(n: int) -> str:
    """A byte count as a person reads it."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def table(header: Sequence[str], rows: Sequence[Sequence[str]], classes: Sequence[str] = ()) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    head = f"<tr>{head}</tr>" if any(header) else ""  # key/value tables: no header row
    body = []
    for i, row in enumerate(rows):
        cls = f' class="{classes[i]}"' if i < len(classes) and classes[i] else ""
        body.append(f"<tr{cls}>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>")
    return f"<table>{head}{''.join(body)}</table>"


def layout(title: str, body: str, where: str) -> str:
    """`where`: the Redis (redacted) and registry the page reads, shown in the bar."""
    nav = "".join(f'<a href="{p}">{esc(t)}</a>' for p, t in NAV)
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{esc(title)} - userembed</title><style>{STYLE}</style></head><body>"
        f"<nav>{nav}<span>{esc(where)}</span></nav><h1>{esc(title)}</h1>{body}</body></html>"
    )


def missing(text: str) -> str:
    return f'<p class="bad">{esc(text)}</p>'


def overview(models: Sequence[tuple[str, int, Mapping[str, str], EmbeddingRow | None]]) -> str:
    """One row per model: versions, aliases, the embedding version readers follow."""
    rows = []
    for name, count, aliases, serving in models:
        tags = " ".join(f'<span class="tag">{esc(a)}={esc(v)}</span>' for a, v in aliases.items())
        follow = (
            f"{esc(serving.info.id)} ({serving.info.users} users)"
            if serving
            else "none (no refresh)"
        )
        rows.append([link("/model", name, name=name), str(count), tags, follow])
    return table(["model", "versions", "aliases", "readers follow"], rows)


def _auc(row: VersionRow) -> str:
    return " ".join(f"{esc(t)}={v:.4f}" for t, v in row.test_auc.items()) or "-"


def versions_table(model: str, rows: Sequence[VersionRow], serving_model_version: str) -> str:
    out = []
    classes = []
    for r in rows:
        tags = " ".join(f'<span class="tag">{esc(a)}</span>' for a in r.aliases)
        parity = f"{r.parity_max_abs_diff:.2e}" if r.parity_max_abs_diff is not None else "-"
        out.append(
            [
                link("/version", r.version, model=model, version=r.version),
                esc(r.created_at),
                tags,
                f"{r.dim} ({esc(r.normalization)})",
                esc(", ".join(r.tasks) or "-"),
                _auc(r),
                parity,
                mib(r.size_bytes),
            ]
        )
        classes.append("serving" if r.version == serving_model_version else "")
    header = ["version", "published", "aliases", "dim", "tasks", "test AUC", "parity", "size"]
    return table(header, out, classes)


def _validation(row: EmbeddingRow) -> str:
    rec = row.record
    if rec is None:
        return esc(row.info.note or "-")
    norms = (
        f"norms [{rec.min_norm:.4g}, {rec.max_norm:.4g}]"
        if rec.min_norm is not None and rec.max_norm is not None
        else "no norms"
    )
    ok = '<span class="ok">passed</span>' if row.info.status == "ready" else esc(row.info.status)
    note = f"; {esc(row.info.note)}" if row.info.note else ""
    return (
        f"{ok}: {rec.parts} parts, {rec.computed} computed, {rec.copied} copied, "
        f"{rec.nonfinite} non-finite, {norms}{note}"
    )


def embeddings_table(state: EmbeddingState, dims: Mapping[str, int]) -> str:
    rows, classes = [], []
    for r in reversed(state.rows):
        drift = r.record.drift if r.record else {}
        shown = ", ".join(f"{k}={drift[k]}" for k in ("mean_cosine", "knn_overlap") if k in drift)
        dim = dims.get(r.info.model_version)
        size = mib(vector_bytes(dim, r.info.users)) if dim else "-"
        took = f"{r.record.seconds:.1f} s" if r.record and r.record.seconds is not None else "-"
        rows.append(
            [
                ("&#9654; " if r.serving else "") + esc(r.info.id),
                esc(r.info.status),
                str(r.info.users),
                size,
                _validation(r),
                esc(shown or "-"),
                esc(took),
                esc(r.record.finished_at if r.record else "-"),
            ]
        )
        classes.append("serving" if r.serving else "")
    header = ["embedding version", "status", "users", "vectors", "validation", "drift", "took",
              "finished"]  # fmt: skip
    return table(header, rows, classes)


def manifest_summary(m: Manifest, row: VersionRow) -> str:
    spec = m.input_spec
    rows = [
        ["model / version", esc(m.ref)],
        ["published", esc(m.created_at)],
        ["aliases", esc(", ".join(row.aliases) or "-")],
        ["vector", f"{m.vector.dim} x {esc(m.vector.dtype)}, {esc(m.vector.normalization)}"],
        ["tasks", esc(", ".join(m.task_names) or "-")],
        [
            "inputs",
            esc(
                f"{len(spec.sequence_features)} sequence features of length "
                f"{spec.sequence_length}, {len(spec.profile_features)} profile features"
                + (", long-term counts" if spec.long_term else "")
            ),
        ],  # fmt: skip
        ["feature service", esc(spec.feature_service)],
        [
            "variants",
            esc(", ".join(f"{v.name} ({mib(sum(f.size for f in v.files()))})" for v in m.variants)),
        ],  # fmt: skip
        ["files", f"{len(m.all_files())}, {mib(row.size_bytes)}"],
    ]
    return table(["", ""], rows)


def parity_table(parity: Mapping[str, Any]) -> str:
    """Flattened: one row per numeric check of the export (variant / input set / figure)."""
    rows: list[list[str]] = []

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping):
            for k, v in value.items():
                walk(f"{prefix} / {k}" if prefix else str(k), v)
        elif isinstance(value, int | float | bool | str):
            shown = f"{value:.3e}" if isinstance(value, float) else str(value)
            rows.append([esc(prefix), esc(shown)])

    walk("", parity)
    return table(["check", "value"], rows) if rows else missing("no parity record")


def transfer(tables: Sequence[TransferTable]) -> str:
    parts = []
    for t in tables:
        header = ["representation", *t.tasks]
        rows = [
            [
                f"<b>{esc(rep)}</b>",
                *(f"{c[0]:.3f} &plusmn; {c[1]:.3f}" if c else "-" for c in cells),
            ]
            for rep, cells in t.rows
        ]
        rows += [
            [f"{esc(rep)} &minus; profile", *(f"{d:+.3f}" if d is not None else "-" for d in ds)]
            for rep, ds in t.deltas
        ]
        defs = "".join(f"<li><b>{esc(k)}</b>: {esc(v)}</li>" for k, v in t.definitions.items())
        parts.append(
            f"<h2>{esc(t.source)}</h2><p class=muted>probe AUC (mean &plusmn; se over seeds), "
            f"generated {esc(t.generated)} by <code>{esc(t.command)}</code> ({esc(t.path)})</p>"
            + table(header, rows)
            + (
                f"<details><summary>task definitions</summary><ul>{defs}</ul></details>"
                if defs
                else ""
            )
        )
    return "".join(parts)


def model_select(models: Sequence[str], chosen: str) -> str:
    opts = "".join(
        f'<option value="{esc(m)}"{" selected" if m == chosen else ""}>{esc(m)}</option>'
        for m in models
    )
    return f'<label>model <select name="model">{opts}</select></label> '


def user_form(models: Sequence[str], model: str, user_id: str, recompute: bool, target: str) -> str:
    checked = " checked" if recompute else ""
    return (
        '<form method="get" action="/user">'
        + model_select(models, model)
        + f'<label>user id <input name="id" value="{esc(user_id)}" size="20"></label> '
        f'<label><input type="checkbox" name="recompute" value="1"{checked}> recompute through '
        f"the server at {esc(target)}</label> <button>Look up</button></form>"
        '<p class="muted">A recompute asks the server for FORCE_RECOMPUTE, which writes the '
        "fresh vector back into the version readers follow (the server's own write-back); "
        "the page itself writes nothing.</p>"
    )


def _vector_cells(v: Any) -> str:
    if v is None:
        return "-"
    head = ", ".join(f"{x:.4f}" for x in v[:6])
    return f"norm {float((v @ v) ** 0.5):.4f}; [{head}{', ...' if len(v) > 6 else ''}]"


def user_answer(a: UserAnswer) -> str:
    s, r = a.stored, a.recomputed
    rows = [
        ["embedding version", esc(a.embedding_version or "none"), esc(r.embedding_version if r and not r.error else "-")],
        ["model version", esc(s.model_version if s else "-"), esc(r.model_version if r and not r.error else "-")],
        ["computed at", esc(when_ms(s.computed_at_ms) if s else "-"), esc(when_ms(r.computed_at_ms) if r and not r.error else "-")],
        ["features as of", esc(when_ms(s.feature_ts_ms) if s else "-"), esc(when_ms(r.feature_ts_ms) if r and not r.error else "-")],
        ["source", "stored (Redis)" if s else "-", esc(r.source if r and not r.error else "-")],
        ["vector", esc(_vector_cells(s.vector if s else None)), esc(_vector_cells(r.vector if r else None))],
    ]  # fmt: skip
    title = f"<h2>user {esc(a.user_id)} of {esc(a.model)}</h2>"
    found = (
        f'<p id="answer">stored vector: <b>{"found" if s else "none"}</b> in '
        f"{esc(a.embedding_version or 'no version')}"
    )
    if a.cosine is not None:
        found += f"; cosine(stored, recomputed) = <b>{a.cosine:.6f}</b>"
    found += "</p>"
    recomputed = "not recomputed" if r is None else "recomputed now"
    recomputed += " (failed)" if r is not None and r.error else ""
    error = missing(f"recompute: {r.error}") if r is not None and r.error else ""
    return title + found + error + table(["", "stored", recomputed], rows)


def projection_form(models: Sequence[str], model: str, attrs: Sequence[str], attr: str) -> str:
    opts = "".join(
        f'<option value="{esc(a)}"{" selected" if a == attr else ""}>{esc(a)}</option>'
        for a in attrs
    )
    return (
        '<form method="get" action="/projection">'
        + model_select(models, model)
        + f'<label>colour by <select name="attribute">{opts}</select></label> '
        "<button>Show</button></form>"
    )


def status_table(status: Status) -> str:
    rows = []
    for c in status.checks:
        state = f'<span class="{"ok" if c.state == OK else "bad"}">{esc(c.state)}</span>'
        more = "".join(f"<br><span class=muted>{esc(line)}</span>" for line in c.more)
        follow = f"<code>{esc(c.next)}</code>" if c.next and c.state != OK else ""
        rows.append([esc(c.stage), state, esc(c.summary) + more, follow])
    nxt = (
        f"<p>next: <code>{esc(status.next)}</code></p>"
        if status.next
        else "<p>every stage is ready</p>"
    )
    return table(["stage", "state", "what is there", "run next"], rows) + nxt
