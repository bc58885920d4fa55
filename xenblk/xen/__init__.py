"""The Xen vocabulary shared by the daemon, the toolstack commands and the simulator: XenbusState,
virtual-device names, XenStore paths and the `params` codec. Pure data: imports nothing of xenblk's own
beyond xenblk.errors."""
