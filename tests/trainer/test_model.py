"""Model structure: the sparse/dense split the export relies on, empty histories, ONNX export."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tests.trainer.dist_worker import PROFILE, tiny_config
from tests.trainer.frames import tiny_frame
from trainer.batches import build_input_spec, encode_split, make_batch
from trainer.dense import DenseArch
from trainer.encoder import LongTermNorm, sequence_stats
from trainer.model import SuperMoEModel
from trainer.train import train


@pytest.fixture(scope="module")
def setup():  # type: ignore[no-untyped-def]
    frame = tiny_frame(200)
    cfg = tiny_config("/tmp/unused", frame).model
    torch.manual_seed(0)
    model = SuperMoEModel(cfg).eval()
    split = encode_split(frame, cfg.input_spec, cfg.task_names)
    return frame, cfg, model, split


def test_dense_arch_is_plain_torch(setup) -> None:  # type: ignore[no-untyped-def]
    _, _, model, _ = setup
    assert isinstance(model.dense_arch, DenseArch)
    assert not any(type(m).__module__.startswith("torchrec") for m in model.dense_arch.modules())


def test_users_with_empty_history_get_finite_unit_vectors(setup) -> None:  # type: ignore[no-untyped-def]
    frame, cfg, model, split = setup
    empty = np.flatnonzero(frame["seq_len"].to_numpy() == 0)
    assert len(empty) > 0
    batch = make_batch(split, empty, cfg.input_spec)
    for train_mode in (False, True):
        model.train(train_mode)
        out, _ = model(batch.seq_kjt, batch.profile_kjt, None, long_term=batch.long_term)
        assert torch.isfinite(out.user_vector).all() and torch.isfinite(out.task_logits).all()
        torch.testing.assert_close(out.user_vector.norm(dim=-1), torch.ones(len(empty)))
    model.eval()


def test_padding_positions_never_reach_the_user_vector(setup) -> None:  # type: ignore[no-untyped-def]
    # Attention mask, pooled mean, CLS read-out and per-feature bags must all ignore padding:
    # garbage in padded slots (e.g. a non-zero padding row) must not move any user's vector.
    _, cfg, model, _ = setup
    g = torch.Generator().manual_seed(0)
    b, length, d = 6, cfg.input_spec.sequence_length, cfg.embedding_dim
    mask = torch.arange(length)[None, :] < torch.tensor([0, 1, 3, 5, 8, length])[:, None]
    names = [f.name for f in cfg.input_spec.sequence_features]
    seq = {n: torch.randn(b, length, d, generator=g) for n in names}
    profile = torch.randn(b, len(cfg.input_spec.profile_features), d, generator=g)
    noisy = {n: torch.where(mask[..., None], t, 100 * torch.randn_like(t)) for n, t in seq.items()}
    ids = [torch.randint(1, 6, (b, length), generator=g) for _ in names]
    noisy_ids = [torch.where(mask, x, torch.randint(1, 99, (b, length), generator=g)) for x in ids]
    stats = sequence_stats(ids, mask, length)
    torch.testing.assert_close(sequence_stats(noisy_ids, mask, length), stats, atol=0, rtol=0)
    long_term = torch.rand(b, cfg.input_spec.long_term_width, generator=g)
    dense = model.dense_arch.eval()
    with torch.no_grad():
        clean_out = dense(seq, mask, profile, stats, long_term)
        noisy_out = dense(noisy, mask, profile, stats, long_term)
    torch.testing.assert_close(noisy_out.user_vector, clean_out.user_vector, atol=1e-5, rtol=0)


def test_sequence_stats_count_distinct_values_of_real_events_only() -> None:
    length = 6
    ids = torch.tensor([[3, 3, 5, 7, 0, 0], [2, 2, 2, 2, 2, 2], [0, 0, 0, 0, 0, 0]])
    mask = ids != 0
    stats = sequence_stats(
        [ids], mask, length
    )  # (3, 2): distinct / events, log1p(distinct) / log1p(L)
    distinct = torch.tensor([3.0, 1.0, 0.0])
    torch.testing.assert_close(stats[:, 0], distinct / torch.tensor([4.0, 6.0, 1.0]))
    torch.testing.assert_close(stats[:, 1], torch.log1p(distinct) / math.log1p(length))


def test_table_weights_feed_plain_embeddings_to_the_same_outputs(setup, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The export path: nn.Embedding tables + DenseArch == SuperMoEModel, and ONNX agrees."""
    ort = pytest.importorskip("onnxruntime")
    _, cfg, model, split = setup
    tables = model.table_weights()
    spec = cfg.input_spec

    class Plain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.seq = nn.ModuleDict(
                {
                    f.name: nn.Embedding.from_pretrained(tables[f"t_{f.name}"])
                    for f in spec.sequence_features
                }
            )
            self.prof = nn.ModuleList(
                nn.Embedding.from_pretrained(tables[f"t_{f.name}"]) for f in spec.profile_features
            )
            self.dense = model.dense_arch

        def forward(self, item, cat, ev, gap, profile, long_term):  # type: ignore[no-untyped-def]
            ids = dict(
                zip([f.name for f in spec.sequence_features], [item, cat, ev, gap], strict=True)
            )
            seq_emb = {n: self.seq[n](ids[n]) for n in ids}
            prof = torch.stack([e(profile[:, j]) for j, e in enumerate(self.prof)], dim=1)
            mask = item != 0
            out = self.dense(
                seq_emb,
                mask,
                prof,
                sequence_stats([item, cat, ev, gap], mask, spec.sequence_length),
                long_term,
            )
            return out.user_vector, out.task_logits

    idx = np.arange(64)
    batch = make_batch(split, idx, spec)
    with torch.no_grad():
        ref, _ = model(batch.seq_kjt, batch.profile_kjt, None, long_term=batch.long_term)
    args = tuple(torch.from_numpy(split.sequences[f.name][idx]) for f in spec.sequence_features)
    assert split.long_term is not None
    args += (torch.from_numpy(split.profile[idx]), torch.from_numpy(split.long_term[idx]))
    plain = Plain().eval()
    with torch.no_grad():
        vec, logits = plain(*args)
    torch.testing.assert_close(vec, ref.user_vector, atol=1e-6, rtol=1e-5)
    # Every expert of every MoE layer must be reached by this batch for the export check.
    assert all((s.expert_load > 0).all() for s in ref.router_stats)

    path = tmp_path / "enc.onnx"
    names = ["item_seq", "category_seq", "event_type_seq", "gap_bucket_seq", "profile", "long_term"]
    torch.onnx.export(
        plain,
        args,
        str(path),
        input_names=names,
        output_names=["user_vector", "task_scores"],
        dynamic_axes={n: {0: "batch"} for n in names},
        dynamo=False,
    )
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {n: a.numpy() for n, a in zip(names, args, strict=True)})
    np.testing.assert_allclose(got[0], vec.numpy(), atol=1e-5)
    # A single user (most experts get no token) runs too.
    one = sess.run(None, {n: a[:1].numpy() for n, a in zip(names, args, strict=True)})
    np.testing.assert_allclose(one[0], vec[:1].numpy(), atol=1e-5)


@pytest.mark.timeout(300)
def test_a_trait_only_the_whole_history_holds_is_learned_through_the_long_term_input(
    tmp_path: Path,
) -> None:
    """The label is the user's tenure, which no event of the last L shows: the model learns
    it from the long-term input, and a model without that input cannot."""
    frame = tiny_frame(400)
    frame["label_click"] = (frame["lt_seconds_since_first"] > 30 * 86_400).astype(float)
    auc = {}
    for long_term in (True, False):
        cfg = tiny_config(str(tmp_path / str(long_term)), frame, max_steps=80, eval_every=20)
        spec = build_input_spec(frame, PROFILE, sequence_length=12, long_term=long_term)
        assert (spec.long_term is not None) == long_term
        cfg = cfg.with_(model=replace(cfg.model, input_spec=spec))
        auc[long_term] = train(cfg, frame).test_auc["click"]
    assert auc[True] > 0.7 and auc[False] < 0.65, auc


def test_long_term_standardisation_is_fixed_after_the_first_training_batch() -> None:
    """Data-dependent initialisation: later batches, eval mode and a batch of one all use the
    first training batch's statistics."""
    norm = LongTermNorm(3).train()
    first = torch.tensor([[0.0, 1.0, 0.5], [1.0, 1.0, 0.5], [2.0, 1.0, 0.7]])
    out = norm(first)
    torch.testing.assert_close(out[:, 0], (first[:, 0] - 1.0) / first[:, 0].std(unbiased=False))
    # A constant column is centred and scaled by at most 1 / MIN_SCALE.
    torch.testing.assert_close(out[:, 1], torch.zeros(3))
    assert norm.scale[1] == LongTermNorm.MIN_SCALE
    one = torch.tensor([[5.0, 0.0, 0.0]])
    again = norm(one)  # a batch of one, still in training mode: no new statistics
    torch.testing.assert_close(norm.eval()(one), again)
    assert bool(norm.initialised)
