"""Run under `torchrun --nproc_per_node=2`: sharded training on the tiny frame (stopped after
its first checkpoint, then resumed), then save (rank 0) the sharded model's eval outputs on a
fixed batch and its gathered tables + DenseArch.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tests.trainer.frames import tiny_frame
from trainer.batches import build_input_spec, encode_split, make_batch, task_names_of
from trainer.config import ModelConfig, MoEConfig, TrainConfig
from trainer.distributed import DistContext, dense_state_dict, gather_tables, shutdown_distributed
from trainer.train import train

PROFILE = ("age_bucket", "gender", "occupation", "region")


def tiny_config(run_dir: str, frame, **train_kw) -> TrainConfig:  # type: ignore[no-untyped-def]
    spec = build_input_spec(frame, PROFILE, sequence_length=12)
    model = ModelConfig(
        input_spec=spec,
        task_names=task_names_of(frame),
        embedding_dim=16,
        num_heads=2,
        user_dim=16,
        tower_hidden=16,
        dropout=0.0,
        moe=MoEConfig(num_experts=4, num_experts_per_tok=2, expert_hidden=32),
    )
    kw = dict(
        batch_size=32,
        max_steps=30,
        eval_every=10,
        log_every=10,
        checkpoint_every=10,
        warmup_steps=5,
        patience=0,
        plots=False,
    )
    kw.update(train_kw)
    return TrainConfig(run_dir=run_dir, model=model, **kw)


def main(out_dir: str) -> None:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", force=True)
    frame = tiny_frame(400)
    cfg = tiny_config(str(Path(out_dir) / "run"), frame)
    spec = cfg.model.input_spec
    test = encode_split(frame[frame["split"] == "test"], spec, cfg.model.task_names)
    batch = make_batch(test, np.arange(48), spec)

    def on_trained(model: nn.Module, ctx: DistContext) -> None:
        model.eval()
        with torch.no_grad():
            out, _ = model(batch.seq_kjt, batch.profile_kjt, None, long_term=batch.long_term)
        tables = gather_tables(model, ctx)
        if ctx.is_main:
            torch.save(
                {
                    "user_vector": out.user_vector,
                    "task_logits": out.task_logits,
                    "tables": tables,
                    "dense_arch": dense_state_dict(model),
                    "world_size": ctx.world_size,
                },
                Path(out_dir) / "sharded.pt",
            )
        model.train()

    # Killed after its first checkpoint and resumed: sharded checkpoints load back as plain
    # tensors (weights_only, trainer/checkpoint.py).
    train(cfg, frame, stop_after_steps=cfg.checkpoint_every)
    train(cfg, frame, resume=True, on_trained=on_trained)
    shutdown_distributed(DistContext(world_size=2))


if __name__ == "__main__":
    main(sys.argv[1])
