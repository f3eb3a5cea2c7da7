"""Every namespace command and reply, declared once for the client and the metaserver.

Three layers live here:

* **Ops**: one frozen dataclass per namespace operation (``Mkdir``, ``Lookup``…).
  Mutating ops (:data:`MUTATING_OPS`) change state and reach the state machine only
  through the Paxos log; read-only ops (:data:`QUERY_OPS`) are answered by the leader
  from its applied state.
* **Calls**: what a client sends over RPC.  The RPC layer has no per-call header, so
  the caller's identity travels in the body: :class:`MutationCall` (request context +
  op) for mutations, :class:`QueryCall` (credentials + op) for reads.  Every op has its
  own :class:`~wire.schema.Method` (``MKDIR``, ``LOOKUP``…) whose reply type is the
  op's success reply; :func:`method_for` finds it.
* **Log commands**: what the leader proposes.  :class:`ClientCommand` wraps a client's
  :class:`MutationCall` with the leader's time; :class:`SessionCommand` carries session
  open / keep-alive / close; :class:`SystemCommand` carries what the leader proposes on
  its own (session expiry, acknowledged chunk deletions, dataserver modes an admin set).
  :func:`encode_command` / :func:`decode_command` turn them into log bytes and back.

Errors are values: a failed op returns :class:`NsError` (a POSIX errno) instead of its
success reply; the server turns it into an RPC error with the same errno.

Names, symlink targets and xattr names/values are ``bytes``.  Times are integer
nanoseconds since the epoch.  ``mode`` values are ``st_mode`` bits (file-type bits are
optional where an op implies the type).
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import Any

import msgpack

from wire import schema
from wire.cluster_admin_ops import DataserverMode
from wire.ids import ChunkId, ChunkVersion, ClientId, DataserverId, InodeId, SequenceNumber
from wire.schema import Method, message

# ---------------------------------------------------------------- limits (the contract)

NAME_MAX_BYTES = 255
"""A directory entry name is 1..255 bytes, without ``/`` or NUL, and not ``.``/``..``."""
SYMLINK_TARGET_MAX_BYTES = 4095
"""PATH_MAX (4096) minus the terminating NUL."""
XATTR_NAME_MAX_BYTES = 255
XATTR_VALUE_MAX_BYTES = 65536
XATTR_LIST_MAX_BYTES = 65536
"""Sum over an inode's xattr names of (length + 1): what one listxattr(2) can return."""
XATTR_INODE_MAX_BYTES = 1 << 20
"""Sum of names and values of one inode's xattrs; past it setxattr gives ENOSPC."""
LINK_MAX = 65000
"""Hard links of one non-directory inode (as ext4); past it link gives EMLINK."""
GOAL_MAX = 16
"""Largest replication goal; a goal is 1..GOAL_MAX."""
GROUPS_MAX = 65536
"""Supplementary groups in one :class:`Credentials` (NGROUPS_MAX)."""
REPLY_WINDOW = 1024
"""Sequence numbers a client may have in flight: see :class:`RequestContext`."""
SESSIONS_MAX = 100_000
"""Open sessions; OpenSession past it gives EUSERS."""
OPEN_FILES_PER_SESSION_MAX = 1 << 20
"""Opens (counted with multiplicity) one session may hold; past it Open gives EMFILE."""
READDIR_PAGE_MAX = 1024
CHUNK_PAGE_MAX = 4096
"""Largest page of GetChunks, GetDeletions, ScanChunks, and largest AckDeletions batch."""
RELEASE_MANY_MAX = 1024
"""Inodes one :class:`ReleaseMany` lists."""
COMMIT_CHUNKS_MAX = 1024
"""Chunk writes in one CommitWrite."""
OPEN_CHUNKS_MAX = 1 << 20
"""Chunk versions open for write (opened, not yet committed or recovered) at once; past
it OpenChunk of a chunk not already open gives ENFILE."""
DATASERVER_MODES_MAX = 10_000
"""Rows of the dataserver-mode table (as many as one leader registers dataservers);
SetDataserverMode of a new row past it gives EUSERS."""
DATASERVER_ADDRESS_MAX_BYTES = 300
"""Longest address a dataserver-mode row keeps (a 255-byte host name, a port, brackets)."""
READDIR_FIRST_COOKIE = 3
"""Cookies of real entries are >= 3; 0 starts a listing, 1 and 2 are free for the
caller to give to ``.`` and ``..``."""
INODE_GENERATION = 1
"""Generation of every inode.  Inode numbers are never reused (a FUSE kernel may hold a
node id until it sends FORGET, which the cluster cannot observe for every client), so
(ino, generation) is unique with a constant generation."""

# Flag values as in <linux/fs.h> and <sys/xattr.h>.
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
RENAME_WHITEOUT = 4
XATTR_CREATE = 1
XATTR_REPLACE = 2

SESSION_EXPIRED_ERRNO = errno.EKEYEXPIRED
"""A client command or keep-alive named a session that does not exist (never opened,
closed, or expired): open a new session.  Whether the refused request had taken effect
before the session ended is unknown, as in the Raft thesis (section 6.3)."""
PROTOCOL_ERRNO = errno.EPROTO
"""The client broke the sequence-number contract of :class:`RequestContext`."""


# ---------------------------------------------------------------- shared structures


@dataclass(frozen=True)
class Credentials:
    """Who asks: fsuid, fsgid and supplementary groups.  uid 0 is the superuser."""

    uid: int
    gid: int
    groups: tuple[int, ...] = ()


ROOT_CREDENTIALS = Credentials(0, 0, ())


@dataclass(frozen=True)
class RequestContext:
    """Identity and ordering of one mutating request.

    Client contract (exactly-once): ``seq`` numbers a client's requests within its
    session, starting anywhere >= 0 and never reused; a retry resends the same ``seq``
    (and the same op).  ``ack_seq`` is the lowest ``seq`` whose reply the client has not
    yet received (or the next ``seq`` to use when nothing is outstanding): the
    namespace may forget every reply below it.  A client never has requests outstanding
    at ``seq >= ack_seq + REPLY_WINDOW``.  A request with ``seq`` below a previously
    acknowledged ``ack_seq``, with ``ack_seq > seq``, or beyond the window gets
    PROTOCOL_ERRNO and has no effect.
    """

    client: ClientId
    seq: SequenceNumber
    ack_seq: SequenceNumber
    credentials: Credentials


@dataclass(frozen=True)
class Attr:
    """The attributes of one inode (``stat`` plus the paxfs placement fields).

    ``size`` of a directory is its number of entries; of a symlink, the target length.
    ``blocks`` counts 512-byte units of chunk data actually stored (holes excluded).
    """

    ino: InodeId
    generation: int
    mode: int
    nlink: int
    uid: int
    gid: int
    rdev: int
    size: int
    blocks: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    goal: int
    compress: bool


@dataclass(frozen=True)
class DirEntry:
    """One readdir entry; pass ``cookie`` back to continue after it."""

    name: bytes
    cookie: int
    attr: Attr


@dataclass(frozen=True)
class ChunkInfo:
    """Chunk ``index`` of a file covers bytes [index * chunk_size, +length)."""

    index: int
    chunk: ChunkId
    version: ChunkVersion
    length: int


@dataclass(frozen=True)
class ChunkWrite:
    """A finished write into one chunk: its id and version as OpenChunk handed them out,
    and the end of the written data within the chunk (bytes from the chunk start)."""

    index: int
    chunk: ChunkId
    version: ChunkVersion
    end: int


@dataclass(frozen=True)
class ChunkGoal:
    """One chunk in a healing scan: where it belongs and how many replicas it wants.

    ``opened_ns`` is set while ``version`` is open for write (the time of the OpenChunk
    that made it, never committed since; or of the RecoverChunk that made it, then
    ``recovering``); None once a commit or a recovery closed it.
    """

    inode: InodeId
    index: int
    chunk: ChunkId
    version: ChunkVersion
    length: int
    goal: int
    compress: bool
    opened_ns: int | None
    recovering: bool


@dataclass(frozen=True)
class DeletedChunk:
    """Every replica of ``chunk`` whose version is <= ``version`` is garbage.

    When the chunk is no longer referenced, ``version`` is its last version, so all its
    replicas are garbage; when a write bumped the version, only stale replicas are.
    """

    chunk: ChunkId
    version: ChunkVersion


@dataclass(frozen=True)
class DataserverModeEntry:
    """A row of the replicated dataserver-mode table: an admin set ``mode``
    (DECOMMISSION or MAINTENANCE, never NORMAL) on ``dataserver`` at ``since_ns`` (the
    command's time), when it was last known at ``address``."""

    dataserver: DataserverId
    mode: DataserverMode
    since_ns: int
    address: str


# ---------------------------------------------------------------- replies


@message("ns.error")
@dataclass(frozen=True)
class NsError:
    """The op failed with POSIX ``errno`` and changed nothing."""

    errno: int


@message("ns.ok")
@dataclass(frozen=True)
class OkReply:
    """The op succeeded and has nothing to report."""


@message("ns.entry")
@dataclass(frozen=True)
class EntryReply:
    """A name now refers to (or was found to refer to) this inode."""

    attr: Attr


@message("ns.made")
@dataclass(frozen=True)
class MadeReply:
    """What mknod, create, mkdir, symlink and link answer on the wire: the inode the new
    name refers to, and the directory's attributes as the leader answered (None if it
    is gone by then), like NFSv3's post-operation attributes: a client that caches
    attributes need not ask for the changed directory's again."""

    attr: Attr
    parent: Attr | None


@message("ns.dirs_changed")
@dataclass(frozen=True)
class DirsChangedReply:
    """What unlink, rmdir and rename answer on the wire: the attributes of the
    directories whose entries changed (those still there), as the leader answered."""

    dirs: tuple[Attr, ...]


@message("ns.attr")
@dataclass(frozen=True)
class AttrReply:
    attr: Attr


@message("ns.readdir_reply")
@dataclass(frozen=True)
class ReadDirReply:
    """Entries in cookie order after the requested cookie; ``eof`` when none follow."""

    entries: tuple[DirEntry, ...]
    eof: bool


@message("ns.readlink_reply")
@dataclass(frozen=True)
class ReadLinkReply:
    target: bytes


@message("ns.xattr_reply")
@dataclass(frozen=True)
class XattrReply:
    value: bytes


@message("ns.xattr_list_reply")
@dataclass(frozen=True)
class XattrListReply:
    """Names in byte order."""

    names: tuple[bytes, ...]


@message("ns.statfs_reply")
@dataclass(frozen=True)
class StatFsReply:
    """Namespace counters.  Free space is the cluster manager's to add."""

    inodes: int
    inodes_max: int
    files: int
    directories: int
    chunks: int
    chunk_bytes: int
    """Sum of chunk lengths: the data stored once."""
    replicated_bytes: int
    """Sum of chunk length x goal: the raw space the data should occupy."""
    open_unlinked: int
    """Unlinked inodes kept alive by an open file."""
    deletion_queue: int
    sessions: int
    chunk_size: int
    name_max: int


@message("ns.chunk_reply")
@dataclass(frozen=True)
class ChunkReply:
    """A chunk opened for writing at ``version``.

    ``length`` is its committed length: bytes a replica holds past it are not file
    data (a replica adopting ``version`` must drop them or a later extension would
    expose them).
    """

    chunk: ChunkId
    version: ChunkVersion
    length: int
    goal: int
    compress: bool


@message("ns.chunk_list_reply")
@dataclass(frozen=True)
class ChunkListReply:
    """Chunks of a file from the requested index on (holes absent); ``more`` when the
    page stopped before the last chunk.  Bytes past a chunk's length and up to ``size``
    read as zeros."""

    size: int
    chunk_size: int
    chunks: tuple[ChunkInfo, ...]
    more: bool


@message("ns.deletions_reply")
@dataclass(frozen=True)
class DeletionsReply:
    """The oldest entries of the deletion queue; ``total`` is its whole length."""

    entries: tuple[DeletedChunk, ...]
    total: int


@message("ns.chunk_scan_reply")
@dataclass(frozen=True)
class ChunkScanReply:
    """One page of a scan over every referenced chunk in (inode, index) order.

    Continue with ``ScanChunks(next_inode, next_index)`` until ``done``.
    """

    entries: tuple[ChunkGoal, ...]
    next_inode: InodeId
    next_index: int
    done: bool


@message("ns.dataserver_modes_reply")
@dataclass(frozen=True)
class DataserverModesReply:
    """The whole dataserver-mode table (at most DATASERVER_MODES_MAX rows), by id."""

    entries: tuple[DataserverModeEntry, ...]


@message("ns.session_reply")
@dataclass(frozen=True)
class SessionReply:
    """A new session; keep it alive at least every ``timeout_ns``."""

    client: ClientId
    timeout_ns: int


@message("ns.expire_reply")
@dataclass(frozen=True)
class ExpireReply:
    expired: tuple[ClientId, ...]


# ---------------------------------------------------------------- mutating ops


@message("ns.mknod")
@dataclass(frozen=True)
class Mknod:
    """Create a regular file, fifo, socket or device (``mode`` carries the type bits;
    none means regular).  ``mode`` is already masked by the caller's umask.

    Errors: ENOENT/ENOTDIR (parent), EINVAL/ENAMETOOLONG (name), EEXIST (name taken,
    ``.`` or ``..``), EPERM (S_IFDIR, or a device by a non-root caller), EINVAL (other
    types, bad mode/rdev), ENOSPC (inode limit).
    """

    parent: InodeId
    name: bytes
    mode: int
    rdev: int = 0


@message("ns.create")
@dataclass(frozen=True)
class Create:
    """open(2) with O_CREAT: create a regular file and open it for the session.

    When the name exists: EEXIST if ``exclusive`` (O_EXCL), EISDIR for a directory,
    otherwise the existing inode is opened unchanged.  Other errors as :class:`Mknod`,
    plus EMFILE (session open limit).
    """

    parent: InodeId
    name: bytes
    mode: int
    exclusive: bool


@message("ns.mkdir")
@dataclass(frozen=True)
class Mkdir:
    """Create a directory; S_ISUID/S_ISGID in ``mode`` are ignored, S_ISGID is
    inherited from a setgid parent.  Errors as :class:`Mknod`."""

    parent: InodeId
    name: bytes
    mode: int


@message("ns.symlink")
@dataclass(frozen=True)
class Symlink:
    """Create a symlink.  Target errors: ENOENT (empty), ENAMETOOLONG, EINVAL (NUL)."""

    parent: InodeId
    name: bytes
    target: bytes


@message("ns.link")
@dataclass(frozen=True)
class Link:
    """Add a hard link.  ENOENT (inode gone or unlinked), EPERM (a directory), EMLINK,
    EEXIST, and the parent/name errors of :class:`Mknod`."""

    inode: InodeId
    new_parent: InodeId
    new_name: bytes


@message("ns.unlink")
@dataclass(frozen=True)
class Unlink:
    """Remove a non-directory name.  ENOENT, ENOTDIR (parent), EISDIR (a directory, or
    ``.``/``..``), EPERM (sticky parent, caller owns neither entry nor parent).

    The inode lives on while it has links or is open in some session; then its chunks
    go to the deletion queue.
    """

    parent: InodeId
    name: bytes


@message("ns.rmdir")
@dataclass(frozen=True)
class Rmdir:
    """Remove an empty directory.  ENOENT, ENOTDIR, ENOTEMPTY (also for ``..``),
    EINVAL (``.``), EPERM (sticky parent)."""

    parent: InodeId
    name: bytes


@message("ns.rename")
@dataclass(frozen=True)
class Rename:
    """renameat2(2).  ``flags``: 0, RENAME_NOREPLACE or RENAME_EXCHANGE.

    Errors in Linux's order: EINVAL (flags), ENOENT/ENOTDIR (parents), EBUSY (``.`` or
    ``..``; EEXIST for a ``.``/``..`` target with NOREPLACE), ENOENT (no source; no
    target with EXCHANGE), EEXIST (NOREPLACE and the target exists), EINVAL (a directory
    moved under itself), ENOTEMPTY (target is an ancestor of the source; EINVAL with
    EXCHANGE), success without effect (both names are the same inode), EPERM (sticky),
    ENOTDIR / EISDIR (directory over non-directory and back), ENOTEMPTY (target
    directory not empty).
    """

    old_parent: InodeId
    old_name: bytes
    new_parent: InodeId
    new_name: bytes
    flags: int = 0


@message("ns.setattr")
@dataclass(frozen=True)
class SetAttr:
    """Change attributes; ``None`` leaves a field alone; all or nothing.

    * ``mode``: owner or root, else EPERM — except that anyone may only *clear*
      S_ISUID/S_ISGID of a regular file (the FUSE kernel module does so after a write
      by a non-owner).  S_ISGID is dropped when the caller is neither root nor in the
      file's group.  EOPNOTSUPP on a symlink.
    * ``uid``/``gid``: chown(2) rules (EPERM); clears S_ISUID (and S_ISGID when
      group-executable or the caller is outside the group and not root) of a
      non-directory.
    * ``size``: truncate or extend a regular file (EISDIR, EINVAL, EFBIG); chunks past
      the end go to the deletion queue, the last one is cut; sets mtime/ctime; a
      non-root caller clears S_ISUID/S_ISGID as a write does.
    * times: ``*_now`` sets "now" (owner, root, or write permission, else EACCES);
      explicit values need owner or root (EPERM).
    """

    inode: InodeId
    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    size: int | None = None
    atime_ns: int | None = None
    atime_now: bool = False
    mtime_ns: int | None = None
    mtime_now: bool = False


@message("ns.setxattr")
@dataclass(frozen=True)
class SetXattr:
    """setxattr(2).  ERANGE (name length), EOPNOTSUPP (no known namespace prefix),
    EINVAL (flags, empty name after prefix), E2BIG (value), EEXIST (XATTR_CREATE),
    ENODATA (XATTR_REPLACE), EPERM (user.* on a special file or on a sticky directory
    not owned; trusted.* by non-root), ENOSPC (inode xattr limits)."""

    inode: InodeId
    name: bytes
    value: bytes
    flags: int = 0


@message("ns.removexattr")
@dataclass(frozen=True)
class RemoveXattr:
    """removexattr(2): ENODATA when absent; name and permission errors as SetXattr."""

    inode: InodeId
    name: bytes


@message("ns.setgoal")
@dataclass(frozen=True)
class SetGoal:
    """Set the replication goal (1..GOAL_MAX) and/or compression flag of one inode;
    new children of a directory inherit them.  Owner or root, else EPERM."""

    inode: InodeId
    goal: int | None = None
    compress: bool | None = None


@message("ns.open")
@dataclass(frozen=True)
class Open:
    """Count an open of a non-directory for the calling session (EISDIR, ENOENT,
    EMFILE): an unlinked inode keeps its data until its last open is released."""

    inode: InodeId


@message("ns.release")
@dataclass(frozen=True)
class Release:
    """Release one open of the calling session (EBADF if it holds none)."""

    inode: InodeId


@message("ns.release_many")
@dataclass(frozen=True)
class ReleaseMany:
    """Release one open of the calling session per listed inode (an inode listed twice
    releases two), as one command: a client closing many files pays for one log slot
    share, not one per file.  Inodes the session holds no (more) open of are skipped:
    their opens ended with an earlier session.  EINVAL past ``RELEASE_MANY_MAX``."""

    inodes: tuple[InodeId, ...]


@message("ns.open_chunk")
@dataclass(frozen=True)
class OpenChunk:
    """Open chunk ``index`` of a regular file for writing.

    A hole gets a new chunk id at version 1 (recorded with length 0); an existing chunk
    gets its version bumped, which fences writers holding the old version (their commit
    gets ESTALE) and queues the old version's replicas for deletion.  The new version
    stays *open* (not copied by re-replication) from the command's time until a
    CommitWrite names it, a newer OpenChunk replaces it, the chunk leaves the file, or
    the leader recovers it (RecoverChunk).  EISDIR/EINVAL (not a regular file), EINVAL
    (negative index), EFBIG (past the largest file), ENFILE (OPEN_CHUNKS_MAX open).
    """

    inode: InodeId
    index: int


@message("ns.commit_write")
@dataclass(frozen=True)
class CommitWrite:
    """Publish finished writes: each chunk's length becomes max(length, end), the file
    size max(size, end of written data); mtime and ctime become ``mtime_ns`` (or now).

    All or nothing: ESTALE when a chunk is no longer at that index with that version
    (truncated away or reopened by another writer), EINVAL for duplicate indices, ends
    outside 0..chunk_size, or more than COMMIT_CHUNKS_MAX writes.  Like write(2), a
    non-root writer clears S_ISUID (and S_ISGID when group-executable or the writer is
    outside the file's group).
    """

    inode: InodeId
    writes: tuple[ChunkWrite, ...]
    mtime_ns: int | None = None


# ---------------------------------------------------------------- read-only ops


@message("ns.lookup")
@dataclass(frozen=True)
class Lookup:
    """Find ``name`` in a directory (``.`` and ``..`` included).  ENOENT, ENOTDIR,
    EINVAL/ENAMETOOLONG (bad name)."""

    parent: InodeId
    name: bytes


@message("ns.getattr")
@dataclass(frozen=True)
class GetAttr:
    """Attributes of any live inode, including unlinked-but-open ones (ENOENT)."""

    inode: InodeId


@message("ns.readdir")
@dataclass(frozen=True)
class ReadDir:
    """List entries after ``cookie`` (0 = from the start), at most ``limit`` of them
    (1..READDIR_PAGE_MAX, larger is clamped; EINVAL below 1 or for a negative cookie).

    Cookies are stable: a listing continued from any cookie never repeats or skips an
    entry that exists throughout, whatever is added or removed meanwhile.  Entries come
    in cookie order, not name order.
    """

    inode: InodeId
    cookie: int = 0
    limit: int = READDIR_PAGE_MAX


@message("ns.readlink")
@dataclass(frozen=True)
class ReadLink:
    """The target of a symlink (EINVAL for other inodes)."""

    inode: InodeId


@message("ns.getxattr")
@dataclass(frozen=True)
class GetXattr:
    """An xattr value (ENODATA when absent or hidden from the caller)."""

    inode: InodeId
    name: bytes


@message("ns.listxattr")
@dataclass(frozen=True)
class ListXattr:
    """xattr names visible to the caller (trusted.* only for root)."""

    inode: InodeId


@message("ns.statfs")
@dataclass(frozen=True)
class StatFs:
    """Namespace-wide counters."""


@message("ns.get_chunks")
@dataclass(frozen=True)
class GetChunks:
    """The chunk list of a regular file for reading, from ``first_index`` on, at most
    ``limit`` (clamped to CHUNK_PAGE_MAX) entries."""

    inode: InodeId
    first_index: int = 0
    limit: int = CHUNK_PAGE_MAX


@message("ns.get_deletions")
@dataclass(frozen=True)
class GetDeletions:
    """The oldest ``limit`` (clamped to CHUNK_PAGE_MAX) entries of the deletion queue."""

    limit: int = CHUNK_PAGE_MAX


@message("ns.scan_chunks")
@dataclass(frozen=True)
class ScanChunks:
    """Every referenced chunk with its goal, from (``inode``, ``index``) on in order."""

    inode: InodeId = InodeId(0)
    index: int = 0
    limit: int = CHUNK_PAGE_MAX


@message("ns.get_dataserver_modes")
@dataclass(frozen=True)
class GetDataserverModes:
    """The dataserver-mode table (for the cluster manager; no RPC method)."""


# ---------------------------------------------------------------- session and system ops


@message("ns.open_session")
@dataclass(frozen=True)
class OpenSession:
    """Open a session with a new client id (EUSERS past SESSIONS_MAX).  Not
    deduplicated: a retried open leaves an unused session that simply expires."""


@message("ns.keep_alive")
@dataclass(frozen=True)
class KeepAlive:
    """Renew a session (SESSION_EXPIRED_ERRNO if it is gone)."""

    client: ClientId


@message("ns.close_session")
@dataclass(frozen=True)
class CloseSession:
    """End a session and release its opens.  Idempotent: closing a closed session is OK."""

    client: ClientId


@message("ns.expire_sessions")
@dataclass(frozen=True)
class ExpireSessions:
    """End every session not renewed within the session timeout before the command's
    time (leader-proposed)."""


@message("ns.ack_deletions")
@dataclass(frozen=True)
class AckDeletions:
    """The cluster manager deleted these replicas: drop the queue entries whose version
    is <= the acknowledged one (at most CHUNK_PAGE_MAX; EINVAL beyond)."""

    entries: tuple[DeletedChunk, ...]


@message("ns.set_dataserver_mode")
@dataclass(frozen=True)
class SetDataserverMode:
    """An admin decommissions a dataserver or puts it in maintenance; NORMAL removes its
    row (OK when there is none).  Setting the mode a row already has keeps its time, so
    a retried command changes nothing.  EINVAL for an id outside 1..2**64-1 or an
    address longer than DATASERVER_ADDRESS_MAX_BYTES; EUSERS for a new row past
    DATASERVER_MODES_MAX (leader-proposed, from the admin RPC)."""

    dataserver: DataserverId
    mode: DataserverMode
    address: str


@message("ns.recover_chunk")
@dataclass(frozen=True)
class RecoverChunk:
    """Start recovering a chunk version left open (leader-proposed, once no token for it
    is accepted any more, or at once for a recovery a previous attempt left open): the
    chunk moves to ``version + 1`` with its committed length (the file size does not
    change), the old version's replicas are queued for deletion, and the new version is
    open, *recovering*, since this command's time.  No client ever gets a token for it:
    the leader derives it on one replica and then sends :class:`CommitRecovery`.

    ESTALE unless ``chunk`` is at ``version``, still open since ``opened_ns`` (a commit,
    a newer open or a truncate came first).
    """

    chunk: ChunkId
    version: ChunkVersion
    opened_ns: int


@message("ns.commit_recovery")
@dataclass(frozen=True)
class CommitRecovery:
    """Finish a recovery: the recovering ``version`` (opened at ``opened_ns`` by a
    :class:`RecoverChunk`) is held by the replica the leader derived it on, and closes.
    ESTALE unless the chunk is still recovering at that version since that time."""

    chunk: ChunkId
    version: ChunkVersion
    opened_ns: int


MutatingOp = (
    Mknod
    | Create
    | Mkdir
    | Symlink
    | Link
    | Unlink
    | Rmdir
    | Rename
    | SetAttr
    | SetXattr
    | RemoveXattr
    | SetGoal
    | Open
    | Release
    | ReleaseMany
    | OpenChunk
    | CommitWrite
)
QueryOp = (
    Lookup
    | GetAttr
    | ReadDir
    | ReadLink
    | GetXattr
    | ListXattr
    | StatFs
    | GetChunks
    | GetDeletions
    | ScanChunks
    | GetDataserverModes
)
SessionOp = OpenSession | KeepAlive | CloseSession
SystemOp = ExpireSessions | AckDeletions | SetDataserverMode | RecoverChunk | CommitRecovery
Reply = (
    NsError
    | OkReply
    | EntryReply
    | AttrReply
    | ReadDirReply
    | ReadLinkReply
    | XattrReply
    | XattrListReply
    | StatFsReply
    | ChunkReply
    | ChunkListReply
    | DeletionsReply
    | ChunkScanReply
    | SessionReply
    | ExpireReply
    | DataserverModesReply
)


# ---------------------------------------------------------------- calls and log commands


@message("ns.mutation_call")
@dataclass(frozen=True)
class MutationCall:
    """A client's mutating request as sent over RPC (see :class:`RequestContext`)."""

    context: RequestContext
    op: MutatingOp


@message("ns.query_call")
@dataclass(frozen=True)
class QueryCall:
    """A client's read-only request as sent over RPC."""

    credentials: Credentials
    op: QueryOp


@message("ns.client_command")
@dataclass(frozen=True)
class ClientCommand:
    """Log command: a client's mutation stamped with the leader's time."""

    time_ns: int
    call: MutationCall


@message("ns.session_command")
@dataclass(frozen=True)
class SessionCommand:
    """Log command: a session op stamped with the leader's time."""

    time_ns: int
    op: SessionOp


@message("ns.system_command")
@dataclass(frozen=True)
class SystemCommand:
    """Log command the leader proposes on its own, stamped with its time."""

    time_ns: int
    op: SystemOp


Command = ClientCommand | SessionCommand | SystemCommand

MUTATING_OPS: tuple[type, ...] = MutatingOp.__args__
QUERY_OPS: tuple[type, ...] = QueryOp.__args__
SESSION_OPS: tuple[type, ...] = SessionOp.__args__
SYSTEM_OPS: tuple[type, ...] = SystemOp.__args__
COMMAND_TYPES: tuple[type, ...] = (ClientCommand, SessionCommand, SystemCommand)
REPLY_TYPES: tuple[type, ...] = Reply.__args__

COMMAND_BYTES_MAX = 16 << 20
"""Largest encoded log command accepted by :func:`decode_command`."""


def encode_command(command: Command) -> bytes:
    """Log bytes of ``command`` (tagged msgpack; deterministic for equal commands)."""
    packed: bytes = msgpack.packb(schema.encode_tagged(command), use_bin_type=True)
    return packed


def decode_command(raw: bytes) -> Command:
    """The command in ``raw``; raises :class:`~wire.schema.SchemaError` if malformed."""
    if len(raw) > COMMAND_BYTES_MAX:
        raise schema.SchemaError(f"command of {len(raw)} bytes exceeds {COMMAND_BYTES_MAX}")
    try:
        value: Any = msgpack.unpackb(raw, raw=False, strict_map_key=False)
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError) as error:
        raise schema.SchemaError(f"command is not msgpack: {error}") from None
    command: Command = schema.decode_tagged(value, COMMAND_TYPES)
    return command


# ---------------------------------------------------------------- RPC methods

MKNOD = Method("ns.mknod", MutationCall, MadeReply)
CREATE = Method("ns.create", MutationCall, MadeReply)
MKDIR = Method("ns.mkdir", MutationCall, MadeReply)
SYMLINK = Method("ns.symlink", MutationCall, MadeReply)
LINK = Method("ns.link", MutationCall, MadeReply)
UNLINK = Method("ns.unlink", MutationCall, DirsChangedReply)
RMDIR = Method("ns.rmdir", MutationCall, DirsChangedReply)
RENAME = Method("ns.rename", MutationCall, DirsChangedReply)
SETATTR = Method("ns.setattr", MutationCall, AttrReply)
SETXATTR = Method("ns.setxattr", MutationCall, OkReply)
REMOVEXATTR = Method("ns.removexattr", MutationCall, OkReply)
SETGOAL = Method("ns.setgoal", MutationCall, AttrReply)
OPEN = Method("ns.open", MutationCall, AttrReply)
RELEASE = Method("ns.release", MutationCall, OkReply)
RELEASE_MANY = Method("ns.release_many", MutationCall, OkReply)
OPEN_CHUNK = Method("ns.open_chunk", MutationCall, ChunkReply)
COMMIT_WRITE = Method("ns.commit_write", MutationCall, AttrReply)

LOOKUP = Method("ns.lookup", QueryCall, EntryReply)
GETATTR = Method("ns.getattr", QueryCall, AttrReply)
READDIR = Method("ns.readdir", QueryCall, ReadDirReply)
READLINK = Method("ns.readlink", QueryCall, ReadLinkReply)
GETXATTR = Method("ns.getxattr", QueryCall, XattrReply)
LISTXATTR = Method("ns.listxattr", QueryCall, XattrListReply)
STATFS = Method("ns.statfs", QueryCall, StatFsReply)
GET_CHUNKS = Method("ns.get_chunks", QueryCall, ChunkListReply)
GET_DELETIONS = Method("ns.get_deletions", QueryCall, DeletionsReply)
SCAN_CHUNKS = Method("ns.scan_chunks", QueryCall, ChunkScanReply)

OPEN_SESSION = Method("ns.open_session", OpenSession, SessionReply)
KEEP_ALIVE = Method("ns.keep_alive", KeepAlive, OkReply)
CLOSE_SESSION = Method("ns.close_session", CloseSession, OkReply)

METHOD_OF_OP: dict[type, Method[Any, Any]] = {
    Mknod: MKNOD,
    Create: CREATE,
    Mkdir: MKDIR,
    Symlink: SYMLINK,
    Link: LINK,
    Unlink: UNLINK,
    Rmdir: RMDIR,
    Rename: RENAME,
    SetAttr: SETATTR,
    SetXattr: SETXATTR,
    RemoveXattr: REMOVEXATTR,
    SetGoal: SETGOAL,
    Open: OPEN,
    Release: RELEASE,
    ReleaseMany: RELEASE_MANY,
    OpenChunk: OPEN_CHUNK,
    CommitWrite: COMMIT_WRITE,
    Lookup: LOOKUP,
    GetAttr: GETATTR,
    ReadDir: READDIR,
    ReadLink: READLINK,
    GetXattr: GETXATTR,
    ListXattr: LISTXATTR,
    StatFs: STATFS,
    GetChunks: GET_CHUNKS,
    GetDeletions: GET_DELETIONS,
    ScanChunks: SCAN_CHUNKS,
    OpenSession: OPEN_SESSION,
    KeepAlive: KEEP_ALIVE,
    CloseSession: CLOSE_SESSION,
}
"""The RPC method of each client-callable op.  The server must check that the op inside
a call's body is the one its method name promises (``METHOD_OF_OP[type(op)] is method``)."""

METHODS: tuple[Method[Any, Any], ...] = tuple(METHOD_OF_OP.values())


def method_for(op: object) -> Method[Any, Any]:
    """The RPC method that carries ``op`` (KeyError for a log-only op)."""
    return METHOD_OF_OP[type(op)]
