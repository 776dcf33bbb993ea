"""Writing the ONNX files: the traced fp32 graph, its fp16 and int8 variants, and external data
for weights past protobuf's 2 GB limit."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from trainer.export.rebuild import ExportableEncoder, torch_inputs
from userembed.features import LONG_TERM_INPUT, PROFILE_INPUT

OPSET = 17
VARIANTS = ("fp32", "fp16", "int8")
DEFAULT_EXTERNAL_DATA_THRESHOLD_MB = 1536.0  # protobuf refuses files over 2 GB


def export_onnx(enc: ExportableEncoder, path: Path, example: Mapping[str, np.ndarray]) -> None:
    """TorchScript-based exporter (dynamo=False): the dynamo exporter needs static forward
    arguments; this one exports the MoE with dynamic batch and length (shared/STACK.md)."""
    dynamic = {n: {0: "batch", 1: "sequence"} for n in (*enc.sequence_names, *enc.attribute_names)}
    if PROFILE_INPUT in enc.input_names:
        dynamic[PROFILE_INPUT] = {0: "batch"}
    if LONG_TERM_INPUT in enc.input_names:
        dynamic[LONG_TERM_INPUT] = {0: "batch"}
    for o in enc.output_names:
        dynamic[o] = {0: "batch"}
    with warnings.catch_warnings():
        # Tracer warnings about shape arithmetic in the MoE loop: dynamic axes cover them and
        # the parity check proves the graph.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            enc,
            torch_inputs(enc, example),
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


def make_variant(name: str, fp32_path: Path, path: Path, threshold_mb: float) -> tuple[str, ...]:
    """The fp16 or int8 (dynamic quantisation) variant of the fp32 file, written to `path`;
    -> its external data file names."""
    raw = path.with_name(path.name + ".raw")
    if name == "fp16":
        import onnx
        from onnxruntime.transformers.float16 import convert_float_to_float16

        # keep_io_types: inputs stay int64, outputs float32, so callers do not change.
        model = convert_float_to_float16(onnx.load(str(fp32_path)), keep_io_types=True)
        onnx.save_model(model, str(raw))
    elif name == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        # The quantizer logs every tensor on the root logger; keep a CLI run readable.
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)
        try:
            quantize_dynamic(str(fp32_path), str(raw), weight_type=QuantType.QInt8)
        finally:
            root.setLevel(level)
    else:
        raise ValueError(f"unknown variant {name!r}; expected fp16 or int8")
    ext = save_with_external_data(raw, path, threshold_mb)
    raw.unlink()
    return ext
