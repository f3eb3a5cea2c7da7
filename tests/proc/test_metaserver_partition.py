"""A minority cut off from the rest serves neither reads nor writes, and catches up after.

Every metaserver reaches its peers only through :mod:`tests.proc.fault_proxy` proxies;
clients dial the real addresses, so a client can still talk to the cut-off replica (a
client on the minority side of the partition).  Randomised: prints its seed.
"""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import trio

from fuse_client.meta_client import open_meta_client
from tests.proc.fault_proxy import ProxyMesh
from tests.proc.metaserver_harness import (
    MetaserverGroup,
    NamespaceWorkload,
    metaserver_group,
    seed_for,
)
from wire.errors import RpcError
from wire.ids import ROOT_INODE
from wire.namespace_ops import Lookup, Mknod

MINORITY_NO_QUORUM_TIMEOUT_S = 2.0


async def test_a_cut_off_leader_serves_nothing_and_catches_up_when_healed(
    tmp_path: Path,
) -> None:
    seed = seed_for("partition")
    async with trio.open_nursery() as proxies:
        mesh: ProxyMesh | None = None

        async def through_proxies(group: MetaserverGroup) -> None:
            nonlocal mesh
            mesh = ProxyMesh({i: n.address for i, n in group.nodes.items()})
            await mesh.start(proxies)
            for node_id in group.nodes:
                group.write_node_config(node_id, metaservers=mesh.view_of(node_id))

        async with metaserver_group(tmp_path, prepare=through_proxies) as group:
            assert mesh is not None
            cut_off = await group.wait_for_leader()
            majority = [i for i in group.nodes if i != cut_off]
            async with (
                group.client(name="majority") as client,
                open_meta_client(
                    [group.nodes[cut_off].address],
                    group.key,
                    name="minority",
                    no_quorum_timeout_s=MINORITY_NO_QUORUM_TIMEOUT_S,
                ) as minority,
            ):
                workload = NamespaceWorkload([client], seed)
                stop = trio.Event()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(workload.run, stop)
                    await trio.sleep(0.5)
                    mesh.isolate({cut_off})
                    new_leader = await group.wait_for_leader(among=majority)
                    assert new_leader != cut_off
                    await client.mutate(Mknod(ROOT_INODE, b"written-by-the-majority", 0o644))

                    # The minority neither reads (not even stale data) nor writes.
                    with pytest.raises(RpcError) as read_error:
                        await minority.query(Lookup(ROOT_INODE, b"written-by-the-majority"))
                    assert read_error.value.code == errno.ETIMEDOUT
                    with pytest.raises(RpcError) as write_error:
                        await minority.mutate(Mknod(ROOT_INODE, b"written-by-the-minority", 0o644))
                    assert write_error.value.code == errno.ETIMEDOUT
                    status = await group.status(cut_off)
                    assert status is not None and status.role != "leader"

                    mesh.heal_all()
                    await trio.sleep(0.5)
                    stop.set()
                assert not workload.errors, workload.errors[:5]
                await workload.verify(client)
                await client.query(Lookup(ROOT_INODE, b"written-by-the-majority"))
                with pytest.raises(RpcError) as absent:
                    await client.query(Lookup(ROOT_INODE, b"written-by-the-minority"))
                assert absent.value.code == errno.ENOENT
            digests = await group.wait_equal_digests(list(group.nodes))
            assert digests[cut_off].applied_index == digests[new_leader].applied_index
        proxies.cancel_scope.cancel()
