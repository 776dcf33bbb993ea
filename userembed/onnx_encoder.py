"""The ONNX encoder: one onnxruntime session per loaded model version (never torch)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from userembed.errors import CorruptModelError
from userembed.features import InputSpec, encode_inputs
from userembed.items import ItemAttributeMap
from userembed.manifest import USER_VECTOR_OUTPUT

logger = logging.getLogger(__name__)


def choose_providers() -> list[str]:
    """CUDA when this onnxruntime build has it (onnxruntime-gpu), always CPU as the fallback."""
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def new_session(
    source: bytes | str | Path,
    intra_op_threads: int = 2,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    allow_spinning: bool = True,
    quiet: bool = False,
) -> ort.InferenceSession:
    """The one onnxruntime session set-up (server, refresh, export parity, benchmarks): a fixed
    intra-op pool, no inter-op parallelism (the encoder is one chain), full graph optimisation.
    `allow_spinning=False`: idle intra-op threads sleep instead of busy-waiting, for callers
    that share the cores with their own Python work between runs (the batch refresh).
    `quiet`: errors only from onnxruntime's own log (offline checks, benchmarks)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = intra_op_threads
    opts.inter_op_num_threads = 1
    if quiet:
        opts.log_severity_level = 3
    if not allow_spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(
        source if isinstance(source, bytes) else str(source),
        sess_options=opts,
        providers=list(providers),
    )


class OnnxEncoder:
    """Runs encoder inputs (`userembed.features.encode_inputs`) -> user vectors (B, D) float32."""

    def __init__(
        self,
        source: bytes | str | Path,
        dim: int,
        intra_op_threads: int = 2,
        name: str = "",
        allow_spinning: bool = True,
    ) -> None:
        """`source`: ONNX bytes or a path (registry `LoadedModel.session_source()`);
        `allow_spinning` as in `new_session`."""
        name = name or (str(source) if not isinstance(source, bytes) else "<onnx bytes>")
        try:
            self.session = new_session(source, intra_op_threads, choose_providers(), allow_spinning)
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph/... types
            raise CorruptModelError(f"{name}: onnxruntime cannot load it ({e})") from e
        self.provider = self.session.get_providers()[0]
        self.input_names = [i.name for i in self.session.get_inputs()]
        outputs = [o.name for o in self.session.get_outputs()]
        if USER_VECTOR_OUTPUT not in outputs:
            raise CorruptModelError(f"{name}: no '{USER_VECTOR_OUTPUT}' output ({outputs})")
        self.dim = dim
        logger.info(
            "encoder %s on %s (%d intra-op threads), inputs %s",
            name,
            self.provider,
            intra_op_threads,
            self.input_names,
        )

    def run(self, inputs: Mapping[str, np.ndarray]) -> np.ndarray:
        """(B, D) float32 user vectors."""
        missing = [n for n in self.input_names if n not in inputs]
        if missing:
            raise CorruptModelError(f"encoder wants inputs {missing} that the input spec lacks")
        (vectors,) = self.session.run(
            [USER_VECTOR_OUTPUT], {n: inputs[n] for n in self.input_names}
        )
        return np.asarray(vectors, dtype=np.float32)

    def smoke_test(self, spec: InputSpec, items: ItemAttributeMap | None = None) -> None:
        """Run two all-padding users; refuse a model whose output is not (2, dim) and finite.
        `items`: the entry's item attribute map (a model with item attributes needs it)."""
        rows: dict[str, list] = dict.fromkeys(spec.feature_names(), [None, None])
        rows.update({f.name: [None, [1, 2, 3]] for f in spec.sequence_features})
        rows.update({f.name: [None, 1] for f in spec.profile_features})
        try:
            out = self.run(encode_inputs(rows, spec, items))
        except CorruptModelError:
            raise
        except Exception as e:  # any onnxruntime failure means the model cannot serve
            raise CorruptModelError(f"smoke inference failed: {type(e).__name__}: {e}") from e
        if out.shape != (2, self.dim):
            raise CorruptModelError(f"smoke inference gave shape {out.shape}, want (2, {self.dim})")
        if not np.isfinite(out).all():
            raise CorruptModelError("smoke inference gave non-finite values")
