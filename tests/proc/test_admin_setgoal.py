"""``paxfs admin setgoal`` against real processes: the cluster converges up and down.

Three metaservers, four dataservers, default goal 3, 256 KiB chunks (see
:mod:`tests.proc.test_cluster_harness`).  Randomised data prints its seed; replay with
``PAXFS_SEED=N``.
"""

from __future__ import annotations

from pathlib import Path

from tests.proc.test_admin_harness import admin, admin_client, admin_json, mkdir, write_in
from tests.proc.test_cluster_harness import (
    CHUNK_BYTES,
    Cluster,
    DataClient,
    running_cluster,
    seeded_rng,
    wait_for,
)
from wire.ids import ROOT_INODE, InodeId


async def replicas_on_disk(cluster: Cluster, client: DataClient, inode: InodeId) -> list[int]:
    """For each chunk of the file: how many running dataservers store its version."""
    located = await client.locate(inode)
    return [len(cluster.holders(c.chunk, c.version)) for c in located.chunks]


async def test_setgoal_up_and_down_converges_on_the_tree_and_nothing_else(
    tmp_path: Path,
) -> None:
    rng = seeded_rng()
    async with running_cluster(tmp_path) as cluster, cluster.client() as client:
        directory = await mkdir(client, ROOT_INODE, b"d")
        inner = await mkdir(client, directory, b"e")
        data = {
            b"x": rng.randbytes(2 * CHUNK_BYTES + 3),
            b"y": rng.randbytes(CHUNK_BYTES // 3),
        }
        tree = {
            b"x": await write_in(client, directory, b"x", data[b"x"]),
            b"y": await write_in(client, inner, b"y", data[b"y"]),
        }
        outside = await client.write_file(b"outside", rng.randbytes(CHUNK_BYTES))

        async with admin_client(cluster) as tool:
            for goal in (4, 1, 2):
                result = await admin_json(cluster, "setgoal", str(goal), "/d", "-r", "--wait")
                assert result == {
                    "path": "/d",
                    "goal": goal,
                    "files": 2,
                    "directories": 2,
                    "converged": True,
                }
                for name, inode in tree.items():
                    view = await tool.file_view(inode)
                    assert view.goal == goal
                    assert all(c.counted == goal and c.health == "healthy" for c in view.chunks)

                    async def on_disk(inode: InodeId = inode, goal: int = goal) -> bool:
                        return set(await replicas_on_disk(cluster, client, inode)) == {goal}

                    await wait_for(on_disk, f"goal {goal} on the dataservers' disks", 10)
                    assert await client.read(inode) == data[name]
                assert await replicas_on_disk(cluster, client, outside) == [3]
        info = await admin_json(cluster, "fileinfo", "/d/e/y")
        assert info["goal"] == 2 and [c["counted"] for c in info["chunks"]] == [2]

        # Without -r only the directory itself changes: new files in it inherit the goal.
        await admin_json(cluster, "setgoal", "4", "/d")
        assert (await admin_json(cluster, "fileinfo", "/d/x"))["goal"] == 2
        late = await write_in(client, directory, b"late", rng.randbytes(CHUNK_BYTES))
        assert (await admin_json(cluster, "fileinfo", "/d/late"))["goal"] == 4
        assert await replicas_on_disk(cluster, client, late) == [4]
        assert (await admin(cluster, "fsck", "/")).returncode == 0
