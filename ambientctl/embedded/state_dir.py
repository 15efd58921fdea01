"""The embedded mesh's state directory, and the bootstrap tokens written into it.

``StatePaths`` names every file the mesh keeps (istiod's CA state, the bootstrap token map
istiod reads and each process's own token file, the children's logs, ``mesh.json`` for the
tools and ``children.json`` for the supervisor); ``ambientctl lab`` lays out its mesh the same
way.
"""

from __future__ import annotations

import secrets
import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from ambient_common.files import write_atomically
from ambientctl.bundled import DEMO_CONFIG_DIR
from ambientctl.embedded.errors import EmbeddedError
from ambientctl.embedded.layout import NodeSpec, WaypointSpec


@dataclass(frozen=True)
class StatePaths:
    root: Path

    @property
    def istiod_dir(self) -> Path:
        return self.root / "istiod"

    @property
    def root_cert(self) -> Path:
        return self.istiod_dir / "root-cert.pem"

    @property
    def bootstrap_tokens(self) -> Path:
        return self.root / "bootstrap-tokens.yaml"

    @property
    def tokens_dir(self) -> Path:
        return self.root / "tokens"

    @property
    def logs_dir(self) -> Path:
        return self.root / "logs"

    @property
    def demo_config(self) -> Path:
        """``ambientctl up``'s config directory when given none: the user's copy to edit."""
        return self.root / "config"

    @property
    def istiod_log(self) -> Path:
        """istiod's log, as the supervisor names it (``<logs>/<process>.log``)."""
        return self.logs_dir / "istiod.log"

    @property
    def mesh_file(self) -> Path:
        return self.root / "mesh.json"

    @property
    def children_file(self) -> Path:
        return self.root / "children.json"

    def token_file(self, principal: str) -> Path:
        """A node's token file, or a ``serviceaccount:<ns>/<sa>``'s as
        ``serviceaccount:<ns>:<sa>`` (no Kubernetes name holds a ``:``, so no clash)."""
        return self.tokens_dir / principal.replace("/", ":")

    def create(self) -> None:
        try:
            for directory in (self.root, self.istiod_dir, self.tokens_dir, self.logs_dir):
                directory.mkdir(parents=True, exist_ok=True)
            self.tokens_dir.chmod(0o700)
        except OSError as exc:
            raise EmbeddedError(
                f"cannot create the state directory {self.root}: {exc.strerror or exc}"
            ) from None


def demo_config_copy(paths: StatePaths) -> Path:
    """The demo's config copied to ``paths.demo_config`` on first use, then kept as the user
    edited it (delete it to start over)."""
    if not paths.demo_config.is_dir():
        try:
            paths.root.mkdir(parents=True, exist_ok=True)
            shutil.copytree(DEMO_CONFIG_DIR, paths.demo_config)
        except OSError as exc:
            raise EmbeddedError(
                f"cannot copy the demo config to {paths.demo_config}: {exc}"
            ) from None
    return paths.demo_config


def write_bootstrap_tokens(
    paths: StatePaths, nodes: Sequence[NodeSpec], waypoints: Sequence[WaypointSpec] = ()
) -> dict[str, str]:
    """Fresh tokens per node and per waypoint service account (``serviceaccount:<ns>/<sa>``):
    istiod reads the map, each process only its own file."""
    principals = [node.name for node in nodes] + [w.principal for w in waypoints]
    tokens = {principal: secrets.token_urlsafe(32) for principal in principals}
    _write_tokens(paths, tokens)
    return tokens


def add_bootstrap_tokens(paths: StatePaths, principals: Iterable[str]) -> list[str]:
    """Give the ``principals`` that have none a fresh token, keeping everyone else's (a
    waypoint applied while the mesh runs). Returns the principals added."""
    try:
        tokens = yaml.safe_load(paths.bootstrap_tokens.read_text()) or {}
    except FileNotFoundError:
        tokens = {}
    if not isinstance(tokens, dict):
        raise EmbeddedError(f"{paths.bootstrap_tokens} is not a mapping of name to token")
    added = [p for p in dict.fromkeys(principals) if p not in tokens]
    if added:
        tokens.update({principal: secrets.token_urlsafe(32) for principal in added})
        _write_tokens(paths, tokens)
    return added


def _write_tokens(paths: StatePaths, tokens: Mapping[str, str]) -> None:
    for principal, token in tokens.items():
        write_atomically(paths.token_file(principal), token)
    # The map last: istiod never knows a token whose holder cannot read it yet.
    write_atomically(paths.bootstrap_tokens, yaml.safe_dump(dict(tokens), sort_keys=True))
