"""What one ``ProxyState.apply`` changed, by kind, so a proxy reconciles only that."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class KindChange:
    """Keys of one kind that an apply added, changed or removed."""

    added: frozenset[str] = frozenset()
    updated: frozenset[str] = frozenset()
    removed: frozenset[str] = frozenset()

    def __bool__(self) -> bool:
        return bool(self.added or self.updated or self.removed)

    @property
    def touched(self) -> frozenset[str]:
        return self.added | self.updated | self.removed


@dataclass(frozen=True)
class AppliedChange:
    """What one ``apply`` changed, so the proxy reconciles only that (listeners for added
    or removed local workloads, certificates for new identities, and so on). Keys are the
    resources' discovery names: workload uids, service and policy ``namespace/name``, node
    names. A resource re-sent with identical content is neither added nor updated."""

    generation: int
    workloads: KindChange = field(default_factory=KindChange)
    services: KindChange = field(default_factory=KindChange)
    authorizations: KindChange = field(default_factory=KindChange)
    nodes: KindChange = field(default_factory=KindChange)
    # Every kind's change, the L4 ones included (kinds that did not change may be absent).
    by_kind: Mapping[str, KindChange] = field(default_factory=dict)

    def of(self, kind: str) -> KindChange:
        """The change of one kind (``"httproute"``, ``"workload"``, ...)."""
        return self.by_kind.get(kind, KindChange())

    @property
    def empty(self) -> bool:
        return not (
            self.workloads
            or self.services
            or self.authorizations
            or self.nodes
            or any(self.by_kind.values())
        )
