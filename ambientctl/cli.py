"""The ``ambientctl`` / ``kubectl-ambient`` command line.

``main(argv)`` parses flags into plain values and hands them to the module doing the work;
it returns the process exit code (2 for usage errors, as argparse, 1 for failures the message
explains). Nothing here or below reads the environment: flag defaults are the only defaults
(the ``kubernetes`` library itself reads ``$KUBECONFIG``, as kubectl does).

One program, two names: run as ``kubectl ambient`` (the ``kubectl-ambient`` plugin) the
commands that work on both default to the cluster; run as ``ambientctl``, to the embedded mesh
(see ``ambientctl.kube.cli`` for the rule).
"""

from __future__ import annotations

import argparse
import importlib
import platform
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import TextIO

import structlog
import trio

from ambient_common.flags import duration_seconds, port_number
from ambient_common.logging import LOG_FORMATS, LogFormat, configure_logging
from ambient_common.process import cancel_on_signal
from ambientctl import package_version
from ambientctl.embedded.errors import EmbeddedError
from ambientctl.embedded.mesh import DEFAULT_READY_TIMEOUT, run_embedded
from ambientctl.embedded.supervisor import DEFAULT_DRAIN_TIMEOUT
from ambientctl.kube.api import KubeError
from ambientctl.kube.cli import (
    CLUSTER,
    MODE_HELP,
    ClusterUsageError,
    ExplicitStore,
    add_cluster_parsers,
    add_output_arg,
    add_waypoint_parser,
    add_ztunnel_cluster_flags,
    is_cluster_program,
    kube_flags_parser,
    run_cluster_command,
    run_cluster_ztunnel_config,
    run_waypoint,
    ztunnel_config_mode,
)
from ambientctl.lab.cli import add_lab_parser, run_lab_command
from ambientctl.waypointcmd import DEFAULT_STATE_DIR, WaypointCommandError, WaypointUsageError
from ambientctl.ztunnelconfig import (
    DEFAULT_ADMIN_PORT,
    VIEWS,
    ZtunnelConfigError,
    fetch_config_dump,
    render_view,
    resolve_node_address,
)

log = structlog.get_logger()

DEFAULT_DEMO_DIR = Path("examples/demo")

# istioctl spells the kinds in the singular; accept both.
ZTUNNEL_CONFIG_KINDS = {**{k: k for k in VIEWS}, **{k.rstrip("s"): k for k in VIEWS}}


def build_parser(prog: str = "ambientctl") -> argparse.ArgumentParser:
    kube_parent = kube_flags_parser()
    parser = argparse.ArgumentParser(
        prog=prog,
        parents=[kube_parent],
        description="Run and inspect ambient-lite, a sidecar-less service mesh, embedded on "
        "this machine or on a Kubernetes cluster (as the kubectl plugin `kubectl ambient`). "
        + MODE_HELP,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    up = sub.add_parser(
        "up",
        help="run the embedded mesh in the foreground (Ctrl-C drains and exits)",
        description="Start istiod_lite, one ztunnel per Node and the sample apps of the Pods "
        "found in DIR, and supervise them until interrupted.",
    )
    up.add_argument(
        "-f",
        "--file",
        dest="config_dir",
        type=Path,
        required=True,
        metavar="DIR",
        help="directory of Kubernetes YAML (Nodes, Namespaces, Pods, Services, ...)",
    )
    _add_state_dir(up)
    up.add_argument("--log-format", choices=LOG_FORMATS, default="auto")
    up.add_argument(
        "--drain-timeout",
        type=duration_seconds,
        default=DEFAULT_DRAIN_TIMEOUT,
        metavar="DURATION",
        help="how long children may take to stop before SIGKILL "
        f"(default {DEFAULT_DRAIN_TIMEOUT:g}s)",
    )
    up.add_argument(
        "--ready-timeout",
        type=duration_seconds,
        default=DEFAULT_READY_TIMEOUT,
        metavar="DURATION",
        help=f"how long to wait for istiod and every ztunnel (default {DEFAULT_READY_TIMEOUT:g}s)",
    )

    demo = sub.add_parser("demo", help="run the guided demo on an embedded mesh")
    demo.add_argument(
        "-f",
        "--file",
        dest="config_dir",
        type=Path,
        default=DEFAULT_DEMO_DIR,
        metavar="DIR",
        help=f"demo manifests (default {DEFAULT_DEMO_DIR})",
    )
    _add_state_dir(demo)

    zc = sub.add_parser(
        "ztunnel-config",
        parents=[kube_parent],
        help="show a ztunnel's view of the mesh (as istioctl ztunnel-config)",
        description="Fetch a ztunnel's /config_dump and show one kind of its contents; on a "
        "cluster through the API server's pod proxy to the ztunnel pod's admin port. " + MODE_HELP,
    )
    zc.add_argument(
        "kind",
        choices=sorted(ZTUNNEL_CONFIG_KINDS),
        metavar="KIND",
        help="workloads | services | policies | certificates",
    )
    target = zc.add_mutually_exclusive_group()
    target.add_argument("--node", help="node whose ztunnel to ask")
    target.add_argument(
        "--address",
        action=ExplicitStore,
        help="embedded: ztunnel admin address, e.g. 127.0.10.1",
    )
    add_ztunnel_cluster_flags(zc, target)
    zc.add_argument("--admin-port", type=port_number, default=DEFAULT_ADMIN_PORT)
    zc.add_argument("-n", "--namespace", help="only entries of this namespace")
    add_output_arg(zc)
    _add_state_dir(zc)

    add_waypoint_parser(sub, kube_parent)
    add_cluster_parsers(sub, kube_parent)
    add_lab_parser(sub)

    sub.add_parser("version", help="print the version")
    return parser


def _add_state_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--state-dir",
        type=Path,
        action=ExplicitStore,  # typing it selects the embedded mesh (ztunnel-config)
        default=DEFAULT_STATE_DIR,
        metavar="DIR",
        help=f"embedded mesh state: certs, tokens, logs, mesh.json (default ./{DEFAULT_STATE_DIR})",
    )


# ---------------------------------------------------------------------------------------------
# Commands


def cmd_version(_args: argparse.Namespace, out: TextIO) -> int:
    out.write(
        f"ambientctl {package_version()} "
        f"(python {platform.python_version()}, trio {trio.__version__})\n"
    )
    return 0


def cmd_ztunnel_config(args: argparse.Namespace, out: TextIO) -> int:
    kind = ZTUNNEL_CONFIG_KINDS[args.kind]
    if ztunnel_config_mode(args, cluster_default=args.cluster_default) == CLUSTER:
        return run_cluster_ztunnel_config(args, kind, out)
    address = args.address or resolve_node_address(args.state_dir, args.node)
    dump = fetch_config_dump(address, args.admin_port)
    out.write(render_view(dump, kind, args.output, namespace=args.namespace))
    return 0


def cmd_up(args: argparse.Namespace, out: TextIO) -> int:
    fmt: LogFormat = args.log_format
    configure_logging(fmt)

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            # Watch from the start: a Ctrl-C during startup also drains what has started.
            nursery.start_soon(cancel_on_signal, nursery.cancel_scope, "draining the mesh")
            mesh = await nursery.start(
                partial(
                    run_embedded,
                    args.config_dir,
                    args.state_dir,
                    drain_timeout=args.drain_timeout,
                    ready_timeout=args.ready_timeout,
                )
            )
            out.write(
                f"mesh ready: istiod {mesh.istiod_address}, nodes "
                + ", ".join(f"{n}={a}" for n, a in mesh.nodes.items())
                + "".join(f", waypoint {w}={a}" for w, a in mesh.waypoints.items())
                + f"; logs in {mesh.paths.logs_dir}. Ctrl-C to stop.\n"
            )
            out.flush()

    try:
        trio.run(run)
    except* EmbeddedError as group:
        for exc in group.exceptions:
            sys.stderr.write(f"ambientctl up: {exc}\n")
        exit_code = 1
    else:
        exit_code = 0
    return exit_code


def cmd_demo(args: argparse.Namespace, out: TextIO) -> int:
    """The demo lives in ``ambientctl.demo`` and is imported only when asked for."""
    try:
        demo = importlib.import_module("ambientctl.demo")
    except ModuleNotFoundError as exc:
        if exc.name != "ambientctl.demo":
            raise
        sys.stderr.write("ambientctl demo: this build has no demo (ambientctl/demo.py)\n")
        return 1
    result: int = demo.run_demo(config_dir=args.config_dir, state_dir=args.state_dir)
    return result


def cmd_waypoint(args: argparse.Namespace, out: TextIO) -> int:
    return run_waypoint(args, out, sys.stderr, cluster_default=args.cluster_default)


def cmd_cluster(args: argparse.Namespace, out: TextIO) -> int:
    return run_cluster_command(args, out, sys.stderr)


def cmd_lab(args: argparse.Namespace, out: TextIO) -> int:
    return run_lab_command(args, out, sys.stderr)


COMMANDS = {
    "up": cmd_up,
    "demo": cmd_demo,
    "ztunnel-config": cmd_ztunnel_config,
    "waypoint": cmd_waypoint,
    "version": cmd_version,
    "lab": cmd_lab,
    "enroll": cmd_cluster,
    "unenroll": cmd_cluster,
    "status": cmd_cluster,
    "check": cmd_cluster,
    "install": cmd_cluster,
    "uninstall": cmd_cluster,
}


def main(argv: Sequence[str] | None = None, *, prog: str | None = None) -> int:
    """``prog``: the name this was run as (default ``sys.argv[0]``); ``kubectl-ambient``
    makes the cluster the default."""
    cluster_default = is_cluster_program(prog if prog is not None else sys.argv[0])
    display = "kubectl ambient" if cluster_default else "ambientctl"
    parser = build_parser(display)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # usage error (2) or --help (0): argparse already printed why
        return exc.code if isinstance(exc.code, int) else 2
    args.cluster_default = cluster_default
    try:
        return COMMANDS[args.command](args, sys.stdout)
    except (ZtunnelConfigError, WaypointCommandError, KubeError) as exc:
        command = args.command
        if command == "waypoint":
            command += f" {args.waypoint_command}"
        sys.stderr.write(f"{display} {command}: {exc}\n")
        return 2 if isinstance(exc, WaypointUsageError | ClusterUsageError) else 1
    except KeyboardInterrupt:
        return 130
