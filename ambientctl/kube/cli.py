"""The cluster commands' flags and handlers (``kubectl ambient ...``), used by ``ambientctl.cli``.

Embedded or cluster: ``ztunnel-config``, ``waypoint``, ``status`` and ``check`` work on both.
The rule, the same for every such command and shown in their ``--help`` (``mode_help``):

- ``-f/--file/--config-dir``, ``--state-dir`` or ``--address`` select the embedded mesh;
- ``--kubeconfig``, ``--context`` (and the cluster-only ``--pod``, ``--wait``) select the cluster;
- with neither, the program's name decides: ``kubectl ambient`` (the ``kubectl-ambient``
  plugin) means the cluster of the current kubeconfig context, ``ambientctl`` the embedded
  mesh, so the embedded commands documented so far behave as before.

``enroll``, ``unenroll``, ``install`` and ``uninstall`` exist only for a cluster; with the
embedded mesh selected they say so (``NEEDS_A_CLUSTER``), except ``install --dry-run``, which
contacts no cluster. Without ``-f``, the embedded ``waypoint apply|list|delete`` work on the
config directory of the mesh ``ambientctl up`` runs (``mesh.json``).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from ambient_common.flags import duration_seconds, port_number
from ambientctl.bundled import DEFAULT_KUSTOMIZATION
from ambientctl.kube.api import (
    DEFAULT_NAMESPACE,
    Kube,
    KubeError,
    KubeOptions,
    enroll,
    unenroll,
)
from ambientctl.kube.install import (
    CRD_KIND,
    Outcome,
    dry_run,
    install,
    outcome_row,
    render_kustomization,
    uninstall,
)
from ambientctl.kube.status import check_exit_code, gather_status, run_checks
from ambientctl.kube.waypoints import (
    apply_waypoint,
    delete_waypoint,
    list_waypoints,
    programmed,
    wait_programmed,
    waypoint_rows,
    waypoint_status,
)
from ambientctl.kube.ztunnel_config import fetch_pod_config_dump, find_ztunnel
from ambientctl.output import FORMAT_ALIASES, UnknownOutputFormat, parse_output_format, render
from ambientctl.waypointcmd import (
    ADDRESS_POOL,
    DEFAULT_STATE_DIR,
    DEFAULT_WAYPOINT_NAME,
    WAYPOINT_FOR_VALUES,
    WaypointUsageError,
    run_waypoint_command,
    waypoint_name,
)
from ambientctl.ztunnelconfig import (
    DEFAULT_ADMIN_PORT,
    ZtunnelConfigError,
    load_mesh_state,
    render_view,
)
from istiod_lite.labels import USE_WAYPOINT_LABEL
from waypoint.config import dns_label, dns_subdomain, ip_address

CLUSTER_PROGRAMS = ("kubectl-ambient", "kubectl ambient")
EMBEDDED, CLUSTER = "embedded", "cluster"
DEFAULT_WAIT_TIMEOUT = 120.0


def mode_help(
    embedded: str = "-f/--file, --state-dir or --address",
    cluster: str = "--kubeconfig or --context (or a cluster-only flag)",
) -> str:
    """The embedded-or-cluster rule in a command's ``--help``, naming that command's flags."""
    return (
        f"Embedded mesh or cluster: {embedded} select the embedded mesh; {cluster} the "
        "Kubernetes cluster; with neither, `kubectl ambient` uses the cluster of the current "
        "kubeconfig context and `ambientctl` the embedded mesh."
    )


MODE_HELP = mode_help()
# The commands that mean something only on a cluster, and how to point them at one.
CLUSTER_ONLY = ("enroll", "unenroll", "install", "uninstall")
NEEDS_A_CLUSTER = (
    "this needs a cluster (--kubeconfig or --context, or run it as `kubectl ambient`)"
)


class ClusterUsageError(KubeError):
    """Contradicting flags (exit code 2, as argparse's usage errors)."""


def is_cluster_program(prog: str) -> bool:
    """Was this run as the kubectl plugin (``kubectl ambient`` execs ``kubectl-ambient``)?"""
    return Path(prog).name in CLUSTER_PROGRAMS or prog in CLUSTER_PROGRAMS


def choose_mode(
    embedded_flags: Sequence[str], cluster_flags: Sequence[str], *, cluster_default: bool
) -> str:
    """The mode the given flags select (see the module docstring)."""
    if embedded_flags and cluster_flags:
        raise ClusterUsageError(
            f"{', '.join(embedded_flags)} (embedded mesh) and {', '.join(cluster_flags)} "
            "(cluster) cannot be combined"
        )
    if embedded_flags:
        return EMBEDDED
    if cluster_flags:
        return CLUSTER
    return CLUSTER if cluster_default else EMBEDDED


class ExplicitStore(argparse.Action):
    """``store``, also noting that the flag was given: a flag with a default (``--state-dir``
    defaults to ./run) still selects a mode only when the user typed it. With ``nargs=0`` it
    stores ``const`` (see ``ExplicitStoreTrue``)."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        setattr(namespace, self.dest, self.const if self.nargs == 0 else values)
        _note_explicit(namespace, self.dest)


class ExplicitStoreTrue(ExplicitStore):
    """``store_true`` that notes the flag was given, as ``ExplicitStore``."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, const=True, default=False, **kwargs)


EXPLICIT_PREFIX = "explicit__"


def _note_explicit(namespace: argparse.Namespace, dest: str) -> None:
    # One attribute per flag, not a shared set: argparse copies a subcommand's namespace onto
    # the top-level one attribute by attribute, which would replace a set wholesale.
    setattr(namespace, EXPLICIT_PREFIX + dest, True)


def given(args: argparse.Namespace, flags: dict[str, str]) -> list[str]:
    """The flags (dest -> spelling) the user typed; every mode-selecting flag is declared
    with ``ExplicitStore`` / ``ExplicitStoreTrue``."""
    return [spelling for dest, spelling in flags.items()
            if getattr(args, EXPLICIT_PREFIX + dest, False)]  # fmt: skip


KUBE_FLAGS = {"kubeconfig": "--kubeconfig", "context": "--context"}


# ---------------------------------------------------------------------------------------------
# Flags


def output_format(text: str) -> str:
    try:
        return parse_output_format(text).value
    except UnknownOutputFormat as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def kube_flags_parser() -> argparse.ArgumentParser:
    """``--kubeconfig`` / ``--context``, for the top level and every cluster command.

    SUPPRESS defaults: a subcommand that does not see the flag does not overwrite the value
    given before it (``kubectl ambient --context prod status``)."""
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("cluster connection (as kubectl)")
    group.add_argument(
        "--kubeconfig",
        type=Path,
        action=ExplicitStore,
        default=argparse.SUPPRESS,
        metavar="PATH",
        help="kubeconfig file (default: $KUBECONFIG or ~/.kube/config, as kubectl)",
    )
    group.add_argument(
        "--context",
        action=ExplicitStore,
        default=argparse.SUPPRESS,
        metavar="NAME",
        help="kubeconfig context (default: the current context)",
    )
    return parent


def add_output_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-o",
        "--output",
        type=output_format,
        default="table",
        metavar="|".join(FORMAT_ALIASES),
        help="output format (default table)",
    )


def _namespace_arg(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "-n",
        "--namespace",
        type=dns_label,
        default=None,
        help=f"{what} (default: the context's namespace, else default; embedded: default)",
    )


def _state_dir_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--state-dir",
        type=Path,
        action=ExplicitStore,  # typing it selects the embedded mesh
        default=DEFAULT_STATE_DIR,
        metavar="DIR",
        help=f"embedded: the running mesh's state directory (default ./{DEFAULT_STATE_DIR})",
    )


def add_cluster_parsers(sub: Any, kube_parent: argparse.ArgumentParser) -> None:
    """``enroll``, ``unenroll``, ``status``, ``check``, ``install``, ``uninstall``."""
    for name, verb in (("enroll", "add"), ("unenroll", "remove")):
        parser = sub.add_parser(
            name,
            parents=[kube_parent],
            help=f"{verb} a namespace's pods {'to' if name == 'enroll' else 'from'} the mesh "
            "(label istio.io/dataplane-mode=ambient)",
        )
        parser.add_argument("target_namespace", type=dns_label, metavar="NAMESPACE")

    both_modes = mode_help("--state-dir", "--kubeconfig or --context")
    status = sub.add_parser(
        "status",
        parents=[kube_parent],
        help="control plane, ztunnels per node, certificate expiry, waypoints",
        description="The control plane, each node's ztunnel and its soonest certificate "
        "expiry, and the waypoints. " + both_modes,
    )
    status.add_argument("--admin-port", type=port_number, default=DEFAULT_ADMIN_PORT,
                        help="cluster: the ztunnels' admin port (default 15000)")  # fmt: skip
    _state_dir_arg(status)
    add_output_arg(status)

    check = sub.add_parser(
        "check",
        parents=[kube_parent],
        help="pre-install and health checks (OK/WARN/FAIL), incl. NetworkPolicies blocking "
        "port 15008",
        description="Exit code 1 when any check FAILs. Embedded: the running mesh's "
        "processes, certificates and config directory. " + both_modes,
    )
    _state_dir_arg(check)
    add_output_arg(check)

    for name, text in (("install", "apply"), ("uninstall", "delete")):
        parser = sub.add_parser(
            name,
            parents=[kube_parent],
            help=f"{text} the kustomize output of the manifests",
            description=f"Render `kubectl kustomize DIR` and {text} every object"
            + (" (create, or replace when it exists)." if name == "install"
               else " in reverse order; CustomResourceDefinitions stay unless --purge."),
        )  # fmt: skip
        parser.add_argument(
            "-k",
            "--kustomize",
            type=Path,
            default=DEFAULT_KUSTOMIZATION,
            metavar="DIR",
            help="the kustomization to render (default: manifests/base as shipped with "
            "ambientctl)",
        )
        if name == "install":
            parser.add_argument(
                "--dry-run",
                action="store_true",
                help="print what would be applied; the cluster is not contacted",
            )
            add_output_arg(parser)
        else:
            parser.add_argument(
                "--purge",
                action="store_true",
                help="also delete the CustomResourceDefinitions (and every object of them)",
            )


def add_ztunnel_cluster_flags(parser: argparse.ArgumentParser, target: Any) -> None:
    """``ztunnel-config``'s cluster-only flags (its ``target`` group holds --node/--address)."""
    target.add_argument(
        "--pod",
        action=ExplicitStore,
        help="cluster: the ztunnel pod (in istio-system) to ask; default: the one on --node, "
        "else the first running",
    )


def add_waypoint_parser(sub: Any, kube_parent: argparse.ArgumentParser) -> None:
    """``waypoint generate|apply|list|status|delete`` for both modes (embedded flags as
    ``waypointcmd``'s, whose ``run_waypoint_command`` runs the embedded actions)."""
    waypoint = sub.add_parser(
        "waypoint",
        help="generate, apply, list, inspect and delete waypoints (as istioctl waypoint)",
        description="Manage waypoint Gateways. " + MODE_HELP,
    )
    actions = waypoint.add_subparsers(dest="waypoint_command", metavar="ACTION", required=True)

    def name_args(parser: argparse.ArgumentParser, default: str | None) -> None:
        parser.add_argument(
            "name",
            nargs="?",
            type=dns_subdomain,
            metavar="NAME",
            help=f"the waypoint's name (default {default})" if default else "the waypoint's name",
        )
        parser.add_argument("--name", dest="name_flag", type=dns_subdomain,
                            help="the waypoint's name (istioctl's spelling)")  # fmt: skip

    def for_arg(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--for",
            dest="waypoint_for",
            choices=WAYPOINT_FOR_VALUES,
            default="service",
            help="which traffic the waypoint takes (default service)",
        )

    def config_dir_arg(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "-f",
            "--file",
            "--config-dir",
            dest="config_dir",
            type=Path,
            action=ExplicitStore,
            default=None,
            metavar="DIR",
            help="embedded: the mesh's config directory (as `ambientctl up -f`; default: "
            "the one the running `ambientctl up` serves)",
        )
        _state_dir_arg(parser)

    def action(name: str, help_text: str, *, cluster: bool = True) -> argparse.ArgumentParser:
        return actions.add_parser(  # type: ignore[no-any-return]
            name,
            parents=[kube_parent] if cluster else [],
            help=help_text,
            description=help_text + ". " + (MODE_HELP if cluster else ""),
        )

    generate = action("generate", "print a waypoint Gateway's YAML", cluster=False)
    name_args(generate, DEFAULT_WAYPOINT_NAME)
    _namespace_arg(generate, "the waypoint's namespace")
    for_arg(generate)
    generate.add_argument("--address", type=ip_address,
                          help="the embedded waypoint's IP (spec.addresses)")  # fmt: skip

    apply = action("apply", "create or update a waypoint Gateway")
    name_args(apply, DEFAULT_WAYPOINT_NAME)
    _namespace_arg(apply, "the waypoint's namespace")
    for_arg(apply)
    apply.add_argument(
        "--address",
        type=ip_address,
        action=ExplicitStore,
        help=f"embedded: the waypoint's IP (default: the first free one of {ADDRESS_POOL})",
    )
    apply.add_argument("--enroll-namespace", action="store_true",
                       help="label the namespace istio.io/use-waypoint=<name>")  # fmt: skip
    apply.add_argument("--wait", action=ExplicitStoreTrue,
                       help="cluster: wait until the Gateway is Programmed")  # fmt: skip
    apply.add_argument(
        "--timeout",
        type=duration_seconds,
        default=DEFAULT_WAIT_TIMEOUT,
        metavar="DURATION",
        help=f"cluster: how long --wait waits (default {DEFAULT_WAIT_TIMEOUT:g}s)",
    )
    config_dir_arg(apply)

    listing = action("list", "list waypoint Gateways")
    _namespace_arg(listing, "whose waypoints")
    listing.add_argument("-A", "--all-namespaces", action="store_true",
                         help="list the waypoints of every namespace")  # fmt: skip
    config_dir_arg(listing)
    add_output_arg(listing)

    status = action("status", "a waypoint's state: cluster: its status conditions; embedded: "
                    "process, readiness and certificate")  # fmt: skip
    name_args(status, None)
    _namespace_arg(status, "the waypoint's namespace")
    status.add_argument("-A", "--all-namespaces", action="store_true")
    status.add_argument("--address", type=ip_address, action=ExplicitStore,
                        help="embedded: ask the waypoint at this IP")  # fmt: skip
    _state_dir_arg(status)
    add_output_arg(status)

    delete = action("delete", "delete waypoint Gateways")
    delete.add_argument("names", nargs="+", type=dns_subdomain, metavar="NAME")
    _namespace_arg(delete, "the waypoints' namespace")
    config_dir_arg(delete)


# ---------------------------------------------------------------------------------------------
# Running


def connect(args: argparse.Namespace) -> Kube:
    options = KubeOptions(getattr(args, "kubeconfig", None), getattr(args, "context", None))
    return Kube.connect(options)


def run_waypoint(
    args: argparse.Namespace, out: TextIO, err: TextIO, *, cluster_default: bool
) -> int:
    action = args.waypoint_command
    if action == "generate":
        return run_waypoint_command(args, out)
    embedded_flags = given(args, {"config_dir": "-f/--file", "state_dir": "--state-dir",
                                  "address": "--address"})  # fmt: skip
    cluster_flags = given(args, {**KUBE_FLAGS, "wait": "--wait"})
    mode = choose_mode(embedded_flags, cluster_flags, cluster_default=cluster_default)
    if mode == EMBEDDED:
        if action in ("apply", "list", "delete") and args.config_dir is None:
            args.config_dir = running_config_dir(args.state_dir)
        return run_waypoint_command(args, out)
    with connect(args) as kube:
        return run_cluster_waypoint(kube, args, out, err)


def running_config_dir(state_dir: Path) -> Path:
    """The config directory of the mesh ``ambientctl up`` runs, for commands given no -f."""
    try:
        mesh = load_mesh_state(state_dir)
    except ZtunnelConfigError as exc:
        raise WaypointUsageError(
            "the following arguments are required: -f/--file (the embedded mesh's config "
            f"directory; or --kubeconfig/--context for a cluster); {exc}"
        ) from None
    if not mesh.get("config_dir"):
        raise WaypointUsageError(f"{state_dir / 'mesh.json'} names no config_dir; pass -f DIR")
    return Path(str(mesh["config_dir"]))


def run_cluster_waypoint(kube: Kube, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    action = args.waypoint_command
    namespace = args.namespace or kube.namespace
    if action == "apply":
        name = waypoint_name(args, DEFAULT_WAYPOINT_NAME)
        assert name is not None
        applied = apply_waypoint(
            kube, name, namespace, waypoint_for=args.waypoint_for, enroll=args.enroll_namespace
        )
        out.write(f"waypoint {namespace}/{name} {'created' if applied.created else 'updated'}\n")
        if applied.enrolled:
            out.write(f'namespace {namespace} labeled with "{USE_WAYPOINT_LABEL}: {name}"\n')
        out.flush()
        if args.wait:
            wait_programmed(kube, namespace, name, timeout=args.timeout, progress=err)
        return 0
    if action == "list":
        selected = None if args.all_namespaces else namespace
        gateways = list_waypoints(kube, selected)
        rows = waypoint_rows(gateways)
        if not rows and args.output == "table":
            where = "any namespace" if selected is None else f"namespace {selected}"
            out.write(f"No waypoints found in {where}.\n")
            return 0
        out.write(render(rows, ("name", "namespace", "for", "programmed", "address"),
                         args.output, structured=gateways if args.output in ("json", "yaml")
                         else None))  # fmt: skip
        return 0
    if action == "status":
        name = waypoint_name(args, None)
        selected = None if args.all_namespaces and name is None else namespace
        rows, gateways = waypoint_status(kube, selected, name)
        out.write(render(rows, ("namespace", "name", "condition", "status", "reason"),
                         args.output, wide_columns=("message", "last_transition")))  # fmt: skip
        return 0 if all(programmed(g)[0] == "True" for g in gateways) else 1
    if action == "delete":
        for name in args.names:
            users = delete_waypoint(kube, namespace, name)
            out.write(f"waypoint {namespace}/{name} deleted\n")
            if users:
                out.write(f"note: still labeled {USE_WAYPOINT_LABEL}={name}: {', '.join(users)}\n")
        return 0
    raise ClusterUsageError(f"unknown waypoint action {action!r}")


def command_mode(args: argparse.Namespace, *, cluster_default: bool) -> str:
    """``status`` / ``check`` (and the cluster-only commands): --state-dir or the cluster
    flags, else the program's default."""
    embedded_flags = given(args, {"state_dir": "--state-dir"})
    return choose_mode(embedded_flags, given(args, KUBE_FLAGS), cluster_default=cluster_default)


def ztunnel_config_mode(args: argparse.Namespace, *, cluster_default: bool) -> str:
    embedded_flags = given(args, {"state_dir": "--state-dir", "address": "--address"})
    cluster_flags = given(args, {**KUBE_FLAGS, "pod": "--pod"})
    return choose_mode(embedded_flags, cluster_flags, cluster_default=cluster_default)


def run_cluster_ztunnel_config(args: argparse.Namespace, kind: str, out: TextIO) -> int:
    with connect(args) as kube:
        pod = find_ztunnel(kube, node=args.node, pod=args.pod)
        dump = fetch_pod_config_dump(kube, pod.name, args.admin_port)
    out.write(render_view(dump, kind, args.output, namespace=args.namespace))
    return 0


def run_cluster_command(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """enroll / unenroll / status / check / install / uninstall."""
    command = args.command
    if command == "install" and args.dry_run:
        documents = render_kustomization(args.kustomize)
        try:  # loading the kubeconfig does not contact the cluster
            with connect(args) as kube:
                namespace = kube.namespace
        except KubeError:
            namespace = DEFAULT_NAMESPACE
        outcomes = dry_run(documents, namespace)
        if args.output in ("json", "yaml"):
            out.write(render([], ("kind",), args.output, structured=documents))
        else:
            out.write(render([outcome_row(o) for o in outcomes],
                             ("kind", "namespace", "name", "action"), args.output))  # fmt: skip
        return 0
    # Render first: a broken kustomization fails before anything touches the cluster.
    documents = render_kustomization(args.kustomize) if command in ("install", "uninstall") else []
    with connect(args) as kube:
        if command in ("enroll", "unenroll"):
            change = (enroll if command == "enroll" else unenroll)(kube, args.target_namespace)
            out.write(change.describe() + "\n")
            return 0
        if command == "status":
            out.write(gather_status(kube, admin_port=args.admin_port).render(args.output))
            return 0
        if command == "check":
            results = run_checks(kube)
            out.write(render([r.row() for r in results], ("check", "status", "reason"),
                             args.output))  # fmt: skip
            return check_exit_code(results)
        if command in ("install", "uninstall"):

            def report(outcome: Outcome) -> None:
                out.write(f"{outcome.ref} {outcome.action}\n")
                out.flush()

            if command == "install":
                outcomes = install(kube, documents, report=report)
                out.write(f"applied {len(outcomes)} objects from {args.kustomize}\n")
                return 0
            outcomes = uninstall(kube, documents, purge=args.purge, report=report)
            kept = sum(1 for o in outcomes if o.action == "kept" and o.ref.kind == CRD_KIND)
            deleted = sum(1 for o in outcomes if o.action == "deleted")
            out.write(f"deleted {deleted} objects")
            out.write(f"; kept {kept} CustomResourceDefinitions (--purge deletes them)\n"
                      if kept else "\n")  # fmt: skip
            return 0
    raise ClusterUsageError(f"unknown command {command!r}")
