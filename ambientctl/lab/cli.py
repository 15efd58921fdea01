"""``ambientctl lab up|down|status|exec``: its flags and handlers, used by ``ambientctl.cli``."""

from __future__ import annotations

import argparse
import os
from functools import partial
from pathlib import Path
from typing import Any, TextIO

import trio

from ambient_common.flags import duration_seconds
from ambient_common.logging import LOG_FORMATS, configure_logging
from ambient_common.process import cancel_on_signal
from ambientctl.embedded.errors import EmbeddedError
from ambientctl.embedded.mesh import DEFAULT_READY_TIMEOUT
from ambientctl.embedded.supervisor import DEFAULT_DRAIN_TIMEOUT
from ambientctl.lab.errors import LabError
from ambientctl.lab.execute import lab_exec
from ambientctl.lab.mesh import Lab, run_lab
from ambientctl.lab.network import take_down
from ambientctl.lab.plan import DEFAULT_LAB_NAME, DEFAULT_SUBNET
from ambientctl.lab.state import LabPaths
from ambientctl.lab.status import lab_status, render_status

DEFAULT_LAB_STATE_DIR = Path("run/lab")


def add_lab_parser(sub: Any) -> None:
    lab = sub.add_parser(
        "lab",
        help="a small cluster of network namespaces running the mesh (root only)",
        description="Build a cluster from Kubernetes YAML: a network namespace per node and "
        "per pod, nodes joined by a bridge, istiod_lite, one ztunnel per node (in-pod capture) "
        "and the sample apps inside. Needs root.",
    )
    lab_sub = lab.add_subparsers(dest="lab_command", metavar="ACTION", required=True)

    def state_dir(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--state-dir",
            type=Path,
            default=DEFAULT_LAB_STATE_DIR,
            metavar="DIR",
            help=f"lab record, rewritten YAML, certs, logs (default ./{DEFAULT_LAB_STATE_DIR})",
        )

    up = lab_sub.add_parser("up", help="build the lab and run the mesh in it (Ctrl-C removes it)")
    up.add_argument(
        "-f",
        "--file",
        dest="config_dir",
        type=Path,
        required=True,
        metavar="DIR",
        help="directory of Kubernetes YAML (Nodes, Pods with spec.nodeName, ...)",
    )
    up.add_argument(
        "--name",
        default=DEFAULT_LAB_NAME,
        help=f"prefix of the lab's namespaces (default {DEFAULT_LAB_NAME})",
    )
    up.add_argument(
        "--subnet",
        default=DEFAULT_SUBNET,
        help=f"addresses used inside the lab (default {DEFAULT_SUBNET})",
    )
    up.add_argument(
        "--no-mesh",
        action="store_true",
        help="only build the network and return (no istiod, ztunnel or apps)",
    )
    up.add_argument("--ready-timeout", type=duration_seconds, default=DEFAULT_READY_TIMEOUT,
                    metavar="DURATION")  # fmt: skip
    up.add_argument("--drain-timeout", type=duration_seconds, default=DEFAULT_DRAIN_TIMEOUT,
                    metavar="DURATION")  # fmt: skip
    up.add_argument("--log-format", choices=LOG_FORMATS, default="auto")
    state_dir(up)

    down = lab_sub.add_parser("down", help="stop the lab's processes, remove everything it made")
    down.add_argument("--timeout", type=duration_seconds, default=DEFAULT_DRAIN_TIMEOUT,
                      metavar="DURATION",
                      help="how long processes may take to stop before SIGKILL")  # fmt: skip
    state_dir(down)

    status = lab_sub.add_parser("status", help="namespaces, links, processes, pods")
    status.add_argument("-o", "--output", default="table",
                        choices=["table", "wide", "json", "yaml"])  # fmt: skip
    state_dir(status)

    exec_ = lab_sub.add_parser(
        "exec",
        help="run a command inside a pod's namespace",
        description="Run CMD in the network namespace of POD ([namespace/]name), of a node "
        "(node:NAME), of the control plane (:control) or of the bridge (:wire).",
    )
    exec_.add_argument("target", metavar="POD")
    exec_.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD")
    state_dir(exec_)


def run_lab_command(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """``ambientctl lab ...``: 0 on success, 1 with a message on failure."""
    action = args.lab_command
    if os.geteuid() != 0:
        err.write(f"ambientctl lab {action}: needs root (it creates network namespaces); "
                  "run it with sudo\n")  # fmt: skip
        return 1
    paths = LabPaths(args.state_dir)
    try:
        if action == "up":
            return _cmd_up(args, paths, out, err)
        if action == "down":
            report = take_down(paths, timeout=args.timeout)
            if report.name is None:
                out.write(f"no lab recorded in {paths.root}; nothing to do\n")
            elif report.by_owner:
                out.write(f"lab {report.name} removed by its `lab up`\n")
            else:
                out.write(f"lab {report.name} removed ({report.undone} undo steps, "
                          f"{len(report.stopped_pids)} processes stopped)\n")  # fmt: skip
            return 0
        if action == "status":
            out.write(render_status(lab_status(paths), args.output))
            return 0
        command = list(args.cmd)
        if command[:1] == ["--"]:
            command = command[1:]
        return lab_exec(paths, args.target, command)
    except LabError as exc:
        err.write(f"ambientctl lab {action}: {exc}\n")
        return 1


def _cmd_up(args: argparse.Namespace, paths: LabPaths, out: TextIO, err: TextIO) -> int:

    configure_logging(args.log_format)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(cancel_on_signal, nursery.cancel_scope, "removing the lab")
            lab: Lab = await nursery.start(
                partial(
                    run_lab,
                    args.config_dir,
                    paths.root,
                    name=args.name,
                    subnet=args.subnet,
                    mesh=not args.no_mesh,
                    ready_timeout=args.ready_timeout,
                    drain_timeout=args.drain_timeout,
                    record_owner=True,
                )
            )
            plan = lab.plan
            out.write(
                f"lab {plan.name} up: istiod_lite {lab.istiod_address}; nodes "
                + ", ".join(f"{n.name}={n.address}" for n in plan.nodes)
                + "; pods "
                + ", ".join(f"{p.key}={p.address}" for p in plan.pods)
                + "\n"
            )
            if args.no_mesh:
                out.write(f"network only; `ambientctl lab down --state-dir {paths.root}` "
                          "removes it\n")  # fmt: skip
                nursery.cancel_scope.cancel()
            else:
                out.write(f"logs in {paths.mesh.logs_dir}. Ctrl-C removes the lab.\n")
            out.flush()

    exit_code = 0
    try:
        trio.run(main)
    except* (LabError, EmbeddedError) as group:
        for exc in group.exceptions:
            err.write(f"ambientctl lab up: {exc}\n")
        exit_code = 1
    return exit_code
