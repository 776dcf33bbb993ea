"""Frozen configs of the SUPERMOE model and its training run; checkpoints carry them as dicts."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from userembed.errors import InvalidInputError
from userembed.features import InputSpec


@dataclass(frozen=True)
class MoEConfig:
    """Sparse mixture-of-experts FFN (Mixtral naming)."""

    num_experts: int = 4
    num_experts_per_tok: int = 2  # top-k: 1 or 2
    expert_hidden: int = 64
    # Training-time capacity per expert = ceil(capacity_factor * tokens * k / num_experts);
    # tokens over capacity skip the FFN (residual only). None = dropless. Eval is always dropless.
    capacity_factor: float | None = 1.25
    router_aux_loss_coef: float = 0.01  # Switch load-balancing loss weight
    router_z_loss_coef: float = 0.001  # ST-MoE router z-loss weight
    moe_every: int = 1  # 1 = every block is MoE; 2 = dense FFN, MoE, dense FFN, ...


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the SUPERMOE model. `input_spec` fixes the tables (sizes, hashing, order)."""

    input_spec: InputSpec
    task_names: tuple[str, ...]
    embedding_dim: int = 32  # D: every table, the transformer width
    num_layers: int = 2
    num_heads: int = 4
    dropout: float = 0.1
    user_dim: int = 64  # V: the universal user vector
    tower_hidden: int = 64
    moe: MoEConfig = field(default_factory=MoEConfig)
    # Which dense arch follows the tables: 'supermoe' (DenseArch) or a trainer/baselines.py arch
    # ('shared_bottom', 'mmoe', 'ple'), for the quality benchmark. See model.build_dense_arch.
    dense_arch: str = "supermoe"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["input_spec"] = self.input_spec.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        d = dict(d)
        d["input_spec"] = InputSpec.from_dict(d["input_spec"])
        d["task_names"] = tuple(d["task_names"])
        d["moe"] = MoEConfig(**d["moe"])
        return cls(**d)


LOSS_KINDS = ("indicator", "plain")  # trainer/loss.py implements them
WEIGHTINGS = ("fixed", "labelled", "uncertainty")


def check_loss_options(
    loss: str, task_weighting: str, task_weights: tuple[float, ...] | None
) -> None:
    """The loss settings TrainConfig accepts."""
    if loss not in LOSS_KINDS:
        raise InvalidInputError(f"loss {loss!r}: expected {' or '.join(LOSS_KINDS)}")
    if task_weighting not in WEIGHTINGS:
        raise InvalidInputError(
            f"task_weighting {task_weighting!r}: expected {', '.join(WEIGHTINGS)}"
        )
    if task_weights is not None and task_weighting != "fixed":
        raise InvalidInputError(
            f"task_weights are fixed weights: they cannot go with task_weighting={task_weighting!r}"
        )


def check_future_options(
    weight: float, window_seconds: int | None, targets: int, temperature: float
) -> None:
    """The self-supervised objective's settings TrainConfig accepts."""
    if not (math.isfinite(weight) and weight >= 0):
        raise InvalidInputError(f"future_loss_weight {weight}: expected a weight >= 0 (0 = off)")
    if window_seconds is not None and window_seconds <= 0:
        raise InvalidInputError(
            f"future_window_seconds {window_seconds}: expected seconds > 0, or none for the "
            "data set's window"
        )
    if targets < 1:
        raise InvalidInputError(f"future_targets {targets}: expected at least 1 per row")
    if not (math.isfinite(temperature) and temperature > 0):
        raise InvalidInputError(f"future_temperature {temperature}: expected a value > 0")


# The training budget's defaults (TrainConfig.sized). Early stopping ends most runs before
# the last epoch; epochs only bounds a run whose validation score keeps rising. Small data
# needs a validation score every epoch: MovieLens (12 steps an epoch) peaks within 10 epochs.
DEFAULT_EPOCHS = 20.0
MAX_EVAL_EVERY = 150  # steps between validation scores when an epoch is longer
# Default min_steps = this many warm-up spans: a score taken while the learning rate still
# climbs rates a model the self-supervised objectives have barely shaped, and on small data
# (12 steps an epoch) patience alone would end the run inside the warm-up.
MIN_STEPS_WARMUPS = 4
SIZED_FIELDS = ("max_steps", "eval_every", "min_steps")  # what TrainConfig.sized fills in


def steps_per_epoch(train_rows: int, batch_size: int, world_size: int = 1) -> int:
    """Steps of one pass over the training rows: full batches only (the loop drops the last
    partial one unless it is the only one), dealt round-robin to the processes."""
    return max(1, train_rows // batch_size // world_size)


def check_budget(
    epochs: float, max_steps: int | None, eval_every: int | None, min_steps: int | None = None
) -> None:
    """The training budget TrainConfig accepts."""
    if not (math.isfinite(epochs) and epochs > 0):
        raise InvalidInputError(f"epochs {epochs}: expected a number of passes > 0")
    if min_steps is not None and min_steps < 0:
        raise InvalidInputError(f"min_steps {min_steps}: expected 0 or more steps")
    for name, value in (("max_steps", max_steps), ("eval_every", eval_every)):
        if value is not None and value < 1:
            raise InvalidInputError(f"{name} {value}: expected at least 1 step, or none to size it")


@dataclass(frozen=True)
class TrainConfig:
    """One training run. `loss`: 'indicator' (per-task mean over labelled samples) or 'plain'."""

    run_dir: str
    model: ModelConfig
    seed: int = 0
    batch_size: int = 256
    # The budget (`sized`): `epochs` passes over the training rows, i.e. max_steps =
    # ceil(epochs x steps per epoch), and a validation score once an epoch or every
    # MAX_EVAL_EVERY steps, whichever comes first. A given max_steps / eval_every wins.
    # Validation scores before min_steps are logged but neither pick the final model nor
    # count towards patience; None = MIN_STEPS_WARMUPS x warmup_steps (at most max_steps).
    epochs: float = DEFAULT_EPOCHS
    max_steps: int | None = None
    eval_every: int | None = None
    min_steps: int | None = None
    checkpoint_every: int = 100
    patience: int = 3  # evaluations without validation-score gain before stopping; 0 = off
    lr: float = 2e-3  # AdamW, dense parameters
    weight_decay: float = 0.01
    sparse_lr: float = 0.05  # Adagrad fused in backward, embedding tables
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    loss: str = "indicator"
    # 'fixed' (task_weights), 'labelled' (w_t = task t's labelled share of the training rows
    # over the largest share) or 'uncertainty' (Kendall et al. 2018); trainer/loss.py
    task_weighting: str = "fixed"
    task_weights: tuple[float, ...] | None = None  # fixed weights; None = all 1
    # task -> run dirs of trained models that predict it: the mean of their calibrated
    # probabilities is the task's training target (trainer/distill.py). None = labels only.
    # A bare run dir reads as a one-teacher tuple.
    teachers: dict[str, tuple[str, ...]] | None = None
    # `--distill` (trainer/teachers.py): single-task teachers trained per task, at seeds
    # seed, seed + 1, ...; their mean ranks better than any one of them (docs/model.md).
    distill_teachers: int = 3
    # With teachers: the label's share of a labelled row's target, reached at max_steps by
    # linear annealing. 0.0 = the (calibrated) teacher is the target on every row; 1.0 =
    # BAM!'s annealing to plain labels (trainer/distill.py says why 0.0 is the default).
    distill_label_share: float = 0.0
    # The self-supervised objective (trainer/future_loss.py): the user vector predicts the items
    # and categories of the user's future window. Weight beside the task loss (0 = off; with no
    # labelled task it is the whole objective); the window of targets after the cut (None = the
    # data set's, spec.json future_window_seconds); targets per row and kind; temperature.
    future_loss_weight: float = 1.0
    future_window_seconds: int | None = None
    future_targets: int = 16
    future_temperature: float = 0.1
    # The whole-history objective (trainer/summary_loss.py): a linear decoder of the user vector
    # reconstructs the standardised long-term features. Weight beside the task loss (0 = off;
    # no effect on a model without the long-term input). 10: on the transfer benchmark (both
    # sources) the probe and the labelled AUCs were higher than at 3 (docs/model.md).
    summary_loss_weight: float = 10.0
    # The least spread a target column of that objective is standardised by (statistics of the
    # training split). 0.01: a genre 1 user in 50 rates (spread ~0.01-0.03) counts in full, as
    # a team's StandardScaler sees it; at the encoder's 0.1 such columns weighed 1/100 and the
    # vector lost the held-out gender they carry (docs/model.md).
    summary_min_scale: float = 0.01
    plots: bool = True
    log_every: int = 50

    def __post_init__(self) -> None:
        check_loss_options(self.loss, self.task_weighting, self.task_weights)
        check_budget(self.epochs, self.max_steps, self.eval_every, self.min_steps)
        check_future_options(
            self.future_loss_weight,
            self.future_window_seconds,
            self.future_targets,
            self.future_temperature,
        )
        if not self.model.task_names and self.future_loss_weight == 0:
            raise InvalidInputError(
                "nothing to train: no labelled task and future_loss_weight=0 (the "
                "self-supervised objective is the whole objective without tasks)"
            )
        if not (math.isfinite(self.summary_loss_weight) and self.summary_loss_weight >= 0):
            raise InvalidInputError(
                f"summary_loss_weight {self.summary_loss_weight}: expected a weight >= 0"
            )
        if not (math.isfinite(self.summary_min_scale) and self.summary_min_scale > 0):
            raise InvalidInputError(
                f"summary_min_scale {self.summary_min_scale}: expected a spread > 0"
            )
        if not 0.0 <= self.distill_label_share <= 1.0:
            raise InvalidInputError(
                f"distill_label_share {self.distill_label_share}: expected a share in [0, 1]"
            )
        if self.distill_teachers < 1:
            raise InvalidInputError(
                f"distill_teachers {self.distill_teachers}: expected at least 1 teacher per task"
            )
        if self.teachers is not None:
            # Normalised so that a config read back from JSON equals the one written.
            teachers = {
                t: (d,) if isinstance(d, str) else tuple(d) for t, d in self.teachers.items()
            }
            object.__setattr__(self, "teachers", teachers)
            empty = sorted(t for t, d in teachers.items() if not d)
            if empty:
                raise InvalidInputError(f"no teacher run given for tasks {empty}")
        unknown = sorted(set(self.teachers or {}) - set(self.model.task_names))
        if unknown:
            raise InvalidInputError(f"teachers for tasks the model does not have: {unknown}")

    def sized(self, train_rows: int, world_size: int = 1) -> TrainConfig:
        """This config with its budget fixed for `train_rows` training rows on `world_size`
        processes: max_steps = ceil(epochs x steps per epoch) unless given, eval_every = one
        epoch or MAX_EVAL_EVERY steps (the smaller) unless given, min_steps =
        MIN_STEPS_WARMUPS x warmup_steps unless given (both capped at max_steps). train() trains
        the sized config, and checkpoints, train_config.json and the report carry it."""
        per_epoch = steps_per_epoch(train_rows, self.batch_size, world_size)
        max_steps = self.max_steps or max(1, math.ceil(self.epochs * per_epoch))
        eval_every = self.eval_every or min(per_epoch, MAX_EVAL_EVERY)
        min_steps = self.min_steps
        if min_steps is None:
            min_steps = MIN_STEPS_WARMUPS * self.warmup_steps
        return replace(
            self, max_steps=max_steps, eval_every=eval_every, min_steps=min(min_steps, max_steps)
        )

    def sized_like(self, saved: TrainConfig) -> TrainConfig:
        """This config with the budget fields it leaves to `sized` (None) taken from `saved`,
        a run's saved (sized) config: equal to `saved` iff that run trained this config."""
        fill = {f: getattr(saved, f) for f in SIZED_FIELDS if getattr(self, f) is None}
        return replace(self, **fill)

    @property
    def total_steps(self) -> int:
        """max_steps of a sized config (`sized`: train() sizes it before its first step)."""
        if self.max_steps is None:
            raise RuntimeError("training budget not sized: call TrainConfig.sized first")
        return self.max_steps

    @property
    def eval_interval(self) -> int:
        """eval_every of a sized config (`sized`)."""
        if self.eval_every is None:
            raise RuntimeError("training budget not sized: call TrainConfig.sized first")
        return self.eval_every

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["model"] = self.model.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        d = dict(d)
        d["model"] = ModelConfig.from_dict(d["model"])
        # A config written before the self-supervised objective existed trained without it.
        d.setdefault("future_loss_weight", 0.0)
        if d.get("task_weights") is not None:
            d["task_weights"] = tuple(d["task_weights"])
        return cls(**d)

    def with_(self, **changes: Any) -> TrainConfig:
        return replace(self, **changes)
