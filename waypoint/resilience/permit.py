"""A held unit of a limited resource (a retry's budget slot, an admitted request, a
connection), released exactly once however many cleanup paths release it.
"""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType


class Permit:
    """One held unit of a limited resource. Releasing it twice is harmless, so a cleanup
    path can always release without knowing whether another one already did."""

    __slots__ = ("_on_release", "_released")

    def __init__(self, on_release: Callable[[Permit], None]) -> None:
        self._on_release = on_release
        self._released = False

    @property
    def released(self) -> bool:
        return self._released

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        self._on_release(self)

    def __enter__(self) -> Permit:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()
