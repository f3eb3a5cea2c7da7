"""The paxfs configuration file (TOML) and its settings.

One file serves every process of a cluster: the ``[cluster]`` table says what
all share (the key, the metaserver addresses, the chunk size), and one table
per process kind holds that kind's settings.  Every setting has a default
that serves a local cluster, and every setting can be overridden from the
command line (``tools.cli`` derives a flag from each field).

Loading is strict: an unknown table or key, a value of the wrong type, an
unreadable file or a bad address raises :class:`ConfigError` with one line
that names the file and the key.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wire.address import Address, parse_address
from wire.auth import KEY_BYTES_MIN

BLOCK_BYTES = 64 * 1024
REPLICATION_MAX = 16
KIB = 1024
KERNEL_READAHEAD_BYTES_DEFAULT = 4 * 1024 * KIB
"""The kernel's read requests grow from 128 KiB to FUSE's 1 MiB and several are in
flight: in paired cold reads the mount spent about a quarter less CPU per MiB."""
KERNEL_READAHEAD_BYTES_MAX = 64 * 1024 * KIB


class ConfigError(ValueError):
    """The configuration is unusable; the message is one line for the operator."""


@dataclass
class ClusterSettings:
    """Shared by every process of one cluster."""

    key: str = field(default="", metadata={"help": "cluster key, hex (32+ digits)"})
    key_file: str = field(default="", metadata={"help": "file holding the cluster key in hex"})
    metaservers: dict[str, str] = field(
        default_factory=dict, metadata={"help": "metaserver id -> HOST:PORT"}
    )
    chunk_size_bytes: int = field(
        default=64 * 1024 * 1024, metadata={"help": "size of a chunk (fixed when formatted)"}
    )
    replication: int = field(default=3, metadata={"help": "default replication goal"})


@dataclass
class MetaserverSettings:
    id: int = field(default=0, metadata={"help": "this metaserver's id in [cluster] metaservers"})
    data_dir: str = field(default="", metadata={"help": "directory for the log and snapshots"})
    address: str = field(
        default="",
        metadata={
            "help": "HOST:PORT to serve on (default: this id's entry in [cluster] metaservers; "
            "required with --join)"
        },
    )
    join: bool = field(
        default=False,
        metadata={
            "help": "start as a new replica under a new id, to be added to the running group "
            "as a learner (never founds a group)"
        },
    )
    election_timeout_ms: int = field(default=1000, metadata={"help": "base election timeout"})
    heartbeat_interval_ms: int = field(default=100, metadata={"help": "leader heartbeat period"})
    snapshot_interval_entries: int = field(
        default=100_000, metadata={"help": "log entries between snapshots"}
    )
    session_timeout_s: float = field(
        default=60.0, metadata={"help": "client session expiry without keep-alive"}
    )
    dataserver_dead_after_s: float = field(
        default=30.0, metadata={"help": "heartbeat silence before a dataserver is dead"}
    )
    replication_rate_mib_s: float = field(
        default=200.0, metadata={"help": "cap on re-replication traffic"}
    )
    chunk_token_lifetime_s: float = field(
        default=600.0,
        metadata={
            "help": "life of a chunk access token the leader signs; a chunk version whose "
            "writer never committed it is recovered this long (plus twice clock_skew_s) "
            "after it was opened"
        },
    )
    clock_skew_s: float = field(
        default=30.0, metadata={"help": "most the wall clocks of the cluster's hosts differ"}
    )


@dataclass
class DataserverSettings:
    data_dir: str = field(default="", metadata={"help": "directory holding the chunk replicas"})
    listen: str = field(default="127.0.0.1:0", metadata={"help": "HOST:PORT to serve on"})
    capacity_bytes: int = field(
        default=0, metadata={"help": "capacity to advertise (0: the disk's free space)"}
    )
    heartbeat_interval_s: float = field(default=1.0, metadata={"help": "heartbeat period"})
    scrub_rate_mib_s: float = field(default=8.0, metadata={"help": "background scrub rate"})
    local_reads: bool = field(
        default=True,
        metadata={"help": "let clients on this host read replicas from their files"},
    )


@dataclass
class ClientSettings:
    call_timeout_s: float = field(default=5.0, metadata={"help": "one attempt of a call"})
    no_quorum_timeout_s: float = field(
        default=60.0, metadata={"help": "give up (EIO) after no leader for this long"}
    )
    local_reads: bool = field(
        default=True,
        metadata={
            "help": "read replicas on this host from their files, not through their"
            " dataserver (HDFS's short-circuit reads)"
        },
    )


@dataclass
class MountSettings:
    attr_timeout_s: float = field(default=1.0, metadata={"help": "kernel attribute cache"})
    entry_timeout_s: float = field(default=1.0, metadata={"help": "kernel name cache"})
    write_buffer_bytes: int = field(
        default=64 * 1024 * 1024, metadata={"help": "client write-back buffer per mount"}
    )
    readahead_bytes: int = field(default=8 * 1024 * 1024, metadata={"help": "read-ahead"})
    kernel_readahead_bytes: int = field(
        default=KERNEL_READAHEAD_BYTES_DEFAULT,
        metadata={
            "help": "the kernel's read-ahead of the mount, which also sizes its read"
            " requests (up to 1 MiB); 0 keeps the kernel's 128 KiB"
        },
    )
    allow_other: bool = field(default=True, metadata={"help": "let other users in"})


@dataclass
class Config:
    """The whole configuration file."""

    cluster: ClusterSettings = field(default_factory=ClusterSettings)
    metaserver: MetaserverSettings = field(default_factory=MetaserverSettings)
    dataserver: DataserverSettings = field(default_factory=DataserverSettings)
    client: ClientSettings = field(default_factory=ClientSettings)
    mount: MountSettings = field(default_factory=MountSettings)
    source: str = field(default="<defaults>", metadata={"internal": True})

    def validate(self) -> None:
        """Check what each setting's type cannot: addresses, the key, sizes."""
        if self.cluster.metaservers:
            self.metaserver_addresses()
        if self.cluster.key:
            self.cluster_key()
        if self.metaserver.address:
            try:
                parse_address(self.metaserver.address)
            except ValueError as error:
                raise ConfigError(f"{self.source}: [metaserver] address: {error}") from None
        try:
            parse_address(self.dataserver.listen, any_port=True)
        except ValueError as error:
            raise ConfigError(f"{self.source}: [dataserver] listen: {error}") from None
        if self.cluster.chunk_size_bytes % BLOCK_BYTES or not self.cluster.chunk_size_bytes:
            raise ConfigError(
                f"{self.source}: [cluster] chunk_size_bytes must be a positive multiple "
                f"of {BLOCK_BYTES}"
            )
        if not 1 <= self.cluster.replication <= REPLICATION_MAX:
            raise ConfigError(f"{self.source}: [cluster] replication must be 1..{REPLICATION_MAX}")
        readahead = self.mount.kernel_readahead_bytes
        if not 0 <= readahead <= KERNEL_READAHEAD_BYTES_MAX or readahead % KIB:
            raise ConfigError(
                f"{self.source}: [mount] kernel_readahead_bytes must be a multiple of {KIB}"
                f" from 0 to {KERNEL_READAHEAD_BYTES_MAX}"
            )

    def cluster_key(self) -> bytes:
        """The cluster key as bytes, from ``key`` or ``key_file``."""
        text = self.cluster.key
        origin = "[cluster] key"
        if not text and self.cluster.key_file:
            try:
                text = Path(self.cluster.key_file).read_text().strip()
            except OSError as error:
                raise ConfigError(
                    f"{self.source}: cannot read key_file {self.cluster.key_file}: {error.strerror}"
                ) from None
            origin = f"key file {self.cluster.key_file}"
        if not text:
            raise ConfigError(f"{self.source}: no cluster key ([cluster] key or key_file)")
        try:
            key = bytes.fromhex(text)
        except ValueError:
            raise ConfigError(f"{self.source}: {origin} is not hexadecimal") from None
        if len(key) < KEY_BYTES_MIN:
            raise ConfigError(f"{self.source}: {origin} must be at least {KEY_BYTES_MIN} bytes")
        return key

    def metaserver_addresses(self) -> dict[int, Address]:
        """Metaserver id -> address, validated."""
        addresses: dict[int, Address] = {}
        for name, text in self.cluster.metaservers.items():
            if not name.isdigit() or int(name) <= 0:
                raise ConfigError(
                    f"{self.source}: [cluster] metaservers: id {name!r} must be a positive integer"
                )
            try:
                addresses[int(name)] = parse_address(text)
            except ValueError as error:
                raise ConfigError(f"{self.source}: [cluster] metaservers.{name}: {error}") from None
        if not addresses:
            raise ConfigError(f"{self.source}: [cluster] metaservers is empty")
        return addresses


SECTIONS = ("cluster", "metaserver", "dataserver", "client", "mount")


def load_config(path: str | None) -> Config:
    """Read ``path`` (or return the defaults when None) and validate every value."""
    config = Config()
    if path is None:
        return config
    config.source = path
    try:
        with open(path, "rb") as handle:
            document = tomllib.load(handle)
    except OSError as error:
        raise ConfigError(f"{path}: cannot read: {error.strerror}") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: not valid TOML: {error}") from None
    for table, values in document.items():
        if table not in SECTIONS:
            raise ConfigError(f"{path}: unknown table [{table}] (known: {', '.join(SECTIONS)})")
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: {table} must be a table")
        section = getattr(config, table)
        for key, value in values.items():
            set_setting(section, key, value, f"{path}: [{table}] {key}")
    config.validate()
    return config


def setting_fields(section: Any) -> list[dataclasses.Field[Any]]:
    """The settings of one section, in declaration order."""
    return list(dataclasses.fields(section))


def set_setting(section: Any, key: str, value: Any, where: str) -> None:
    """Validate ``value`` against the field's type and store it."""
    fields = {f.name: f for f in dataclasses.fields(section)}
    if key not in fields:
        known = ", ".join(fields)
        raise ConfigError(f"{where}: unknown setting (known: {known})")
    annotation = typing.get_type_hints(type(section))[key]
    setattr(section, key, _checked(annotation, value, where))


def _checked(annotation: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(annotation)
    if origin is dict:
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        ):
            raise ConfigError(f"{where}: expected a table of strings")
        return dict(value)
    if origin in (typing.Union, types.UnionType):
        raise TypeError("optional settings are not supported")
    if annotation is bool:
        ok = isinstance(value, bool)
    elif annotation is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif annotation is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, annotation)
    if not ok:
        raise ConfigError(
            f"{where}: expected {annotation.__name__}, got {type(value).__name__} {value!r}"
        )
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
        raise ConfigError(f"{where}: must not be negative")
    return value
