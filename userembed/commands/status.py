"""`userembed status`: the pipeline's state on one screen, each stage with its next command.

userembed.status reads the contract's side; this module adds what only the composition root
may read: the trainer's run folders and the server's gRPC health at the default target.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from userembed import paths
from userembed.commands.serve import DEFAULT_TARGET
from userembed.registry import DEFAULT_MODEL
from userembed.status import RunInfo, ServerProbe, gather

PROBE_TIMEOUT_S = 2.0


def runs() -> list[RunInfo]:
    """Run folders under $USEREMBED_HOME/runs, oldest first (by their newest file)."""
    from trainer.run_dir import RunDir

    out = []
    folders = (
        [p for p in paths.runs_dir().glob("*") if p.is_dir()] if paths.runs_dir().is_dir() else []
    )
    for folder in folders:
        run = RunDir(folder)
        aucs: dict[str, float] = {}
        if run.report.is_file():
            report = json.loads(run.report.read_text())
            aucs = {t: float(m["auc"]) for t, m in report.get("test", {}).items() if "auc" in m}
            aucs |= {k: float(m["auc"]) for k, m in report.get("future_test", {}).items()}
        mtimes = [p.stat().st_mtime for p in folder.rglob("*") if p.is_file()]
        out.append(
            RunInfo(
                run_id=folder.name,
                path=str(folder),
                finished=run.model.is_file(),
                test_auc=aucs,
                modified_at=max(mtimes, default=folder.stat().st_mtime),
            )
        )
    return sorted(out, key=lambda r: r.modified_at)


def probe(target: str) -> ServerProbe:
    import grpc

    from embed_server.client import EmbeddingClient

    try:
        with EmbeddingClient(target, timeout_s=PROBE_TIMEOUT_S) as client:
            return ServerProbe(target, client.health())
    except grpc.RpcError as e:
        return ServerProbe(target, None, f"{e.code().name}: {e.details()}")


def _status(args: argparse.Namespace) -> int:
    status = gather(runs(), probe(args.target), args.model)
    if args.json:
        print(json.dumps(status.to_dict(), default=str))
    else:
        print("\n".join(status.lines()))
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser(
        "status", help="the pipeline's state: each stage, what is there, and what to run next"
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help="registry model (default %(default)s)")
    p.add_argument("--target", default=DEFAULT_TARGET, help="server to ask for its health")
    p.add_argument("--json", action="store_true", help="one JSON object, for scripts")
    p.set_defaults(func=_status)
