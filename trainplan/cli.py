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

from trainplan.errors import PlanningError, SpecError, TrainplanError

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


def _local_spec(spec_path: str, nproc: int, cluster: str | None = None):  # noqa: ANN202
    """The spec re-targeted at this machine: ``nproc`` processes on one node.

    The device is the cpu-local preset's, or ``cluster``'s (a preset name or a cluster file, e.g.
    the one `trainplan calibrate` wrote) with its node count and devices per node replaced.
    """
    spec = _with_cluster(spec_path, None, cluster or "cpu-local")
    data = spec.model_dump(mode="json", by_alias=True)
    data["cluster"].update(nodes=1, devices_per_node=nproc)
    from trainplan import api

    try:
        return api.spec_from_dict(data)
    except SpecError as exc:
        raise exc.with_source(f"{spec_path} (on this machine, {nproc} processes)") from None


def _run(args: argparse.Namespace) -> int:
    from trainplan import api
    from trainplan.runtime.launch import launch, run_reference

    out = Path(args.out) if args.out else None
    if api.is_plan_file(args.spec):
        if args.cluster is not None:
            raise SpecError([("cluster", "--cluster applies to a spec; a saved plan keeps the cluster it was planned "
                              "for (re-plan its spec with --cluster instead)")], args.spec)
        plan = api.load_plan(args.spec)
        nproc = args.nproc or plan.world_size  # the mesh's workers and any dedicated parameter servers
    else:
        nproc = args.nproc or 4
        spec = _local_spec(args.spec, nproc, args.cluster)
        if nproc == 1:
            if _checkpoint_options(args, Path(".")) or args.max_restarts:
                raise SpecError([("", "--resume, --checkpoint-* and --max-restarts need a parallel run (--nproc 2 or "
                                  "more); --nproc 1 is the plain reference run")], args.spec)
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
    code = launch(plan, nproc=nproc, out_dir=out, steps=args.steps, checkpoint=_checkpoint_options(args, out),
                  max_restarts=args.max_restarts, straggler=args.straggler)
    if code == 0:
        print(f"wrote {out / 'metrics.jsonl'}, {out / 'summary.json'}")
    return code


def _checkpoint_options(args: argparse.Namespace, out: Path):  # noqa: ANN202
    """The run's checkpointing from its flags (None without any): the folder is --resume DIR, else OUT/ckpt."""
    from trainplan.runtime.checkpoint import CheckpointOptions

    from trainplan.runtime.checkpoint import CheckpointError

    if args.resume is None and not args.checkpoint_every and not args.checkpoint_minutes:
        if args.checkpoint_async:
            raise CheckpointError("--checkpoint-async needs --checkpoint-every N or --checkpoint-minutes M")
        return None
    directory = Path(args.resume) if args.resume else out / "ckpt"
    return CheckpointOptions(directory, every_steps=args.checkpoint_every, every_minutes=args.checkpoint_minutes,
                             keep=args.keep_checkpoints, resume=args.resume is not None,
                             asynchronous=args.checkpoint_async)


MESH_FIELDS = ("dp", "tp", "pp", "micro_batch", "virtual_stages")
"""Parallel fields tied to the device count, searched again when a re-plan cannot keep them."""


def _replan(args: argparse.Namespace) -> int:
    """Plan an existing plan's spec again for another number of devices (e.g. to resume on fewer)."""
    from trainplan import api
    from trainplan.planner import report

    if not api.is_plan_file(args.plan):
        raise SpecError([("", "expected a plan.yaml written by `trainplan plan` or `trainplan run` (with spec_hash)")],
                        args.plan)
    old = api.load_plan(args.plan)
    data = old.spec.model_dump(mode="json", by_alias=True)
    if args.nproc is not None:
        data["cluster"].update(nodes=1, devices_per_node=args.nproc)
    else:
        data["cluster"]["nodes"] = args.nodes
    base_dir = Path(args.plan).resolve().parent
    try:
        spec = api.spec_from_dict(data)
        try:
            plan, elapsed = api.plan(spec, base_dir=base_dir)
        except PlanningError:
            # The spec fixed mesh degrees for the old device count: search them, keep its other choices.
            fixed = {k: v for k, v in data["parallel"].items() if k in MESH_FIELDS and v != "auto"}
            if not fixed:
                raise
            data["parallel"].update({k: "auto" for k in fixed})
            spec = api.spec_from_dict(data)
            plan, elapsed = api.plan(spec, base_dir=base_dir)
            print(f"note: the spec fixed {', '.join(f'{k}={v}' for k, v in fixed.items())}, which does not fit "
                  f"{plan.mesh.world_size} devices; re-planned with them searched")
    except SpecError as exc:
        raise exc.with_source(f"{args.plan} (re-planned for --nodes {args.nodes} --nproc {args.nproc})") from None
    out = Path(args.out or Path("out") / spec.name / f"replan-{plan.mesh.world_size}")
    files = report.write_reports(plan, out, elapsed)
    print(f"re-planned {spec.name} for {plan.mesh.world_size} devices (was {old.mesh.world_size}: {_layout(old)})")
    print(f"layout: {_layout(plan)} (estimated {plan.estimate.step_time_s * 1e3:.1f} ms per step)")
    print("wrote " + ", ".join(str(f) for f in files))
    return 0


def _verify(args: argparse.Namespace) -> int:
    """The parity gate (:mod:`trainplan.verify`): 0 on agreement, 1 on a disagreement."""
    from trainplan import api
    from trainplan.verify import verify

    if not api.is_plan_file(args.plan):
        raise SpecError([("", "expected a plan.yaml written by `trainplan plan` (with spec_hash)")], args.plan)
    plan = api.load_plan(args.plan)
    verdict = verify(plan, Path(args.out or Path("out") / plan.spec.name / "verify"), steps=args.steps)
    print(verdict.text())
    return 0 if verdict.passed else 1


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


def _straggler(text: str) -> tuple[int, float]:
    from trainplan.runtime.data_parallel import parse_straggler

    try:
        return parse_straggler(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
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
    p.add_argument("--cluster", help="plan a spec with this device description (a preset name or a cluster YAML file, "
                   "e.g. from `trainplan calibrate`) instead of cpu-local; nodes and devices per node become 1 x --nproc")
    p.add_argument("--checkpoint-every", type=_positive, metavar="N", help="save a sharded checkpoint every N steps")
    p.add_argument("--checkpoint-minutes", type=_positive_float, metavar="M", help="also save when M minutes have passed")
    p.add_argument("--keep-checkpoints", type=_positive, default=3, metavar="K",
                   help="complete checkpoints to keep (default 3)")
    p.add_argument("--checkpoint-async", action="store_true",
                   help="write checkpoints in the background while training continues (committed once every "
                   "rank's shards are written)")
    p.add_argument("--resume", nargs="?", const="", metavar="DIR",
                   help="continue from the newest complete checkpoint of DIR (default: OUT/ckpt), also under another "
                   "plan of the same spec; new checkpoints go to DIR too")
    p.add_argument("--max-restarts", type=_non_negative, default=0, metavar="N",
                   help="restart all workers up to N times after a failure; they resume from the newest checkpoint")
    p.add_argument("--straggler", type=_straggler, metavar="RANK:SECONDS",
                   help="delay worker RANK by SECONDS every step (to measure sync, async and local SGD against a straggler)")
    p.set_defaults(func=_run)

    p = sub.add_parser("replan", help="plan a plan's spec again for another number of nodes or local processes")
    p.add_argument("plan", help="a plan.yaml")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--nodes", type=_positive, help="nodes of the plan's cluster")
    which.add_argument("--nproc", type=_positive, help="local processes (one node of the plan's device)")
    p.add_argument("-o", "--out", help="output folder (default: out/<name>/replan-<devices>)")
    p.set_defaults(func=_replan)

    p = sub.add_parser("verify", help="run a plan's layout scaled down to this machine against one process; "
                                      "exit 1 when they disagree")
    p.add_argument("plan", help="a plan.yaml written by `trainplan plan`")
    p.add_argument("--steps", type=_positive, default=3, help="training steps to compare (default 3)")
    p.add_argument("-o", "--out", help="output folder (default out/NAME/verify)")
    p.set_defaults(func=_verify)

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
