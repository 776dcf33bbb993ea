"""A tiny torch-free ONNX encoder and its input spec, published to a real registry: the model
the server tests (tests/embed_server) and the refresh tests (tests/refresh) both run."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from userembed.features import (
    BEHAVIOR_VIEW,
    LONG_TERM_INPUT,
    PROFILE_VIEW,
    FeatureSpec,
    InputSpec,
    LongTermSpec,
)
from userembed.manifest import single_onnx_manifest
from userembed.registry import LATEST, Registry

MODEL = "tiny"
DIM = 8
SPEC = InputSpec(
    sequence_length=6,
    sequence_features=(
        FeatureSpec("item_seq", 50, BEHAVIOR_VIEW),
        FeatureSpec("category_seq", 10, BEHAVIOR_VIEW),
    ),
    profile_features=(FeatureSpec("age_bucket", 8, PROFILE_VIEW),),
)
# The same model with the long-term input (userembed.features.encode_long_term).
LT_SPEC = replace(SPEC, long_term=LongTermSpec())


def tiny_encoder(
    spec: InputSpec, dim: int, seed: int, out_dim: int | None = None
) -> onnx.ModelProto:
    """Gather per feature -> mean over positions -> sum -> MatMul: (B, ...) -> user_vector (B, D).
    With `spec.long_term`, the `long_term` input (B, H) times a (H, D) matrix joins the sum."""
    rng = np.random.default_rng(seed)
    out_dim = out_dim or dim
    inits, nodes, inputs, pooled = [], [], [], []
    feats = [(f.name, f.num_embeddings) for f in spec.sequence_features]
    feats.append(("profile", max(f.num_embeddings for f in spec.profile_features)))
    for name, n in feats:
        width = spec.sequence_length if name != "profile" else len(spec.profile_features)
        inputs.append(helper.make_tensor_value_info(name, TensorProto.INT64, ["B", width]))
        table = rng.normal(size=(n, dim)).astype(np.float32)
        inits.append(numpy_helper.from_array(table, f"t_{name}"))
        nodes.append(helper.make_node("Gather", [f"t_{name}", name], [f"e_{name}"]))  # (B, L, D)
        nodes.append(
            helper.make_node("ReduceMean", [f"e_{name}"], [f"m_{name}"], axes=[1], keepdims=0)
        )  # (B, D)
        pooled.append(f"m_{name}")
    if spec.long_term is not None:
        h = spec.long_term.width
        inputs.append(helper.make_tensor_value_info(LONG_TERM_INPUT, TensorProto.FLOAT, ["B", h]))
        w_lt = rng.normal(size=(h, dim)).astype(np.float32)
        inits.append(numpy_helper.from_array(w_lt, "w_long_term"))
        nodes.append(helper.make_node("MatMul", [LONG_TERM_INPUT, "w_long_term"], ["m_lt"]))
        pooled.append("m_lt")
    nodes.append(helper.make_node("Sum", pooled, ["pooled"]))
    w = rng.normal(size=(dim, out_dim)).astype(np.float32)
    inits.append(numpy_helper.from_array(w, "w_out"))
    nodes.append(helper.make_node("MatMul", ["pooled", "w_out"], ["user_vector"]))  # (B, D)
    out = helper.make_tensor_value_info("user_vector", TensorProto.FLOAT, ["B", out_dim])
    graph = helper.make_graph(nodes, "tiny", inputs, [out], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def publish_tiny(
    registry: Registry,
    staging: Path,
    seed: int,
    out_dim: int | None = None,
    model: str = MODEL,
    aliases: tuple[str, ...] = (LATEST,),
    spec: InputSpec = SPEC,
) -> str:
    """Publish a tiny encoder (its `latest` alias moves); returns the version id."""
    d = staging / f"{model}-{seed}-{out_dim}"
    d.mkdir(parents=True, exist_ok=True)
    onnx.save(tiny_encoder(spec, DIM, seed, out_dim), str(d / "encoder.onnx"))
    manifest = single_onnx_manifest(model, d, spec, DIM)
    return registry.publish(manifest, d, aliases=aliases).version
