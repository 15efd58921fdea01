"""SPIFFE identities: ``spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>``."""

from __future__ import annotations

import re
from dataclasses import dataclass

_SEGMENT = re.compile(r"^[A-Za-z0-9._-]+$")


class InvalidSpiffeId(ValueError):
    pass


@dataclass(frozen=True, order=True)
class SpiffeId:
    trust_domain: str
    namespace: str
    service_account: str

    def __str__(self) -> str:
        return f"spiffe://{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    @classmethod
    def parse(cls, uri: str) -> SpiffeId:
        """Parse a SPIFFE URI, raising InvalidSpiffeId that says what is wrong with it."""
        prefix = "spiffe://"
        if not uri.startswith(prefix):
            raise InvalidSpiffeId(f"{uri!r} does not start with {prefix}")
        trust_domain, _, path = uri[len(prefix):].partition("/")
        parts = path.split("/")
        if len(parts) != 4 or parts[0] != "ns" or parts[2] != "sa":
            raise InvalidSpiffeId(f"{uri!r} is not of the form spiffe://TD/ns/NS/sa/SA")
        for value in (trust_domain, parts[1], parts[3]):
            if not _SEGMENT.match(value):
                raise InvalidSpiffeId(f"{uri!r} has an empty or invalid segment {value!r}")
        return cls(trust_domain, parts[1], parts[3])
