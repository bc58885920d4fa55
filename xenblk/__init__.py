"""xenblk: a userspace Xen PV block backend daemon for Dom0."""

__version__ = "0.1.0"
