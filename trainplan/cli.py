"""The ``trainplan`` command: a thin layer over :mod:`trainplan.api`.

User mistakes (``TrainplanError``) print one clear message and exit 2; nothing else is caught
here, so a bug in trainplan still shows its traceback.
"""

from __future__ import annotations

import argparse
import os
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
        spec = api.resolve(spec)
    except SpecError as exc:
        raise exc.with_source(args.spec) from None
    print(inspect_json(spec, graph) if args.format == "json" else inspect_text(spec, graph))
    return 0



def _with_cluster(spec_path: str, nodes: int | None, cluster: str | None):  # noqa: ANN202
    """The spec with --cluster (preset name or cluster YAML file) and --nodes applied."""
    from trainplan import api
    from trainplan.ir.loading import read_yaml

    spec = api.load_spec(spec_path)
    if nodes is None and cluster is None:
        return spec
    data = spec.model_dump(mode="json", by_alias=True)
    if cluster is not None:
        looks_like_file = cluster.endswith((".yaml", ".yml", ".json")) or "/" in cluster or Path(cluster).is_file()
        data["cluster"] = read_yaml(cluster) if looks_like_file else {"preset": cluster}
        if not isinstance(data["cluster"], dict):
            raise SpecError([("", "expected a cluster description (a mapping), e.g. one written by `trainplan calibrate`")], cluster)
    if nodes is not None:
        data["cluster"]["nodes"] = nodes
    try:
        return api.spec_from_dict(data)
    except SpecError as exc:
        raise exc.with_source(f"{spec_path} (with --cluster/--nodes)") from None


def _progress(candidates: int, evaluated: int) -> None:
    print(f"\rsearching: {candidates} layouts enumerated, {evaluated} costed", end="", file=sys.stderr, flush=True)


def _plan(args: argparse.Namespace) -> int:
    from trainplan import api
    from trainplan.planner import report

    if api.is_plan_file(args.spec):
        plan, elapsed = api.load_plan(args.spec), None
    else:
        spec = _with_cluster(args.spec, args.nodes, args.cluster)
        try:
            plan, elapsed = api.plan(spec, base_dir=Path(args.spec).resolve().parent, keep=args.top,
                                     progress=_progress if sys.stderr.isatty() else None)
        except SpecError as exc:
            raise exc.with_source(args.spec) from None
        finally:
            if sys.stderr.isatty():
                print("\r\033[K", end="", file=sys.stderr)
    files = report.write_reports(plan, Path(args.out or Path("out") / plan.spec.name), elapsed)
    rendered = {"text": report.summary_text, "json": lambda p: report.report_json(p, elapsed),
                "md": report.report_markdown, "html": report.report_html}[args.format](plan)
    print(rendered.rstrip("\n"))
    if args.format == "text":
        print("\nwrote " + ", ".join(str(f) for f in files))
    return 0


def _local_spec(spec_path: str, nproc: int):  # noqa: ANN202
    """The spec re-targeted at this machine: ``nproc`` CPU processes on gloo (the cpu-local preset)."""
    from trainplan import api

    spec = api.load_spec(spec_path)
    data = spec.model_dump(mode="json", by_alias=True)
    data["cluster"] = {"preset": "cpu-local", "devices_per_node": nproc}
    return api.spec_from_dict(data)


def _run(args: argparse.Namespace) -> int:
    from trainplan import api
    from trainplan.runtime.launch import launch, run_reference

    out = Path(args.out) if args.out else None
    if api.is_plan_file(args.spec):
        plan = api.load_plan(args.spec)
        nproc = args.nproc or plan.mesh.world_size
    else:
        nproc = args.nproc or 4
        spec = _local_spec(args.spec, nproc)
        if nproc == 1:
            out = out or Path("out") / spec.name / "reference"
            run_reference(api.resolve(spec), out, args.steps)
            print(f"wrote {out / 'metrics.jsonl'}, {out / 'summary.json'}")
            return 0
        try:
            plan, _ = api.plan(spec, base_dir=Path(args.spec).resolve().parent)
        except SpecError as exc:
            raise exc.with_source(args.spec) from None
        print(f"plan: {_layout(plan)} (estimated {plan.estimate.step_time_s * 1e3:.1f} ms per step)")
    out = out or Path("out") / plan.spec.name / "run"
    code = launch(plan, nproc=nproc, out_dir=out, steps=args.steps)
    if code == 0:
        print(f"wrote {out / 'metrics.jsonl'}, {out / 'summary.json'}")
    return code


def _layout(plan) -> str:  # noqa: ANN001
    from trainplan.planner.report import layout_line

    return layout_line(plan)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


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

    p = sub.add_parser("plan", help="search the fastest parallel plan that fits and write it with its reports")
    p.add_argument("spec", help="a spec YAML file, or a plan.yaml to re-report without searching")
    p.add_argument("-o", "--out", help="output folder (default: out/<spec name>)")
    p.add_argument("--format", choices=("text", "json", "md", "html"), default="text", help="what to print")
    p.add_argument("--nodes", type=_positive, help="override cluster.nodes")
    p.add_argument("--cluster", help="a cluster preset name or a cluster YAML file (e.g. from `trainplan calibrate`)")
    p.add_argument("--top", type=_positive, default=10, help="alternatives to keep in the report (default 10)")
    p.set_defaults(func=_plan)

    p = sub.add_parser("run", help="train a spec (planned for this machine) or a saved plan with torch.distributed")
    p.add_argument("spec", help="a spec YAML file (planned for --nproc local processes) or a plan.yaml")
    p.add_argument("--nproc", type=_positive, help="local processes (default: 4 for a spec, the plan's world size for a plan); "
                   "1 runs the plain single-process reference")
    p.add_argument("--out", help="output folder (default: out/<name>/run)")
    p.add_argument("--steps", type=_positive, help="override training.steps")
    p.set_defaults(func=_run)

    # `launch` and `calibrate` own their flags (trainplan.runtime.launchers / .calibrate); main() hands them the raw arguments.
    sub.add_parser("launch", help="run a plan on this host, or submit it to Slurm or Kubernetes (see --help)", add_help=False)
    # `calibrate` owns its flags (trainplan.runtime.calibrate); main() hands it the raw arguments.
    sub.add_parser("calibrate", help="measure this machine and write a cluster description (see --help)", add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["calibrate"]:
            from trainplan.runtime.calibrate import calibrate_main

            return calibrate_main(argv[1:])
        if argv[:1] == ["launch"]:
            from trainplan.runtime.launchers import launch_main

            return launch_main(argv[1:])
        args = build_parser().parse_args(argv)
        return int(args.func(args))
    except TrainplanError as exc:
        print(f"trainplan: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("trainplan: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and closed early: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
