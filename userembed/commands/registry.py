"""`userembed registry list|inspect|alias`: look at and move the model registry (no torch)."""

from __future__ import annotations

import argparse
import logging

from userembed import prerequisites
from userembed.registry import LATEST, Registry

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("registry", help="list, inspect and alias registered models")
    p.add_argument("--root", default=None, help="registry root (default: $USEREMBED_REGISTRY_ROOT)")
    sub = p.add_subparsers(dest="registry_command", metavar="ACTION", required=True)

    ls = sub.add_parser("list", help="models, or the versions of one model with their aliases")
    ls.add_argument("model", nargs="?", help="model name: list its versions")
    ls.set_defaults(func=_list)

    ins = sub.add_parser("inspect", help="print a manifest (and verify the files with --verify)")
    ins.add_argument("model")
    ins.add_argument("ref", nargs="?", default=LATEST, help="version id or alias (default latest)")
    ins.add_argument("--verify", action="store_true", help="check sha256 of every file")
    ins.add_argument("--variant", default="fp32", help="ONNX variant to verify (default fp32)")
    ins.set_defaults(func=_inspect)

    al = sub.add_parser("alias", help="point an alias (e.g. prod) at a version or another alias")
    al.add_argument("model")
    al.add_argument("alias")
    al.add_argument("ref", help="version id or alias")
    al.set_defaults(func=_alias)


def list_lines(reg: Registry, model: str | None = None) -> list[str]:
    """Human lines for `registry list`: one per model, or one per version of `model`."""
    if model is None:
        lines = []
        for m in reg.list_models():
            aliases = ", ".join(f"{a}={v}" for a, v in sorted(reg.aliases(m).items()))
            lines.append(f"{m}\t{len(reg.list_versions(m))} versions\t{aliases}")
        return lines
    by_version: dict[str, list[str]] = {}
    for a, v in reg.aliases(model).items():
        by_version.setdefault(v, []).append(a)
    out = []
    for v in reg.list_versions(model):
        tags = ",".join(sorted(by_version.get(v, [])))
        out.append(f"{v}\t{tags}" if tags else v)
    return out


def _list(args: argparse.Namespace) -> int:
    reg = Registry(args.root)
    if args.model is not None:
        prerequisites.require_model(args.model, args.root)
    lines = list_lines(reg, args.model)
    if not lines:
        export = prerequisites.EXPORT.format(run="RUN_DIR")
        print(f"no models in {reg.root}: '{export}' publishes one")
    for line in lines:
        print(line)
    return 0


def _inspect(args: argparse.Namespace) -> int:
    prerequisites.require_model(args.model, args.root)
    reg = Registry(args.root)
    if args.verify:
        loaded = reg.load_verified(args.model, args.ref, variant=args.variant)
        loaded.release()
        manifest = loaded.manifest
    else:
        manifest = reg.read_manifest(args.model, args.ref)
    print(manifest.to_json(), end="")
    if args.verify:
        n = len(manifest.variant(args.variant).files()) + len(manifest.attachments)
        print(f"verified: {manifest.ref} {args.variant}: {n} files match their sha256")
    return 0


def _alias(args: argparse.Namespace) -> int:
    prerequisites.require_model(args.model, args.root)
    reg = Registry(args.root)
    version = reg.set_alias(args.model, args.alias, args.ref)
    print(f"{args.model}/{args.alias} -> {version}")
    return 0
