"""Parity of an export: onnxruntime against PyTorch, and PyTorch against the TorchRec model.

fp32 is checked on held-out rows, on crafted rows that reach every expert (coverage.py), at
batch 1 and at half the sequence length (the dynamic axes must hold beyond the example
shape), plus a graph check that every expert's weights are in the file; any user-vector
difference above `max_abs_diff` refuses the export. A row whose top-k routing is within
ROUTER_TIE of a tie is left out of the maximum (and counted): there, onnxruntime and PyTorch
may rightly pick different experts from logits that differ by rounding. fp16 must keep a cosine of
FP16_MIN_COSINE to fp32; int8's cosine is recorded.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from trainer.batches import EncodedSplit, make_batch
from trainer.export.coverage import routing_tie_margin
from trainer.export.inputs import Rows, slice_rows
from trainer.export.rebuild import ExportableEncoder, moe_layers, torch_inputs
from trainer.model import load_unsharded
from trainer.moe import ExpertFFN
from userembed.errors import UserEmbedError
from userembed.features import LONG_TERM_INPUT, PROFILE_INPUT, InputSpec
from userembed.onnx_encoder import new_session

MAX_ABS_DIFF = 1e-4  # user vector, onnxruntime vs PyTorch
FP16_MIN_COSINE = 0.999
FP32_CASES = ("heldout", "crafted", "batch1", "half_length")
# A k-th vs (k+1)-th router logit gap under which rounding may pick the other expert (rounding
# differences here are ~1e-7; one such row of 512 was seen to move a vector by 1e-3).
ROUTER_TIE = 1e-5
# More near-tie rows than this share in a case is not rounding: the export is refused.
MAX_TIE_SHARE = 0.05


class ExportParityError(UserEmbedError):
    """The exported graph does not reproduce PyTorch (or loses an expert): nothing published."""


class ParityCheck:
    """onnxruntime against the rebuilt encoder on one export's held-out and crafted rows."""

    def __init__(self, enc: ExportableEncoder, held: Rows, crafted: Rows) -> None:
        self.enc, self.held, self.crafted = enc, held, crafted
        self.ref_held, self.ref_crafted = run_torch(enc, held), run_torch(enc, crafted)
        self.tie_held, self.tie_crafted = near_tie(enc, held), near_tie(enc, crafted)
        self.got_held: tuple[np.ndarray, ...] = ()
        self.got_crafted: tuple[np.ndarray, ...] = ()

    def fp32(self, path: Path, model_pt: Path) -> dict[str, Any]:
        """Max |onnxruntime - torch| per case, and the rebuilt encoder against TorchRec."""
        enc, held, crafted = self.enc, self.held, self.crafted
        sess = new_session(path, 2, quiet=True)
        self.got_held, self.got_crafted = run_ort(sess, held), run_ort(sess, crafted)
        # batch 1: the first crafted row clear of a routing tie, so the case checks something
        one = slice_rows(crafted, np.arange(1) + int(np.argmin(self.tie_crafted)))
        half = max(1, enc.sequence_length // 2)
        seqs = {*enc.sequence_names, *enc.attribute_names}  # every input with a length axis
        short = {k: (v[:, :half] if k in seqs else v) for k, v in held.items()}
        torchrec = torchrec_reference(model_pt, held, enc.cfg.input_spec)
        return {
            "heldout": diffs(self.got_held, self.ref_held, self.tie_held),
            "crafted": diffs(self.got_crafted, self.ref_crafted, self.tie_crafted),
            "batch1": diffs(run_ort(sess, one), run_torch(enc, one), near_tie(enc, one)),
            "half_length": diffs(run_ort(sess, short), run_torch(enc, short), near_tie(enc, short)),
            "torchrec_vs_export_max_abs_diff": float(
                np.abs(torchrec - self.ref_held[0]).max(initial=0.0)
            ),
        }

    def variant(self, name: str, path: Path) -> dict[str, float]:
        """Cosine of a variant's user vectors to fp32's (after `fp32`); fp16 must keep
        FP16_MIN_COSINE."""
        sess = new_session(path, 2, quiet=True)
        cos = cosine(run_ort(sess, self.held)[0], self.got_held[0])
        cos_c = cosine(run_ort(sess, self.crafted)[0], self.got_crafted[0])
        figures = {
            "cosine_to_fp32_min": float(min(cos.min(), cos_c.min())),
            "cosine_to_fp32_mean": float(np.concatenate([cos, cos_c]).mean()),
        }
        if name == "fp16" and figures["cosine_to_fp32_min"] < FP16_MIN_COSINE:
            raise ExportParityError(
                f"fp16 variant: min cosine to fp32 {figures['cosine_to_fp32_min']:.6f}"
                f" < {FP16_MIN_COSINE}"
            )
        return figures


def check_parity(parity: Mapping[str, Any], max_abs_diff: float) -> None:
    """Raise ExportParityError listing every problem of the fp32 figures, if any."""
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
    for case in FP32_CASES:
        d = fp32[case]["user_vector_max_abs_diff"]
        if not d <= max_abs_diff:  # also catches NaN
            problems.append(
                f"{case}: user vector max |onnxruntime - torch| {d:.3e} > {max_abs_diff}"
            )
        ties, rows = fp32[case]["near_tie_rows"], fp32[case]["rows"]
        if ties > MAX_TIE_SHARE * rows:
            problems.append(
                f"{case}: {ties} of {rows} rows route within {ROUTER_TIE} of a tie (more than "
                f"{MAX_TIE_SHARE:.0%}): too many to leave out of the parity check"
            )
    d = fp32["torchrec_vs_export_max_abs_diff"]
    if not d <= max_abs_diff:
        problems.append(f"rebuilt encoder differs from the TorchRec model by {d:.3e}")
    if problems:
        raise ExportParityError("export refused: " + "; ".join(problems))


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


@torch.no_grad()
def torchrec_reference(
    model_pt: Path, arrays: Mapping[str, np.ndarray], spec: InputSpec
) -> np.ndarray:
    """User vectors of the TorchRec SuperMoEModel itself (KJT path) on the same rows: proves
    the nn.Embedding rebuild reads the tables exactly as training did."""
    model = load_unsharded(model_pt)
    n = arrays[PROFILE_INPUT].shape[0]
    split = EncodedSplit(
        sequences={
            n: arrays[n]
            for n in (*(f.name for f in spec.sequence_features), *spec.item_attribute_inputs)
        },
        profile=arrays[PROFILE_INPUT],
        labels=np.zeros((n, len(model.cfg.task_names)), np.float32),
        long_term=arrays.get(LONG_TERM_INPUT),
    )
    batch = make_batch(split, np.arange(n), spec)
    out, _ = model(batch.seq_kjt, batch.profile_kjt, None, long_term=batch.long_term)
    return out.user_vector.numpy()


def run_ort(
    sess: Any, arrays: Mapping[str, np.ndarray], batch: int = 256
) -> tuple[np.ndarray, ...]:
    """The session's outputs on `arrays`, fed as the server feeds it: only the inputs the graph
    has (a model without profile features has no `profile` input)."""
    names = [i.name for i in sess.get_inputs()]
    n = next(iter(arrays.values())).shape[0]
    parts = [
        sess.run(None, {k: arrays[k][s : s + batch] for k in names}) for s in range(0, n, batch)
    ]
    return tuple(np.concatenate([p[i] for p in parts]) for i in range(len(parts[0])))


@torch.no_grad()
def run_torch(enc: ExportableEncoder, arrays: Mapping[str, np.ndarray]) -> tuple[np.ndarray, ...]:
    return tuple(t.numpy() for t in enc(*torch_inputs(enc, arrays)))


def near_tie(enc: ExportableEncoder, arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    """(B,) bool: rows whose top-k routing is within ROUTER_TIE of a tie."""
    return routing_tie_margin(enc, arrays) < ROUTER_TIE


def diffs(
    got: Sequence[np.ndarray], ref: Sequence[np.ndarray], tie: np.ndarray
) -> dict[str, float]:
    """Max |got - ref| per output over the rows clear of a routing tie (`tie` (B,) bool), the
    rows and how many were left out."""
    keep = ~tie
    out: dict[str, float] = {
        "user_vector_max_abs_diff": float(np.abs(got[0] - ref[0])[keep].max(initial=0.0))
    }
    if len(ref) > 1:
        out["task_scores_max_abs_diff"] = float(np.abs(got[1] - ref[1])[keep].max(initial=0.0))
    out["rows"] = len(tie)
    out["near_tie_rows"] = int(tie.sum())
    return out


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity (N,) of two (N, V) arrays."""
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (a * b).sum(axis=1) / np.maximum(den, 1e-12)
