"""What each stage of the pipeline needs, whether it is there, and the command that makes it.

Commands check their inputs here before any slow import, so running one too early is one line
naming what is missing and what to run (`no data set in var/data: run 'userembed data build'
first`); `userembed status` reads the same facts. Only files and the model registry are
looked at: neither the Feast library nor torch is imported.

    require_data_set()        # DataNotFoundError naming `userembed data build`
    require_feast_registry()  # ... naming `userembed feast apply`
"""

from __future__ import annotations

from pathlib import Path

from userembed import paths
from userembed.datasets.spec import SPEC_FILE
from userembed.errors import DataNotFoundError, ModelNotFoundError
from userembed.feast_ops import feast_registry_path
from userembed.features import SERVING_FEATURE_SERVICE
from userembed.registry import Registry

# The commands that make each stage's output, as a user types them.
DATA_BUILD = "userembed data build"
FEAST_APPLY = "userembed feast apply"
FEAST_FRESH = "userembed feast apply --fresh"
FEAST_MATERIALIZE = "userembed feast materialize"
TRAIN = "userembed train"
EXPORT = "userembed export --run {run}"
REFRESH = "userembed refresh"
SERVE = "userembed serve"


def run_first(problem: str, command: str) -> str:
    """The one line of a missing input: `<problem>: run '<command>' first`."""
    return f"{problem}: run '{command}' first"


def data_set_problem() -> str | None:
    """None when the raw tables and spec of a data set exist (what training reads)."""
    folder = paths.data_dir()
    if not all((folder / f).is_file() for f in (SPEC_FILE, paths.LABELS_FILE)):
        return f"no data set in {folder}"
    return None


def offline_tables_problem(folder: str | Path | None = None) -> str | None:
    """None when the Feast offline tables exist (what Feast, training and the refresh read)."""
    folder = Path(folder) if folder is not None else paths.offline_dir()
    missing = [f for f in (paths.BEHAVIOR_FILE, paths.PROFILE_FILE) if not (folder / f).is_file()]
    if missing:
        return f"no offline feature tables in {folder} ({', '.join(missing)} missing)"
    return None


def feast_registry_problem() -> str | None:
    """None when `feast apply` wrote the registry, serving feature service included. The file
    is a protobuf; the service name is looked up in its bytes, which spares importing Feast."""
    path = feast_registry_path()
    if not path.is_file():
        return f"no Feast registry at {path}"
    if SERVING_FEATURE_SERVICE.encode() not in path.read_bytes():
        return f"Feast registry {path} lacks feature service {SERVING_FEATURE_SERVICE}"
    return None


def require_data_set() -> None:
    """The data set and its offline tables (both come from one `data build`)."""
    problem = data_set_problem() or offline_tables_problem()
    if problem:
        raise DataNotFoundError(run_first(problem, DATA_BUILD))


def require_offline_tables(folder: str | Path | None = None) -> None:
    problem = offline_tables_problem(folder)
    if problem:
        raise DataNotFoundError(run_first(problem, DATA_BUILD))


def require_feast_registry() -> None:
    problem = feast_registry_problem()
    if problem:
        raise DataNotFoundError(run_first(problem, FEAST_APPLY))


def require_model(model: str, registry_root: str | None = None) -> None:
    """A published version of `model` (an unknown alias is the registry's own error)."""
    registry = Registry(registry_root)
    if model not in registry.list_models():
        raise ModelNotFoundError(
            run_first(
                f"unknown model '{model}' in registry {registry.root}", EXPORT.format(run="RUN_DIR")
            )
        )
