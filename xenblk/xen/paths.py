"""Where a VBD lives in XenStore, as libxl lays it out (docs/DESIGN.md, "The VBD handshake")."""

from __future__ import annotations


def domain_path(domid: int) -> str:
    """A domain's home: `/local/domain/<domid>`."""
    return f"/local/domain/{domid}"


def backend_type_path(self_domid: int, btype: str) -> str:
    """Every device of one backend type served by `self_domid`: `/local/domain/<self>/backend/<type>`."""
    return f"{domain_path(self_domid)}/backend/{btype}"


def backend_path(self_domid: int, btype: str, domid: int, devid: int) -> str:
    """One device's backend dir (B)."""
    return f"{backend_type_path(self_domid, btype)}/{domid}/{devid}"


def frontends_path(domid: int) -> str:
    """A guest's VBD frontends: `/local/domain/<domid>/device/vbd`."""
    return f"{domain_path(domid)}/device/vbd"


def frontend_path(domid: int, devid: int) -> str:
    """One device's frontend dir (F)."""
    return f"{frontends_path(domid)}/{devid}"
