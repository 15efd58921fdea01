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
from ambientctl.bundled import DEMO_CONFIG_DIR
from ambientctl.completion import SHELLS, chosen_parser, completion_script
from ambientctl.embedded.errors import EmbeddedError
from ambientctl.embedded.mesh import DEFAULT_READY_TIMEOUT, ISTIOD_LISTEN_HOST, run_embedded
from ambientctl.embedded.state_dir import StatePaths, demo_config_copy
from ambientctl.embedded.supervisor import DEFAULT_DRAIN_TIMEOUT
from ambientctl.embedded_health import embedded_checks, embedded_status
from ambientctl.kube.api import KubeError
from ambientctl.kube.cli import (
    CLUSTER,
    CLUSTER_ONLY,
    EMBEDDED,
    MODE_HELP,
    NEEDS_A_CLUSTER,
    ClusterUsageError,
    ExplicitStore,
    add_cluster_parsers,
    add_output_arg,
    add_waypoint_parser,
    add_ztunnel_cluster_flags,
    command_mode,
    is_cluster_program,
    kube_flags_parser,
    mode_help,
    run_cluster_command,
    run_cluster_ztunnel_config,
    run_waypoint,
    ztunnel_config_mode,
)
from ambientctl.kube.status import check_exit_code
from ambientctl.lab.cli import add_lab_parser, run_lab_command
from ambientctl.output import render
from ambientctl.waypointcmd import DEFAULT_STATE_DIR, WaypointCommandError, WaypointUsageError
from ambientctl.ztunnelconfig import (
    DEFAULT_ADMIN_PORT,
    KIND_ALIASES,
    ZtunnelConfigError,
    fetch_config_dump,
    render_view,
    resolve_node_address,
)
from waypoint.config import ip_address

log = structlog.get_logger()

# The console scripts that run this command line (pyproject.toml), for shell completion.
PROGRAMS = ("ambientctl", "kubectl-ambient")


def build_parser(prog: str = "ambientctl") -> argparse.ArgumentParser:
    kube_parent = kube_flags_parser()
    parser = argparse.ArgumentParser(
        prog=prog,
        parents=[kube_parent],
        description="Run and inspect ambient-lite, a sidecar-less service mesh, embedded on "
        "this machine or on a Kubernetes cluster (as the kubectl plugin `kubectl ambient`). "
        + MODE_HELP,
    )
    parser.add_argument("--version", action="version", version=version_text(),
                        help="print the version and exit")  # fmt: skip
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    up = sub.add_parser(
        "up",
        help="run the embedded mesh in the foreground (Ctrl-C drains and exits)",
        description="Start istiod_lite, one ztunnel per Node and the sample apps of the Pods "
        "found in DIR, and supervise them until interrupted. Edits to DIR reach the mesh "
        "while it runs.",
    )
    up.add_argument(
        "-f",
        "--file",
        dest="config_dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="directory of Kubernetes YAML (Nodes, Namespaces, Pods, Services, ...); default: "
        "a copy of the demo's, made in STATE_DIR/config on first use",
    )
    _add_state_dir(up)
    up.add_argument(
        "--istiod-host",
        type=ip_address,
        default=ISTIOD_LISTEN_HOST,
        metavar="IP",
        help=f"the address istiod_lite listens on, port 15012 (default {ISTIOD_LISTEN_HOST}); "
        "another one lets two meshes run side by side",
    )
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
        default=DEMO_CONFIG_DIR,
        metavar="DIR",
        help="demo manifests (default: the ones shipped with ambientctl)",
    )
    _add_state_dir(demo)

    zc = sub.add_parser(
        "ztunnel-config",
        aliases=["zc"],  # istioctl's
        parents=[kube_parent],
        help="show a ztunnel's view of the mesh (as istioctl ztunnel-config; alias zc)",
        description="Fetch a ztunnel's /config_dump and show one kind of its contents; on a "
        "cluster through the API server's pod proxy to the ztunnel pod's admin port. "
        + mode_help("--state-dir or --address", "--kubeconfig, --context or --pod"),
    )
    zc.add_argument(
        "kind",
        choices=list(KIND_ALIASES),
        metavar="KIND",
        help="workload | service | policy | certificate | all (istioctl's kinds; the plurals "
        "and istioctl's aliases work too)",
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
    completion = sub.add_parser(
        "completion",
        help="print a shell completion script (as istioctl completion)",
        description="Print the completion script for SHELL; load it with "
        "`source <(ambientctl completion bash)` (or zsh), or save it where your shell loads "
        "completions from.",
    )
    completion.add_argument("shell", choices=SHELLS, metavar="SHELL", help=" | ".join(SHELLS))
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


def version_text() -> str:
    return (
        f"ambientctl {package_version()} "
        f"(python {platform.python_version()}, trio {trio.__version__})"
    )


def cmd_version(_args: argparse.Namespace, out: TextIO) -> int:
    out.write(version_text() + "\n")
    return 0


def cmd_completion(args: argparse.Namespace, out: TextIO) -> int:
    out.write(completion_script(args.shell, build_parser(), PROGRAMS))
    return 0


def cmd_ztunnel_config(args: argparse.Namespace, out: TextIO) -> int:
    kind = args.kind
    if ztunnel_config_mode(args, cluster_default=args.cluster_default) == CLUSTER:
        return run_cluster_ztunnel_config(args, kind, out)
    address = args.address or resolve_node_address(args.state_dir, args.node)
    dump = fetch_config_dump(address, args.admin_port)
    out.write(render_view(dump, kind, args.output, namespace=args.namespace))
    return 0


def cmd_up(args: argparse.Namespace, out: TextIO) -> int:
    fmt: LogFormat = args.log_format
    configure_logging(fmt)
    config_dir: Path = args.config_dir
    if config_dir is None:
        try:
            config_dir = demo_config_copy(StatePaths(args.state_dir))
        except EmbeddedError as exc:
            sys.stderr.write(f"ambientctl up: {exc}\n")
            return 1
        out.write(f"config: {config_dir} (the demo's; edit it while the mesh runs)\n")

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            # Watch from the start: a Ctrl-C during startup also drains what has started.
            nursery.start_soon(cancel_on_signal, nursery.cancel_scope, "draining the mesh")
            mesh = await nursery.start(
                partial(
                    run_embedded,
                    config_dir,
                    args.state_dir,
                    drain_timeout=args.drain_timeout,
                    ready_timeout=args.ready_timeout,
                    istiod_host=args.istiod_host,
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
    """The commands of both modes (status, check) and the cluster-only ones, which say so
    when the embedded mesh is selected (``install --dry-run`` contacts no cluster at all)."""
    mode = command_mode(args, cluster_default=args.cluster_default)
    if mode == EMBEDDED and args.command == "status":
        out.write(embedded_status(args.state_dir).render(args.output))
        return 0
    if mode == EMBEDDED and args.command == "check":
        results = embedded_checks(args.state_dir)
        out.write(render([r.row() for r in results], ("check", "status", "reason"),
                         args.output))  # fmt: skip
        return check_exit_code(results)
    dry_run = args.command == "install" and args.dry_run
    if mode == EMBEDDED and args.command in CLUSTER_ONLY and not dry_run:
        raise ClusterUsageError(NEEDS_A_CLUSTER)
    return run_cluster_command(args, out, sys.stderr)


def cmd_lab(args: argparse.Namespace, out: TextIO) -> int:
    return run_lab_command(args, out, sys.stderr)


COMMANDS = {
    "up": cmd_up,
    "demo": cmd_demo,
    "ztunnel-config": cmd_ztunnel_config,
    "zc": cmd_ztunnel_config,
    "waypoint": cmd_waypoint,
    "version": cmd_version,
    "completion": cmd_completion,
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
        args, unknown = parser.parse_known_args(argv)
        if unknown:  # the subcommand's usage, not the top level's, says what it takes
            chosen_parser(parser, args).error(f"unrecognized arguments: {' '.join(unknown)}")
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
