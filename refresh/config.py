"""What one refresh run is asked to do: `RefreshConfig`, its modes, engines and defaults.

The defaults here are the only spelling of them: `userembed refresh` reads its flag defaults
from this class. Light imports only (no ray, no onnxruntime, no redis), so the CLI can import
it when it builds its parser.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from userembed import paths
from userembed.errors import InvalidInputError
from userembed.registry import DEFAULT_MODEL, LATEST
from userembed.similar_index import IndexParams

FULL = "full"  # every user's vector is computed
INCREMENTAL = "incremental"  # only users with features newer than the serving version's
MODES = (FULL, INCREMENTAL)

LOCAL = "local"  # one process, parts in file order (refresh/worker.py `run_local`)
RAY = "ray"  # a Ray Data actor pool (refresh/ray_engine.py `run_ray`)
ENGINES = (LOCAL, RAY)

DEFAULT_VECTOR_TTL_S = 14 * 24 * 3600  # outlives a week of failed nightly runs

# compatibility maps into the previous model version's space (refresh/compat.py)
PROCRUSTES = "procrustes"  # orthogonal: a rotation of the new space
LSTSQ = "lstsq"  # unconstrained least squares
COMPAT_METHODS = (PROCRUSTES, LSTSQ)


@dataclass(frozen=True)
class RefreshConfig:
    model: str = DEFAULT_MODEL
    model_ref: str = LATEST  # registry alias or version id
    mode: str = FULL
    engine: str = LOCAL
    ray_address: str | None = None  # None: start a local Ray instance
    ray_actors: int = 2
    batch_size: int = 1024  # users per encoder run
    part_rows: int = 50_000  # file rows per checkpointed part
    resume: bool = True  # continue a killed run with the same plan
    keep: int = 3  # ready versions kept for rollback
    min_norm: float | None = None  # default from the manifest (l2: 1 +- 1e-3)
    max_norm: float | None = None
    drift_sample: int = 1000  # users compared with the previous version (and read back)
    drift_k: int = 10
    intra_op_threads: int = 2  # onnxruntime threads (per Ray actor: 1)
    vector_ttl_s: int | None = DEFAULT_VECTOR_TTL_S
    progress_every_s: float = 10.0
    pause_between_parts_s: float = 0.0  # throttle: spare a shared Redis (and lets tests kill)
    lock_ttl_s: float = 60.0  # refresh lock TTL, renewed every third of it (refresh/lock.py)
    lock_wait_s: float = 0.0  # a second run of the model: 0 fails at once, else waits this long
    # Train/serve consistency of the new version before the flip (userembed.consistency):
    # this many users, 0 off; skipped where nothing was materialised into this Redis. A
    # mismatch is logged and reported in the summary, and blocks the flip only when
    # check_blocks_flip is set: the new vectors come from the offline files, so a mismatch
    # mostly means stale online rows (run `feast materialize`), which keeping the older
    # version does not fix.
    check_sample: int = 200
    check_blocks_flip: bool = False
    registry_root: str = field(default_factory=paths.registry_root)
    redis_url: str = field(default_factory=paths.redis_url)
    offline_dir: str = field(default_factory=lambda: str(paths.offline_dir()))
    # the similar-users index built for each version before the flip (refresh/index_build.py)
    similar_index: bool = True
    similar_root: str = field(default_factory=lambda: str(paths.similar_root()))
    similar_params: IndexParams = IndexParams()
    # a map from the new version's space into the previous model version's, fitted on this
    # many shared users (refresh/compat.py; docs/compatibility.md); 0: none
    compat_sample: int = 50_000
    compat_method: str = LSTSQ  # kept more downstream AUC than PROCRUSTES (bench/compat.py)

    def __post_init__(self) -> None:
        problems = []
        if self.mode not in MODES:
            problems.append(f"mode must be one of {MODES}")
        if self.engine not in ENGINES:
            problems.append(f"engine must be one of {ENGINES}")
        if self.batch_size < 1 or self.part_rows < 1 or self.ray_actors < 1:
            problems.append("batch_size, part_rows and ray_actors must be >= 1")
        if self.lock_ttl_s <= 0 or self.lock_wait_s < 0:
            problems.append("lock_ttl_s must be > 0 and lock_wait_s >= 0")
        if self.check_sample < 0:
            problems.append("check_sample must be >= 0 (0: no consistency check)")
        if self.compat_method not in COMPAT_METHODS or self.compat_sample < 0:
            problems.append(f"compat_method must be one of {COMPAT_METHODS}, compat_sample >= 0")
        if self.keep < 1:
            problems.append("keep must be >= 1 (the serving version)")
        if problems:
            raise InvalidInputError("invalid refresh config: " + "; ".join(problems))
