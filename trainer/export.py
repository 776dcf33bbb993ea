"""Export a trained SUPERMOE model to ONNX, check it against PyTorch, publish it to the registry.

TorchRec modules taking a KeyedJaggedTensor do not export to ONNX, so the exported encoder is
`ExportableEncoder`: one plain `nn.Embedding` per table carrying the trained weights, followed
by the model's own `DenseArch`, unchanged. Its inputs are exactly `userembed.features.
encode_inputs` (one (B, L) int64 array per sequence feature, `profile` (B, P) int64), its
outputs `user_vector` (B, V) and, with tasks, `task_scores` (B, T) = sigmoid(task logits).
Batch and sequence length are dynamic (L up to the trained sequence_length).

Parity is part of the export: onnxruntime against PyTorch on held-out rows and on crafted rows
that route tokens to every expert of every MoE layer (a trace can silently lose an expert the
example input never reached), plus a graph check that every expert's weights are in the file.
Any user-vector difference above `max_abs_diff` fails the export before anything is published.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor, nn

from trainer.config import ModelConfig
from trainer.encoder import sequence_stats
from trainer.model import FINAL_CHECKPOINT, HELDOUT_INPUTS, DenseOutput, load_final
from trainer.moe import ExpertFFN, SparseMoeBlock
from trainer.tables import table_name
from userembed.errors import DataNotFoundError, InvalidInputError, UserEmbedError
from userembed.features import SERVING_FEATURE_SERVICE, InputSpec, encode_inputs
from userembed.manifest import (
    TASK_SCORES_OUTPUT,
    USER_VECTOR_OUTPUT,
    FileEntry,
    Manifest,
    OnnxVariant,
    VectorSpec,
)
from userembed.registry import Registry

logger = logging.getLogger(__name__)

PROFILE_INPUT = "profile"
MAX_ABS_DIFF = 1e-4  # user vector, onnxruntime vs PyTorch
FP16_MIN_COSINE = 0.999
OPSET = 17
DEFAULT_EXTERNAL_DATA_THRESHOLD_MB = 1536.0  # protobuf refuses files over 2 GB
HELDOUT_FILE = HELDOUT_INPUTS  # optional in a run dir: encoded held-out rows (train writes it)
REPORT_FILE = "report.json"
CONFIG_FILES = ("train_config.json", "config.json")
REPORT_METRIC_KEYS = ("test", "expert_load", "steps", "best_step", "stopped_early")


class ExportParityError(UserEmbedError):
    """The exported graph does not reproduce PyTorch (or loses an expert): nothing published."""


@dataclass(frozen=True)
class ExportResult:
    manifest: Manifest  # as published (version set)
    registry_root: str
    parity: dict[str, Any]

    @property
    def version(self) -> str:
        return self.manifest.version


class ExportableEncoder(nn.Module):
    """Plain-torch encoder: `nn.Embedding` tables with the trained weights + the DenseArch.

    forward(*sequence inputs in InputSpec order, profile) -> (user_vector, task_scores).
    Indices are already hashed (userembed.features.encode_inputs); 0 = padding.
    """

    def __init__(self, cfg: ModelConfig, tables: Mapping[str, Tensor], dense: nn.Module) -> None:
        super().__init__()
        spec = cfg.input_spec
        self.cfg = cfg
        self.sequence_names = tuple(f.name for f in spec.sequence_features)
        self.sequence_length = spec.sequence_length
        self.profile_names = tuple(f.name for f in spec.profile_features)
        self.tables = nn.ModuleDict()
        for f in spec.sequence_features + spec.profile_features:
            w = tables[table_name(f.name)]
            if tuple(w.shape) != (f.num_embeddings, cfg.embedding_dim):
                raise InvalidInputError(
                    f"table {table_name(f.name)} has shape {tuple(w.shape)}, "
                    f"config says ({f.num_embeddings}, {cfg.embedding_dim})"
                )
            self.tables[table_name(f.name)] = nn.Embedding.from_pretrained(
                w.detach().float(),
                freeze=True,  # shares the loaded table: no copy
            )
        self.dense_arch = dense
        self.has_tasks = len(cfg.task_names) > 0

    @property
    def input_names(self) -> tuple[str, ...]:
        return (*self.sequence_names, PROFILE_INPUT)

    @property
    def output_names(self) -> tuple[str, ...]:
        return (USER_VECTOR_OUTPUT, TASK_SCORES_OUTPUT) if self.has_tasks else (USER_VECTOR_OUTPUT,)

    def dense_forward(self, *inputs: Tensor) -> DenseOutput:
        """The lookups, then the DenseArch: its full output (router stats included)."""
        seqs, profile = inputs[:-1], inputs[-1]
        seq_emb = {
            n: self.tables[table_name(n)](x) for n, x in zip(self.sequence_names, seqs, strict=True)
        }
        mask = seqs[0] != 0  # (B, L): padding of the first (item) sequence, as in training
        if self.profile_names:
            profile_emb = torch.stack(
                [
                    self.tables[table_name(n)](profile[:, j])
                    for j, n in enumerate(self.profile_names)
                ],
                dim=1,
            )  # (B, P, D): one id per bag, so the sum-pooled bag is the row itself
        else:
            profile_emb = seq_emb[self.sequence_names[0]][:, :0, :]  # (B, 0, D)
        return self.dense_arch(
            seq_emb, mask, profile_emb, sequence_stats(list(seqs), mask, self.sequence_length)
        )

    def forward(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        out = self.dense_forward(*inputs)
        if self.has_tasks:
            return out.user_vector, torch.sigmoid(out.task_logits)
        return (out.user_vector,)


# --- inputs -------------------------------------------------------------------------------------


def random_inputs(spec: InputSpec, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Rows shaped like encode_inputs output: random lengths 0..L (0-padded), random ids."""
    length = spec.sequence_length
    lens = rng.integers(0, length + 1, size=n)
    lens[: min(n, 2)] = (0, length)[: min(n, 2)]  # an empty and a full history always included
    valid = np.arange(length)[None, :] < lens[:, None]  # (n, L)
    out = {
        f.name: np.where(valid, rng.integers(1, f.num_embeddings, size=(n, length)), 0)
        for f in spec.sequence_features
    }
    out[PROFILE_INPUT] = np.stack(
        [rng.integers(0, f.num_embeddings, size=n) for f in spec.profile_features], axis=1
    ).reshape(n, len(spec.profile_features))
    return {k: v.astype(np.int64) for k, v in out.items()}


def load_heldout(path: str | Path, spec: InputSpec, max_rows: int = 512) -> dict[str, np.ndarray]:
    """Held-out encoder inputs from a `.npz` of encoded arrays or a training-frame `.parquet`
    (rows of split == 'test' when that column exists, encoded with encode_inputs)."""
    p = Path(path)
    if not p.exists():
        raise DataNotFoundError(f"held-out inputs {p} do not exist")
    names = [f.name for f in spec.sequence_features] + [PROFILE_INPUT]
    if p.suffix == ".npz":
        with np.load(p) as z:
            missing = [n for n in names if n not in z]
            if missing:
                raise InvalidInputError(f"{p}: arrays {missing} are missing")
            return {n: np.asarray(z[n][:max_rows], dtype=np.int64) for n in names}
    import pandas as pd

    frame = pd.read_parquet(p)
    if "split" in frame.columns and (frame["split"] == "test").any():
        frame = frame[frame["split"] == "test"]
    frame = frame.head(max_rows)
    cols = [f.name for f in spec.sequence_features + spec.profile_features]
    missing = [c for c in cols if c not in frame.columns]
    if missing:
        raise InvalidInputError(f"{p}: columns {missing} are missing")
    return encode_inputs({c: frame[c].tolist() for c in cols}, spec)


def _torch_inputs(enc: ExportableEncoder, arrays: Mapping[str, np.ndarray]) -> tuple[Tensor, ...]:
    return tuple(torch.from_numpy(np.ascontiguousarray(arrays[n])) for n in enc.input_names)


def _slice(arrays: Mapping[str, np.ndarray], idx: np.ndarray) -> dict[str, np.ndarray]:
    return {k: v[idx] for k, v in arrays.items()}


def _concat(parts: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def moe_layers(enc: ExportableEncoder) -> list[SparseMoeBlock]:
    return [m for m in enc.dense_arch.modules() if isinstance(m, SparseMoeBlock)]


@torch.no_grad()
def _routing(enc: ExportableEncoder, arrays: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """Per MoE layer, per row: which experts got at least one real token -> (B, E) bool."""
    out = enc.dense_forward(*_torch_inputs(enc, arrays))
    b = next(iter(arrays.values())).shape[0]
    seq = arrays[enc.sequence_names[0]]
    valid = np.concatenate([np.ones((b, 1), bool), seq != 0], axis=1).reshape(-1)  # CLS + events
    result: list[np.ndarray] = []
    for layer, stats in zip(moe_layers(enc), out.router_stats, strict=True):
        k = layer.num_experts_per_tok
        top = torch.topk(stats.router_logits, k, dim=-1).indices.numpy()  # (B*S, k)
        hit = np.zeros((valid.size, layer.num_experts), bool)  # (B*S, E)
        np.put_along_axis(hit, top, True, axis=1)
        hit &= valid[:, None]
        result.append(np.asarray(hit.reshape(b, -1, layer.num_experts).any(axis=1)))
    return result


@torch.no_grad()
def _router_margin(
    enc: ExportableEncoder, arrays: Mapping[str, np.ndarray], layer: int, expert: int
) -> np.ndarray:
    """Per row, the best (over real tokens) margin of `expert` over the k-th router logit: > 0
    means the expert is among the token's top-k."""
    out = enc.dense_forward(*_torch_inputs(enc, arrays))
    logits = out.router_stats[layer].router_logits.numpy()  # (B*S, E)
    k = moe_layers(enc)[layer].num_experts_per_tok
    others = np.delete(logits, expert, axis=1)
    kth_other = np.sort(others, axis=1)[:, -k]  # the logit the expert must beat
    margin = logits[:, expert] - kth_other
    b = next(iter(arrays.values())).shape[0]
    seq = arrays[enc.sequence_names[0]]
    valid = np.concatenate([np.ones((b, 1), bool), seq != 0], axis=1)
    return np.where(valid, margin.reshape(b, -1), -np.inf).max(axis=1)


def expert_covering_inputs(
    enc: ExportableEncoder,
    seed: int = 0,
    pool_rounds: int = 8,
    pool_size: int = 256,
    climb_steps: int = 60,
) -> tuple[dict[str, np.ndarray], list[list[bool]]]:
    """Crafted rows that route real tokens to every expert of every MoE layer.

    Random pools first (cheap; enough unless a router has collapsed), then a greedy search per
    unreached expert that mutates ids to raise its router margin. Returns the rows (a few per
    expert) and the coverage [layer][expert] they reach.
    """
    spec = enc.cfg.input_spec
    rng = np.random.default_rng(seed)
    layers = moe_layers(enc)
    chosen: list[dict[str, np.ndarray]] = []
    covered = [np.zeros(m.num_experts, bool) for m in layers]
    for _ in range(pool_rounds):
        if all(c.all() for c in covered):
            break
        pool = random_inputs(spec, pool_size, rng)
        for li, hit in enumerate(_routing(enc, pool)):
            for e in np.flatnonzero(~covered[li] & hit.any(axis=0)):
                chosen.append(_slice(pool, np.flatnonzero(hit[:, e])[:1]))
                covered[li][e] = True
    for li, layer_cov in enumerate(covered):
        for e in np.flatnonzero(~layer_cov):
            row = _climb(enc, li, int(e), rng, climb_steps)
            if row is not None:
                chosen.append(row)
                for lj, hit in enumerate(_routing(enc, row)):
                    covered[lj] |= hit[0]
    rows = _concat(chosen) if chosen else random_inputs(spec, 1, rng)
    final = _routing(enc, rows)  # recomputed on the chosen rows alone: what parity will see
    coverage = [[bool(x) for x in np.asarray(hit.any(axis=0))] for hit in final]
    return rows, coverage


def _climb(
    enc: ExportableEncoder, layer: int, expert: int, rng: np.random.Generator, steps: int
) -> dict[str, np.ndarray] | None:
    spec = enc.cfg.input_spec
    best = random_inputs(spec, 64, rng)
    margins = _router_margin(enc, best, layer, expert)
    best = _slice(best, np.argsort(-margins)[:1])
    best_margin = margins.max()
    for _ in range(steps):
        if best_margin > 0:
            return best
        cand = {k: np.repeat(v, 64, axis=0) for k, v in best.items()}
        for f in spec.sequence_features:  # mutate a few real positions per candidate
            x = cand[f.name]
            pos = rng.integers(0, spec.sequence_length, size=(64, 2))
            new = rng.integers(1, f.num_embeddings, size=(64, 2))
            np.put_along_axis(x, pos, new, axis=1)
        first = cand[spec.sequence_features[0].name]
        for f in spec.sequence_features[1:]:  # keep padding consistent with the item sequence
            cand[f.name] = np.where(first != 0, cand[f.name], 0)
        m = _router_margin(enc, cand, layer, expert)
        if m.max() > best_margin:
            best, best_margin = _slice(cand, np.array([int(m.argmax())])), m.max()
    return best if best_margin > 0 else None


# --- ONNX ---------------------------------------------------------------------------------------


def export_onnx(enc: ExportableEncoder, path: Path, example: Mapping[str, np.ndarray]) -> None:
    """TorchScript-based exporter (dynamo=False): the dynamo exporter needs static forward
    arguments; this one exported the MoE with dynamic batch and length (shared/STACK.md)."""
    import warnings

    dynamic = {n: {0: "batch", 1: "sequence"} for n in enc.sequence_names}
    dynamic[PROFILE_INPUT] = {0: "batch"}
    for o in enc.output_names:
        dynamic[o] = {0: "batch"}
    with warnings.catch_warnings():
        # Tracer warnings about shape arithmetic in the MoE loop: dynamic axes cover them and
        # parity below proves the graph.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            enc,
            _torch_inputs(enc, example),
            str(path),
            input_names=list(enc.input_names),
            output_names=list(enc.output_names),
            dynamic_axes=dynamic,
            opset_version=OPSET,
            dynamo=False,
        )


def save_with_external_data(src: Path, dst: Path, threshold_mb: float) -> tuple[str, ...]:
    """Rewrite `src` as `dst`, moving tensors to `<dst>.data` when the weights exceed
    `threshold_mb` (protobuf files cannot pass 2 GB). Returns the external file names."""
    import onnx

    model = onnx.load(str(src))  # loads any external data the exporter wrote
    weight_bytes = sum(len(t.raw_data) for t in model.graph.initializer)
    tmp = dst.with_name(dst.name + ".tmp")
    if weight_bytes <= threshold_mb * 1e6:
        onnx.save_model(model, str(tmp))
        tmp.replace(dst)
        return ()
    location = dst.name + ".data"
    onnx.save_model(
        model,
        str(tmp),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=location,
        size_threshold=1024,  # tiny tensors (scalars, shapes) stay inline
    )
    tmp.replace(dst)
    # No tensor over 1 KB (tiny int8 models): onnx writes no data file at all.
    return (location,) if (dst.parent / location).exists() else ()


def check_experts_in_graph(enc: ExportableEncoder, path: Path) -> list[list[bool]]:
    """[layer][expert]: is each expert's first weight matrix an initializer of the graph?"""
    import onnx
    from onnx import numpy_helper

    shapes = set()
    for layer in moe_layers(enc):
        for expert in layer.experts:
            w1 = cast(ExpertFFN, expert).w1.weight
            shapes |= {tuple(w1.shape), tuple(w1.shape[::-1])}
    model = onnx.load(str(path))
    by_shape: dict[tuple[int, ...], list[np.ndarray]] = {}
    for t in model.graph.initializer:  # convert only candidates: the tables can be huge
        if tuple(t.dims) in shapes:
            by_shape.setdefault(tuple(t.dims), []).append(numpy_helper.to_array(t))
    result = []
    for layer in moe_layers(enc):
        row = []
        for expert in layer.experts:
            w = cast(ExpertFFN, expert).w1.weight.detach().numpy()
            candidates = by_shape.get(w.shape, []) + by_shape.get(w.T.shape, [])
            row.append(
                any(
                    np.array_equal(c, w) or (c.shape == w.T.shape and np.array_equal(c, w.T))
                    for c in candidates
                )
            )
        result.append(row)
    return result


def _session(path: Path) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _run_ort(
    sess: Any, arrays: Mapping[str, np.ndarray], batch: int = 256
) -> tuple[np.ndarray, ...]:
    n = next(iter(arrays.values())).shape[0]
    parts = [
        sess.run(None, {k: v[s : s + batch] for k, v in arrays.items()}) for s in range(0, n, batch)
    ]
    return tuple(np.concatenate([p[i] for p in parts]) for i in range(len(parts[0])))


@torch.no_grad()
def _run_torch(enc: ExportableEncoder, arrays: Mapping[str, np.ndarray]) -> tuple[np.ndarray, ...]:
    return tuple(t.numpy() for t in enc(*_torch_inputs(enc, arrays)))


def _diffs(got: Sequence[np.ndarray], ref: Sequence[np.ndarray]) -> dict[str, float]:
    out = {"user_vector_max_abs_diff": float(np.abs(got[0] - ref[0]).max(initial=0.0))}
    if len(ref) > 1:
        out["task_scores_max_abs_diff"] = float(np.abs(got[1] - ref[1]).max(initial=0.0))
    return out


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (a * b).sum(axis=1) / np.maximum(den, 1e-12)


@torch.no_grad()
def torchrec_reference(
    model_pt: Path, arrays: Mapping[str, np.ndarray], spec: InputSpec
) -> np.ndarray:
    """User vectors of the TorchRec SuperMoEModel itself (KJT path) on the same rows: proves
    the nn.Embedding rebuild reads the tables exactly as training did."""
    from trainer.batches import EncodedSplit, make_batch
    from trainer.model import load_unsharded

    model = load_unsharded(model_pt)
    n = arrays[PROFILE_INPUT].shape[0]
    split = EncodedSplit(
        sequences={f.name: arrays[f.name] for f in spec.sequence_features},
        profile=arrays[PROFILE_INPUT],
        labels=np.zeros((n, len(model.cfg.task_names)), np.float32),
    )
    batch = make_batch(split, np.arange(n), spec)
    out, _ = model(batch.seq_kjt, batch.profile_kjt, None)
    return out.user_vector.numpy()


# --- the export ---------------------------------------------------------------------------------


def export_model(
    run: str | Path,
    registry_root: str | None = None,
    model_name: str = "supermoe",
    variants: Sequence[str] = ("fp32",),
    *,
    heldout: Mapping[str, np.ndarray] | str | Path | None = None,
    external_data_threshold_mb: float = DEFAULT_EXTERNAL_DATA_THRESHOLD_MB,
    max_abs_diff: float = MAX_ABS_DIFF,
    seed: int = 0,
    aliases: Sequence[str] = ("latest",),
) -> ExportResult:
    """Export a run (folder with model.pt, or the model.pt itself) and publish it.

    Held-out rows: `heldout` (arrays, or a .npz/.parquet path), else `<run>/heldout_inputs.npz`,
    else random rows from the InputSpec (recorded as such in the parity figures). Raises
    ExportParityError (nothing published) when a check fails.
    """
    run_path = Path(run)
    model_pt = run_path / FINAL_CHECKPOINT if run_path.is_dir() else run_path
    run_dir = model_pt.parent
    if not model_pt.is_file():
        raise DataNotFoundError(f"no trained model at {model_pt}")
    bad = [v for v in variants if v not in ("fp32", "fp16", "int8")]
    if bad or "fp32" not in variants:
        raise InvalidInputError(f"variants must include fp32 and be fp32/fp16/int8, got {variants}")
    t0 = time.monotonic()
    cfg, tables, dense = load_final(model_pt)
    enc = ExportableEncoder(cfg, tables, dense).eval()
    spec = cfg.input_spec
    rng = np.random.default_rng(seed)

    if isinstance(heldout, str | Path):
        held, held_source = load_heldout(heldout, spec), str(heldout)
    elif heldout is not None:
        held, held_source = {k: np.asarray(v, np.int64) for k, v in heldout.items()}, "provided"
    elif (run_dir / HELDOUT_FILE).exists():
        held, held_source = load_heldout(run_dir / HELDOUT_FILE, spec), HELDOUT_FILE
    else:
        held, held_source = random_inputs(spec, 256, rng), "random (no held-out rows found)"
        logger.warning("no held-out rows for parity: using random inputs from the InputSpec")

    crafted, coverage = expert_covering_inputs(enc, seed=seed)
    staging = Path(tempfile.mkdtemp(prefix="userembed-export-"))
    try:
        raw = staging / "raw.onnx"
        export_onnx(enc, raw, held if len(held[PROFILE_INPUT]) else crafted)
        parity: dict[str, Any] = {
            "threshold_max_abs_diff": max_abs_diff,
            "heldout_source": held_source,
            "heldout_rows": int(held[PROFILE_INPUT].shape[0]),
            "crafted_rows": int(crafted[PROFILE_INPUT].shape[0]),
            "expert_coverage": coverage,
        }
        (staging / "onnx").mkdir()
        fp32_path = staging / "onnx" / "encoder_fp32.onnx"
        ext = save_with_external_data(raw, fp32_path, external_data_threshold_mb)
        raw.unlink()
        parity["experts_in_graph"] = check_experts_in_graph(enc, fp32_path)

        ref_held, ref_crafted = _run_torch(enc, held), _run_torch(enc, crafted)
        sess = _session(fp32_path)
        got_held, got_crafted = _run_ort(sess, held), _run_ort(sess, crafted)
        # Batch 1 and a shorter sequence: the dynamic axes must hold beyond the example shape.
        one = _slice(crafted, np.arange(1))
        short = {
            k: (v[:, : max(1, spec.sequence_length // 2)] if k != PROFILE_INPUT else v)
            for k, v in held.items()
        }
        fp32: dict[str, Any] = {
            "heldout": _diffs(got_held, ref_held),
            "crafted": _diffs(got_crafted, ref_crafted),
            "batch1": _diffs(_run_ort(sess, one), _run_torch(enc, one)),
            "half_length": _diffs(_run_ort(sess, short), _run_torch(enc, short)),
            "torchrec_vs_export_max_abs_diff": float(
                np.abs(torchrec_reference(model_pt, held, spec) - ref_held[0]).max(initial=0.0)
            ),
        }
        parity["fp32"] = fp32
        _check_parity(parity, max_abs_diff)

        variant_entries = [_variant("fp32", staging, fp32_path, ext, enc)]
        for name in variants:
            if name == "fp32":
                continue
            path = staging / "onnx" / f"encoder_{name}.onnx"
            v_ext = _make_variant(name, fp32_path, path, external_data_threshold_mb)
            vsess = _session(path)
            cos = _cosine(_run_ort(vsess, held)[0], got_held[0])
            cos_c = _cosine(_run_ort(vsess, crafted)[0], got_crafted[0])
            parity[name] = {
                "cosine_to_fp32_min": float(min(cos.min(), cos_c.min())),
                "cosine_to_fp32_mean": float(np.concatenate([cos, cos_c]).mean()),
            }
            if name == "fp16" and parity[name]["cosine_to_fp32_min"] < FP16_MIN_COSINE:
                raise ExportParityError(
                    f"fp16 variant: min cosine to fp32 {parity[name]['cosine_to_fp32_min']:.6f}"
                    f" < {FP16_MIN_COSINE}"
                )
            variant_entries.append(_variant(name, staging, path, v_ext, enc))

        attachments, metrics = _attachments(run_dir, staging)
        manifest = Manifest(
            model_name=model_name,
            vector=VectorSpec(dim=cfg.user_dim, dtype="float32", normalization="l2"),
            # The run read the training service; the served model reads the serving one.
            input_spec=replace(spec, feature_service=SERVING_FEATURE_SERVICE),
            variants=tuple(variant_entries),
            task_names=tuple(cfg.task_names),
            metrics=metrics,
            training_config=_training_config(run_dir, cfg),
            parity=parity,
            attachments=attachments,
        )
        published = Registry(registry_root).publish(manifest, staging, aliases=tuple(aliases))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info(
        "exported %s/%s in %.1fs: user vector max |ort - torch| held-out %.2e, crafted %.2e",
        model_name,
        published.version,
        time.monotonic() - t0,
        fp32["heldout"]["user_vector_max_abs_diff"],
        fp32["crafted"]["user_vector_max_abs_diff"],
    )
    return ExportResult(
        manifest=published, registry_root=Registry(registry_root).root, parity=parity
    )


def _check_parity(parity: Mapping[str, Any], max_abs_diff: float) -> None:
    problems = []
    for li, row in enumerate(parity["expert_coverage"]):
        for e, hit in enumerate(row):
            if not hit:
                problems.append(f"no crafted input reaches expert {e} of MoE layer {li}")
    for li, row in enumerate(parity["experts_in_graph"]):
        for e, hit in enumerate(row):
            if not hit:
                problems.append(f"expert {e} of MoE layer {li} is missing from the ONNX graph")
    fp32 = parity["fp32"]
    for case in ("heldout", "crafted", "batch1", "half_length"):
        d = fp32[case]["user_vector_max_abs_diff"]
        if not d <= max_abs_diff:  # also catches NaN
            problems.append(
                f"{case}: user vector max |onnxruntime - torch| {d:.3e} > {max_abs_diff}"
            )
    d = fp32["torchrec_vs_export_max_abs_diff"]
    if not d <= max_abs_diff:
        problems.append(f"rebuilt encoder differs from the TorchRec model by {d:.3e}")
    if problems:
        raise ExportParityError("export refused: " + "; ".join(problems))


def _make_variant(name: str, fp32_path: Path, path: Path, threshold_mb: float) -> tuple[str, ...]:
    raw = path.with_name(path.name + ".raw")
    if name == "fp16":
        import onnx
        from onnxruntime.transformers.float16 import convert_float_to_float16

        # keep_io_types: inputs stay int64, outputs float32, so callers do not change.
        model = convert_float_to_float16(onnx.load(str(fp32_path)), keep_io_types=True)
        onnx.save_model(model, str(raw))
    else:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        # The quantizer logs every tensor on the root logger; keep a CLI run readable.
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)
        try:
            quantize_dynamic(str(fp32_path), str(raw), weight_type=QuantType.QInt8)
        finally:
            root.setLevel(level)
    ext = save_with_external_data(raw, path, threshold_mb)
    raw.unlink()
    return ext


def _variant(
    name: str, staging: Path, path: Path, ext: tuple[str, ...], enc: ExportableEncoder
) -> OnnxVariant:
    rel = path.relative_to(staging).as_posix()
    parent = path.parent.relative_to(staging).as_posix()
    return OnnxVariant(
        name=name,
        file=FileEntry.of(staging, rel),
        inputs=enc.input_names,
        outputs=enc.output_names,
        external_data=tuple(FileEntry.of(staging, f"{parent}/{e}") for e in ext),
    )


def _attachments(run_dir: Path, staging: Path) -> tuple[tuple[FileEntry, ...], dict[str, Any]]:
    """The run's evaluation report and plots travel with the model; metrics come from it."""
    entries: list[FileEntry] = []
    metrics: dict[str, Any] = {}
    report = run_dir / REPORT_FILE
    if report.is_file():
        shutil.copy2(report, staging / REPORT_FILE)
        entries.append(FileEntry.of(staging, REPORT_FILE))
        try:
            data = json.loads(report.read_text())
        except json.JSONDecodeError as e:
            raise InvalidInputError(f"{report}: not valid JSON ({e})") from e
        if isinstance(data, dict):  # the figures, not the history or the config (kept apart)
            metrics = {k: data[k] for k in REPORT_METRIC_KEYS if k in data}
    plots = sorted({*run_dir.glob("*.png"), *run_dir.glob("plots/*.png")})
    for p in plots:
        rel = f"plots/{p.name}"
        (staging / "plots").mkdir(exist_ok=True)
        shutil.copy2(p, staging / rel)
        entries.append(FileEntry.of(staging, rel))
    return tuple(entries), metrics


def _training_config(run_dir: Path, cfg: ModelConfig) -> dict[str, Any]:
    for name in CONFIG_FILES:
        p = run_dir / name
        if p.is_file():
            try:
                return dict(json.loads(p.read_text()))
            except (json.JSONDecodeError, TypeError, ValueError) as e:
                raise InvalidInputError(f"{p}: not a JSON object ({e})") from e
    return {"model": cfg.to_dict()}
