"""The ``trainplan`` command: a thin layer over :mod:`trainplan.api`.

User mistakes (``TrainplanError``) print one clear message and exit 2; nothing else is caught
here, so a bug in trainplan still shows its traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from trainplan.errors import SpecError, TrainplanError

EXIT_USER_ERROR = 2


def _inspect(args: argparse.Namespace) -> int:
    from trainplan import api
    from trainplan.planner.report_inspect import inspect_json, inspect_text

    spec = api.load_spec(args.spec)
    try:
        graph = api.trace(spec, base_dir=Path(args.spec).resolve().parent)
    except SpecError as exc:
        raise exc.with_source(args.spec) from None
    print(inspect_json(spec, graph) if args.format == "json" else inspect_text(spec, graph))
    return 0



def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trainplan",
        description="A declarative training-plan compiler for PyTorch: spec in, parallel plan out.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("inspect", help="trace a spec's model and print its units, parameters and FLOPs")
    p.add_argument("spec", help="path to a spec YAML file")
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.set_defaults(func=_inspect)

    # `calibrate` owns its flags (trainplan.runtime.calibrate); main() hands it the raw arguments.
    sub.add_parser("calibrate", help="measure this machine and write a cluster description (see --help)", add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["calibrate"]:
            from trainplan.runtime.calibrate import calibrate_main

            return calibrate_main(argv[1:])
        args = build_parser().parse_args(argv)
        return int(args.func(args))
    except TrainplanError as exc:
        print(f"trainplan: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("trainplan: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
