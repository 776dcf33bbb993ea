"""The MoE encoder on a GPU: CPU vs CUDA parity, and step time with 16 vs 4 experts (bar 1.5x).

TorchRec's GPU kernels (fbgemm_gpu) are not on the lent GPU machine's image and are too large to
carry there, so this drives the dense arch (trainer.encoder.EncoderArch: attention + sparse MoE
blocks + read-out) directly with embedding tensors of the trained shape. That is the part whose
cost grows with the number of experts; the tables' cost does not depend on it.

    python3 bench/moe_gpu.py                      # on a CUDA machine
    python3 bench/moe_gpu.py --device cpu --batch-size 16 --steps 2   # smoke run
Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from trainer.config import ModelConfig, MoEConfig  # noqa: E402
from trainer.encoder import EncoderArch, sequence_stats  # noqa: E402
from trainer.moe import SparseMoeBlock  # noqa: E402
from userembed.features import BEHAVIOR_VIEW, PROFILE_VIEW, FeatureSpec, InputSpec  # noqa: E402

SEQ = ("item_seq", "category_seq", "event_type_seq", "gap_bucket_seq")
PROFILE = ("age_bucket", "gender", "region")


def model_config(length: int, dim: int, experts: int, top_k: int, hidden: int) -> ModelConfig:
    spec = InputSpec(
        sequence_length=length,
        sequence_features=tuple(FeatureSpec(n, 1000, BEHAVIOR_VIEW) for n in SEQ),
        profile_features=tuple(FeatureSpec(n, 10, PROFILE_VIEW) for n in PROFILE),
    )
    return ModelConfig(
        input_spec=spec,
        task_names=("a",),
        embedding_dim=dim,
        num_heads=4,
        num_layers=2,
        moe=MoEConfig(num_experts=experts, num_experts_per_tok=top_k, expert_hidden=hidden),
    )


def inputs(batch: int, length: int, dim: int, device: torch.device, seed: int) -> tuple:
    g = torch.Generator().manual_seed(seed)
    seq = {n: torch.randn(batch, length, dim, generator=g) for n in SEQ}
    # Between 1 and `length` events per user, as in the data (padding at the end).
    n = torch.randint(1, length + 1, (batch,), generator=g)
    mask = torch.arange(length)[None, :] < n[:, None]
    profile = torch.randn(batch, len(PROFILE), dim, generator=g)
    ids = [torch.randint(1, 1000, (batch, length), generator=g) * mask for _ in SEQ]
    return (
        {k: v.to(device) for k, v in seq.items()},
        mask.to(device),
        profile.to(device),
        sequence_stats(ids, mask, length).to(device),
    )


def parity(device: torch.device, args: argparse.Namespace) -> float:
    """Max abs difference of the user vectors, float32, eval (dropless) routing."""
    torch.manual_seed(0)
    cfg = model_config(args.length, args.dim, 16, 2, args.hidden)
    model = EncoderArch(cfg).eval()
    x = inputs(256, args.length, args.dim, torch.device("cpu"), seed=1)
    with torch.no_grad():
        ref, _ = model(*x)
        model.to(device)
        out, _ = model(*(_to(t, device) for t in x))
    return float((out.cpu() - ref).abs().max())


def _to(t: Any, device: torch.device) -> Any:
    return {k: v.to(device) for k, v in t.items()} if isinstance(t, dict) else t.to(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_time(
    device: torch.device, args: argparse.Namespace, experts: int, top_k: int, dispatch: str
) -> float:
    """Median seconds of one training step (forward, balance + z losses, backward, AdamW)."""
    torch.manual_seed(0)
    cfg = model_config(args.length, args.dim, experts, top_k, args.hidden)
    model = EncoderArch(cfg).to(device).train()
    for m in model.modules():
        if isinstance(m, SparseMoeBlock):
            m.sorted_dispatch = dispatch == "sorted"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = inputs(args.batch_size, args.length, args.dim, device, seed=2)
    times = []
    for i in range(args.steps + 3):  # 3 warm-up steps
        _sync(device)
        t0 = time.perf_counter()
        vec, stats = model(*x)
        loss = vec.square().mean() + sum(0.01 * s.balance_loss + 0.001 * s.z_loss for s in stats)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        _sync(device)
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def profile(device: torch.device, args: argparse.Namespace) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=activities, with_stack=True) as prof:
        step_time(device, argparse.Namespace(**{**vars(args), "steps": 2}), 16, 2, "sorted")
    key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=15, max_name_column_width=40))
    if device.type == "cuda":
        host_copies(device, args)


def host_copies(device: torch.device, args: argparse.Namespace) -> None:
    """Print the Python lines that copy host tensors to the GPU during a training step."""
    import traceback
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    sites: Counter[str] = Counter()

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, a=(), kw=None):  # type: ignore[no-untyped-def]
            kw = kw or {}
            if func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default):
                src = a[1] if func is torch.ops.aten.copy_.default else a[0]
                dst = a[0].device if func is torch.ops.aten.copy_.default else kw.get("device")
                if isinstance(src, torch.Tensor) and src.device.type == "cpu" and src.numel() > 1:
                    if dst is not None and torch.device(dst).type == "cuda":
                        frames = [f for f in traceback.extract_stack() if "/work" in f.filename]
                        where = " <- ".join(f"{f.name}:{f.lineno}" for f in frames[-3:])
                        sites[f"{tuple(src.shape)} {where}"] += 1
            return func(*a, **kw)

    with Spy():
        step_time(device, argparse.Namespace(**{**vars(args), "steps": 1}), 16, 2, "sorted")
    for site, n in sites.most_common(6):
        print(f"host->GPU copy x{n}: {site}")


def onnx_check(npz_path: str) -> dict[str, Any]:
    import numpy as np

    from userembed.onnx_encoder import OnnxEncoder

    data = np.load(npz_path)
    inputs = {k[3:]: data[k] for k in data.files if k.startswith("in_")}
    enc = OnnxEncoder(data["onnx"].tobytes(), dim=int(data["expected"].shape[1]))
    got = enc.run(inputs)
    diff = float(np.abs(got - data["expected"]).max())
    n = len(data["expected"])
    t0 = time.perf_counter()
    for _ in range(20):
        enc.run(inputs)
    rate = 20 * n / (time.perf_counter() - t0)
    print(f"onnx encoder on {enc.provider}: max abs diff {diff:.2e}, {rate:,.0f} users/s at {n}")
    return {"onnx_provider": enc.provider, "onnx_max_abs_diff": diff, "onnx_users_per_s": rate}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--length", type=int, default=50)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--hidden", type=int, default=256, help="expert width")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--profile", action="store_true", help="print the top ops of a 16-expert step")
    p.add_argument(
        "--onnx",
        help="an .npz from --prepare-onnx: run its exported encoder through embed_server's "
        "OnnxEncoder (the provider it picks here) and compare with the vectors made where it "
        "was exported",
    )
    args = p.parse_args(argv)
    device = torch.device(args.device)
    # Parity is about the kernels, not TF32 rounding.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "batch_size": args.batch_size,
        "length": args.length,
    }
    try:
        import onnxruntime as ort

        result["onnxruntime_providers"] = ort.get_available_providers()
    except ImportError:
        result["onnxruntime_providers"] = None
    if device.type == "cuda":
        result["cpu_vs_cuda_max_abs_diff"] = parity(device, args)
        print(f"parity CPU vs CUDA: max abs diff {result['cpu_vs_cuda_max_abs_diff']:.2e}")
    for dispatch in ("sorted", "masked"):
        for k in (1, 2):
            t4 = step_time(device, args, 4, k, dispatch)
            t16 = step_time(device, args, 16, k, dispatch)
            key = f"{dispatch}_top{k}"
            result[f"{key}_step_ms_4_experts"] = round(t4 * 1e3, 3)
            result[f"{key}_step_ms_16_experts"] = round(t16 * 1e3, 3)
            result[f"{key}_ratio_16_vs_4"] = round(t16 / t4, 3)
            sps = args.batch_size / t4
            print(
                f"{dispatch} dispatch, top-{k}: step {t4 * 1e3:.2f} ms with 4 experts "
                f"({sps:,.0f} samples/s), {t16 * 1e3:.2f} ms with 16 -> {t16 / t4:.2f}x (bar 1.5x)"
            )
    if args.onnx:
        result.update(onnx_check(args.onnx))
    if args.profile:
        profile(device, args)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
