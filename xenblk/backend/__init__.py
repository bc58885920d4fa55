"""The daemon (`xenblk serve`): one state machine per VBD, following the handshake in
docs/DESIGN.md ("The VBD handshake"). Modules, one job each:

- `frontend`: reads and validates the keys a (hostile) frontend writes.
- `imagespec`: the backend's `params`/`mode`, the allowed directories, opening the image.
- `dataplane_port`: what the state machine needs of the data plane (real adapter + protocol,
  so the state machine runs against a fake in unit tests).
- `device`: the per-device state machine.
- `daemon`: watches, the device table, signals, metrics, control socket, uevents.
- `control`: the daemon's local control socket (`xenblk list`/`resize`).
- `sdnotify`: systemd's notify protocol.

The Xen vocabulary (XenbusState, vdev names, XenStore paths, `params`) is in xenblk.xen; what
`xenblk attach/detach/list` write as the toolstack is xenblk.toolstack; the platform is handed in
by `xenblk serve` (xenblk.xenplatform, or the simulator's).
"""
