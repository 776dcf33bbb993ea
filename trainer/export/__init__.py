"""Export a trained run to ONNX, check it against PyTorch, publish it to the registry.

One module per job, in the order export_model (publish.py) runs them:

    rebuild.py     the exportable encoder (nn.Embedding tables + the dense arch) from model.pt
    inputs.py      random rows of an InputSpec, a run's held-out rows
    coverage.py    crafted rows that route tokens to every expert of every MoE layer
    onnx_files.py  the traced fp32 file, fp16/int8 variants, external data
    parity.py      onnxruntime vs PyTorch vs TorchRec; refuses an export that differs
    publish.py     export_model: all of the above, then a registry version
"""

from trainer.export.coverage import expert_covering_inputs
from trainer.export.inputs import load_heldout, random_inputs
from trainer.export.onnx_files import export_onnx
from trainer.export.parity import ExportParityError
from trainer.export.publish import ExportResult, export_model
from trainer.export.rebuild import ExportableEncoder, moe_layers

__all__ = [
    "ExportParityError",
    "ExportResult",
    "ExportableEncoder",
    "expert_covering_inputs",
    "export_model",
    "export_onnx",
    "load_heldout",
    "moe_layers",
    "random_inputs",
]
