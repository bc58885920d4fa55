"""The TOML configuration (/etc/xenblk/xenblk.toml by default).

Every key has a default, documented in docs/config.md and `xenblk config --defaults`;
an unknown key or a bad value is a ConfigError naming the key.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xenblk.errors import ConfigError
from xenblk.xen.params import RBD_NAME

DEFAULT_PATH = Path("/etc/xenblk/xenblk.toml")


@dataclass
class DaemonConfig:
    backend_types: list[str] = field(default_factory=lambda: ["vbd3"])
    """XenStore backend types to serve: /local/domain/<self>/backend/<type>/."""
    domid: int = 0
    """Domain xenblk runs in (the backend domain)."""
    run_dir: str = "/run/xenblk"
    """Control socket and runtime state."""
    state_dir: str = "/var/lib/xenblk"
    """Ring-state journal for restart without guest impact."""
    on_stop: str = "keep"
    """keep: SIGTERM hands the devices over to the next daemon (the guests wait, then carry on: a restart
    without guest impact) | close: SIGTERM closes every device (state 6; Linux blkfront drops the disk)."""


@dataclass
class LogConfig:
    format: str = "auto"
    """auto (JSON under systemd, else console) | console | json."""
    level: str = "info"
    """debug | info | warning | error."""


@dataclass
class MetricsConfig:
    enabled: bool = True
    listen: str = "127.0.0.1:9469"
    """HOST:PORT of the Prometheus endpoint; loopback unless you open it."""


@dataclass
class DataplaneConfig:
    max_ring_page_order: int = 4
    """Advertised max-ring-page-order (0..4: 1..16 pages)."""
    max_queues: int = 4
    """Advertised multi-queue-max-queues (1..16)."""
    max_indirect_segments: int = 256
    """Advertised feature-max-indirect-segments (0 disables indirect, else 12..256)."""
    feature_persistent: bool = True
    max_work_per_wake: int = 64
    """Requests a queue thread takes per wake-up before letting others run."""
    memory_per_disk_mib: int = 64
    """MiB of request buffers one disk's queues may hold; when spent, its rings wait (not other disks')."""


@dataclass
class StorageConfig:
    allowed_dirs: list[str] = field(default_factory=lambda: ["/var/lib/xen/images", "/var/lib/xenblk/images"])
    """Image files must lie under one of these (opened beneath it, no symlinks followed); not /dev itself."""
    allowed_devices: list[str] = field(default_factory=list)
    """Block devices served: fnmatch patterns of their paths, e.g. "/dev/vg0/guest-*"; empty: none."""
    backing_dirs: list[str] = field(default_factory=list)
    """qcow2 backing files must lie under one of these (read-only base images); empty: no backing files."""
    cache: str = "writeback"
    """raw files: writeback (page cache, flush = fdatasync) | none (O_DIRECT)."""
    qcow2_dirs: list[str] = field(default_factory=list)
    """Regular files under these are opened as qcow2 even when named raw (aio:/raw:/bare path), e.g. by xl."""


# The cluster settings one [rbd.pools.NAME] table may set for its own disks; the others are [rbd]'s.
RBD_POOL_KEYS = ("pool", "conf_file", "client_id", "keyring", "connect_timeout", "op_timeout")


@dataclass(frozen=True)
class RbdTarget:
    """Where and how one `rbd:NAME/...` disk is opened: [rbd]'s settings, or NAME's [rbd.pools.NAME] table's."""

    pool: str
    """The pool's name in its cluster."""
    conf_file: str
    client_id: str
    keyring: str
    connect_timeout: int
    op_timeout: int


@dataclass
class RbdConfig:
    allowed_pools: list[str] = field(default_factory=list)
    """Ceph pools whose images may be served (params rbd:POOL/IMAGE[@SNAP]); empty: no RBD disks."""
    conf_file: str = "/etc/ceph/ceph.conf"
    """ceph.conf naming the monitors; empty: librados' default search."""
    client_id: str = "admin"
    """cephx user (client.<id>) the daemon connects as."""
    keyring: str = ""
    """Keyring file of that user; empty: the one ceph.conf names."""
    connect_timeout: int = 30
    """Seconds to reach the monitors when an RBD disk is opened."""
    op_timeout: int = 0
    """Seconds an I/O waits for an unreachable cluster before the guest gets EIO; 0: until it is back."""
    pools: dict[str, dict[str, Any]] = field(default_factory=dict)
    """More pools, each with its own cluster, user or timeouts: one [rbd.pools.NAME] table each (docs/config.md)."""

    def names(self) -> list[str]:
        """Every NAME a disk's params may say (rbd:NAME/IMAGE)."""
        return [*self.allowed_pools, *self.pools]

    def target(self, name: str) -> RbdTarget | None:
        """The settings for `rbd:NAME/...`, or None when NAME is not configured (such a disk is refused).
        NAME comes from XenStore: it only ever selects a table the admin wrote, never supplies a value."""
        if name in self.pools:
            t = self.pools[name]
        elif name in self.allowed_pools:
            t = {}
        else:
            return None
        return RbdTarget(
            pool=t.get("pool", name),
            conf_file=t.get("conf_file", self.conf_file),
            client_id=t.get("client_id", self.client_id),
            keyring=t.get("keyring", self.keyring),
            connect_timeout=t.get("connect_timeout", self.connect_timeout),
            op_timeout=t.get("op_timeout", self.op_timeout),
        )


@dataclass
class XenstoreConfig:
    path: str = ""
    """Socket path; empty: $XENSTORED_PATH, $XENSTORED_RUNDIR/socket, /var/run/xenstored/socket, /dev/xen/xenbus."""
    timeout: float = 30.0
    """Seconds to wait for a reply before the request fails."""


@dataclass
class NbdConfig:
    enabled: bool = True
    """Serve each open disk on <daemon.run_dir>/nbd/<type>-<domid>-<devid>.sock (vbd3: physical-device-path)."""
    max_clients: int = 8
    """NBD clients one disk serves at once; one more is disconnected before the handshake."""


@dataclass
class QosConfig:
    """Every disk's limits unless its backend node's qos/ says otherwise (README, "QoS")."""

    iops: int = 0
    """Requests per second, reads and writes together; 0: unlimited."""
    read_iops: int = 0
    """Read requests per second; 0: unlimited."""
    write_iops: int = 0
    """Write requests per second (flushes and discards count); 0: unlimited."""
    bps: int = 0
    """Bytes per second, read and written together; 0: unlimited."""
    read_bps: int = 0
    """Bytes read per second; 0: unlimited."""
    write_bps: int = 0
    """Bytes written per second; 0: unlimited."""
    iops_burst: int = 0
    """What iops lets through at once after idleness, on top of the rate; 0: a tenth of iops."""
    read_iops_burst: int = 0
    """What read_iops lets through at once after idleness, on top of the rate; 0: a tenth of read_iops."""
    write_iops_burst: int = 0
    """What write_iops lets through at once after idleness, on top of the rate; 0: a tenth of write_iops."""
    bps_burst: int = 0
    """What bps lets through at once after idleness, on top of the rate; 0: a tenth of bps."""
    read_bps_burst: int = 0
    """What read_bps lets through at once after idleness, on top of the rate; 0: a tenth of read_bps."""
    write_bps_burst: int = 0
    """What write_bps lets through at once after idleness, on top of the rate; 0: a tenth of write_bps."""
    group: str = ""
    """Group of every disk without qos/group: "" none, "domain" one group per domain, or a group name."""


@dataclass
class QosGroupConfig:
    """Every group's limits unless /local/domain/<self>/xenblk/qos-groups/<name>/ says otherwise."""

    iops: int = 0
    """Requests per second, reads and writes together over the group's disks; 0: unlimited."""
    read_iops: int = 0
    """Read requests per second over the group's disks; 0: unlimited."""
    write_iops: int = 0
    """Write requests per second (flushes and discards count) over the group's disks; 0: unlimited."""
    bps: int = 0
    """Bytes per second, read and written together over the group's disks; 0: unlimited."""
    read_bps: int = 0
    """Bytes read per second over the group's disks; 0: unlimited."""
    write_bps: int = 0
    """Bytes written per second over the group's disks; 0: unlimited."""
    iops_burst: int = 0
    """What iops lets through at once after idleness, on top of the rate; 0: a tenth of iops."""
    read_iops_burst: int = 0
    """What read_iops lets through at once after idleness, on top of the rate; 0: a tenth of read_iops."""
    write_iops_burst: int = 0
    """What write_iops lets through at once after idleness, on top of the rate; 0: a tenth of write_iops."""
    bps_burst: int = 0
    """What bps lets through at once after idleness, on top of the rate; 0: a tenth of bps."""
    read_bps_burst: int = 0
    """What read_bps lets through at once after idleness, on top of the rate; 0: a tenth of read_bps."""
    write_bps_burst: int = 0
    """What write_bps lets through at once after idleness, on top of the rate; 0: a tenth of write_bps."""


@dataclass
class Config:
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    log: LogConfig = field(default_factory=LogConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    dataplane: DataplaneConfig = field(default_factory=DataplaneConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    rbd: RbdConfig = field(default_factory=RbdConfig)
    xenstore: XenstoreConfig = field(default_factory=XenstoreConfig)
    nbd: NbdConfig = field(default_factory=NbdConfig)
    qos: QosConfig = field(default_factory=QosConfig)
    qos_group: QosGroupConfig = field(default_factory=QosGroupConfig)


_CHOICES: dict[str, tuple[str, ...]] = {
    "log.format": ("auto", "console", "json"),
    "log.level": ("debug", "info", "warning", "error"),
    "storage.cache": ("writeback", "none"),
    "daemon.on_stop": ("keep", "close"),
}
_RANGES: dict[str, tuple[float, float]] = {
    "daemon.domid": (0, 0x7FEF),
    "dataplane.max_ring_page_order": (0, 4),
    "dataplane.max_queues": (1, 16),
    "dataplane.max_indirect_segments": (0, 256),
    "dataplane.max_work_per_wake": (1, 4096),
    "dataplane.memory_per_disk_mib": (1, 65536),
    "xenstore.timeout": (0.1, 3600),
    "nbd.max_clients": (1, 256),
    "rbd.connect_timeout": (1, 3600),
    "rbd.op_timeout": (0, 86400),
}


def _check_value(key: str, value: Any, default: Any, rule: str | None = None) -> Any:
    """`value` of `key`, checked as the key `rule` (default: `key` itself; [rbd.pools.NAME]'s keys have [rbd]'s
    rules)."""
    want = type(default)
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if want is list:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"config key {key!r}: expected a list of strings, got {value!r}")
    elif not isinstance(value, want) or (want is int and isinstance(value, bool)):
        raise ConfigError(f"config key {key!r}: expected {want.__name__}, got {value!r}")
    rule = rule or key
    if rule in _CHOICES and value not in _CHOICES[rule]:
        raise ConfigError(f"config key {key!r}: {value!r} is not one of {', '.join(_CHOICES[rule])}")
    if rule in _RANGES:
        lo, hi = _RANGES[rule]
        if not lo <= value <= hi:
            raise ConfigError(f"config key {key!r}: {value!r} is out of range {lo:g}..{hi:g}")
    if key == "dataplane.max_indirect_segments" and 0 < value <= 11:
        raise ConfigError(f"config key {key!r}: {value} must be 0 (off) or 12..256")
    if key.startswith(("qos.", "qos_group.")) and key != "qos.group" and not 0 <= value <= 1 << 50:
        raise ConfigError(f"config key {key!r}: {value!r} is out of range 0..{1 << 50}")
    if key == "qos.group" and value not in ("", "domain"):
        from xenblk.qos import QosError, check_group

        try:
            check_group(value)
        except QosError as e:
            raise ConfigError(f"config key {key!r}: {e}") from None
    if key == "metrics.listen":
        _parse_listen(key, value)
    if key in ("storage.allowed_dirs", "storage.backing_dirs", "storage.allowed_devices"):
        _check_storage_paths(key, value)
    if rule.startswith("rbd."):
        _check_rbd_value(key, rule.removeprefix("rbd."), value)
    return value


# Pool names as params may name them (RBD_NAME); a cephx id (client.<id>); file names that fit the driver's
# fields (native/rbd/rbd_api.h).
_CEPHX_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,126}")


def _check_rbd_value(key: str, name: str, value: Any) -> None:
    if name in ("allowed_pools", "pool"):
        for v in value if isinstance(value, list) else [value]:
            if not RBD_NAME.fullmatch(v):
                raise ConfigError(f"config key {key!r}: {v!r} is not a pool name (letters, digits, _.+-; at most 127)")
    elif name == "client_id" and not _CEPHX_ID.fullmatch(value):
        raise ConfigError(f"config key {key!r}: {value!r} is not a cephx user id (letters, digits, _.-)")
    elif name in ("conf_file", "keyring") and value:
        if not value.startswith("/"):
            raise ConfigError(f"config key {key!r}: {value!r} is not an absolute path")
        if len(os.fsencode(value)) >= 1024:
            raise ConfigError(f"config key {key!r}: the path is longer than 1023 bytes")


def _rbd_pools(value: Any) -> dict[str, dict[str, Any]]:
    """[rbd.pools.NAME] tables: NAME as params names it; each key checked as [rbd]'s own."""
    if not isinstance(value, dict):
        raise ConfigError("config key 'rbd.pools': expected [rbd.pools.NAME] tables")
    out: dict[str, dict[str, Any]] = {}
    defaults = RbdConfig()
    for name, table in value.items():
        where = f"rbd.pools.{name}"
        if not RBD_NAME.fullmatch(name):
            raise ConfigError(
                f"config table [{where[:200]}]: the name is what params says (rbd:NAME/IMAGE): letters, digits, _.+-"
            )
        if not isinstance(table, dict):
            raise ConfigError(f"config key {where!r}: expected a table [{where}]")
        entry: dict[str, Any] = {}
        for key, v in table.items():
            if key not in RBD_POOL_KEYS:
                raise ConfigError(
                    f"unknown config key '{where}.{key}' (known in [{where}]: {', '.join(sorted(RBD_POOL_KEYS))})"
                )
            default = name if key == "pool" else getattr(defaults, key)
            entry[key] = _check_value(f"{where}.{key}", v, default, rule=f"rbd.{key}")
        out[name] = entry
    return out


_TOO_WIDE = ("/", "/dev", "/dev/shm", "/tmp", "/var/tmp")


def _check_storage_paths(key: str, value: list[str]) -> None:
    for v in value:
        if not v.startswith("/"):
            raise ConfigError(f"config key {key!r}: {v!r} is not an absolute path")
        if key != "storage.allowed_devices" and os.path.normpath(v) in _TOO_WIDE:
            # / and /dev hold every disk of the host (devices are named one by one, in allowed_devices);
            # /dev/shm, /tmp and /var/tmp hold files anyone can write. A directory made for images inside
            # one of them is fine.
            raise ConfigError(
                f"config key {key!r}: {v!r} would reach the host's devices or files anyone can write; name a"
                " directory made for images (block devices go in storage.allowed_devices, e.g. /dev/vg0/guest-*)"
            )


def _parse_listen(key: str, value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"config key {key!r}: {value!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def parse_listen(value: str) -> tuple[str, int]:
    return _parse_listen("metrics.listen", value)


def from_dict(data: dict[str, Any]) -> Config:
    cfg = Config()
    for section, values in data.items():
        if not hasattr(cfg, section):
            raise ConfigError(
                f"unknown config section [{section}] (known: {', '.join(f.name for f in dataclasses.fields(cfg))})"
            )
        if not isinstance(values, dict):
            raise ConfigError(f"config section [{section}] must be a table")
        sub = getattr(cfg, section)
        names = {f.name for f in dataclasses.fields(sub)}
        for key, value in values.items():
            full = f"{section}.{key}"
            if key not in names:
                raise ConfigError(f"unknown config key {full!r} (known in [{section}]: {', '.join(sorted(names))})")
            if full == "rbd.pools":
                cfg.rbd.pools = _rbd_pools(value)
                continue
            setattr(sub, key, _check_value(full, value, getattr(sub, key)))
    both = sorted(set(cfg.rbd.allowed_pools) & set(cfg.rbd.pools))
    if both:
        raise ConfigError(
            f"rbd pool {both[0]!r} is both in rbd.allowed_pools and an [rbd.pools.{both[0]}] table: name it once"
        )
    return cfg


def load(path: Path | None = None) -> Config:
    """Load the config; a missing default file means all defaults, a missing explicit file is an error."""
    explicit = path is not None
    p = path if path is not None else DEFAULT_PATH
    if not p.exists():
        if explicit:
            raise ConfigError(f"config file {p} does not exist")
        return Config()
    try:
        data = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {p}: {e}") from None
    except OSError as e:
        raise ConfigError(f"config file {p}: {e.strerror}") from None
    return from_dict(data)


def defaults_toml() -> str:
    """The default configuration as commented TOML (what `xenblk config --defaults` prints)."""
    import inspect

    lines = ["# xenblk configuration: every key with its default."]
    cfg = Config()
    for sf in dataclasses.fields(cfg):
        sub = getattr(cfg, sf.name)
        lines.append(f"\n[{sf.name}]")
        src = inspect.getsource(type(sub))
        for f in dataclasses.fields(sub):
            doc = _field_doc(src, f.name)
            if doc:
                lines.append(f"# {doc}")
            if isinstance(getattr(sub, f.name), dict):
                continue  # tables of their own ([rbd.pools.NAME]), none by default: only the comment
            lines.append(f"{f.name} = {_toml_value(getattr(sub, f.name))}")
    return "\n".join(lines) + "\n"


def _field_doc(src: str, name: str) -> str:
    lines = src.splitlines()
    for i, line in enumerate(lines):
        if line.strip().startswith(f"{name}:") and i + 1 < len(lines):
            nxt = lines[i + 1].strip()
            if nxt.startswith('"""'):
                return nxt.strip('"')
    return ""


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return repr(v)
