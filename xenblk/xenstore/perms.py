"""Node permissions as xenstored spells them: "<access><domid>" (n none, r read, w write, b both).

The first entry of a node's list names its owner and the access every other domain gets by default.
"""

from __future__ import annotations

from dataclasses import dataclass

from xenblk.xenstore.errors import InvalidArgument

ACCESS = frozenset("nrwb")
DOMID_MAX = 0xFFFF


@dataclass(frozen=True)
class Perm:
    access: str
    domid: int

    def __post_init__(self) -> None:
        if self.access not in ACCESS or len(self.access) != 1:
            raise InvalidArgument(f"xenstore: permission access {self.access!r} is not one of n, r, w, b")
        if not 0 <= self.domid <= DOMID_MAX:
            raise InvalidArgument(f"xenstore: permission domid {self.domid} out of range")

    def __str__(self) -> str:
        return f"{self.access}{self.domid}"

    @classmethod
    def parse(cls, text: str) -> Perm:
        digits = text[1:]
        if not text or not digits.isascii() or not digits.isdigit() or len(digits) > 5:
            raise InvalidArgument(f"xenstore: malformed permission {text[:16]!r} (want e.g. 'r1')")
        return cls(text[0], int(digits))
