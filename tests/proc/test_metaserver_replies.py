"""What the leader answers a change of directory entries with: the changed directories'
attributes as they are after it (like NFSv3's post-operation attributes), so that a
mount can cache them instead of asking again.  Real processes on loopback.
"""

from __future__ import annotations

from pathlib import Path

from fuse_client.meta_client import MetaClient
from tests.proc.metaserver_harness import metaserver_group
from wire.ids import ROOT_INODE, InodeId
from wire.namespace_ops import (
    Attr,
    Create,
    GetAttr,
    Link,
    MadeReply,
    Mkdir,
    Mknod,
    Rename,
    Rmdir,
    Symlink,
    Unlink,
)


async def attr_now(client: MetaClient, inode: InodeId) -> Attr:
    attr: Attr = (await client.query(GetAttr(inode))).attr
    return attr


async def test_name_changes_answer_with_the_directories_as_they_are_after(
    tmp_path: Path,
) -> None:
    async with metaserver_group(tmp_path) as group, group.client() as client:
        made: MadeReply = await client.mutate(Mkdir(ROOT_INODE, b"a", 0o755))
        a = made.attr.ino
        assert made.parent == await attr_now(client, ROOT_INODE)
        b = (await client.mutate(Mkdir(ROOT_INODE, b"b", 0o755))).attr.ino
        before = await attr_now(client, a)

        for op in (
            Mknod(a, b"node", 0o644),
            Create(a, b"file", 0o644, exclusive=True),
            Symlink(a, b"link", b"node"),
            Mkdir(a, b"sub", 0o755),
        ):
            reply = await client.mutate(op)
            assert reply.parent == await attr_now(client, a), op
        assert reply.parent.nlink == before.nlink + 1 and reply.parent.size == before.size + 4
        file = (await client.mutate(Create(a, b"file", 0o644, exclusive=False))).attr
        linked = await client.mutate(Link(file.ino, b, b"hard"))
        assert linked.parent == await attr_now(client, b)

        unlinked = await client.mutate(Unlink(a, b"node"))
        assert unlinked.dirs == (await attr_now(client, a),)
        moved = await client.mutate(Rename(a, b"file", b, b"moved"))
        assert moved.dirs == (await attr_now(client, a), await attr_now(client, b))
        renamed = await client.mutate(Rename(b, b"moved", b, b"again"))
        assert renamed.dirs == (await attr_now(client, b),)
        removed = await client.mutate(Rmdir(a, b"sub"))
        after = await attr_now(client, a)
        assert removed.dirs == (after,) and after.nlink == before.nlink
