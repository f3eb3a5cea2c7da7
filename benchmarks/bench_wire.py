"""Wire benchmark: small-call rate and bulk payload throughput over loopback.

Run ``python -m benchmarks.bench_wire``.  The server runs in a separate
process (as it would in a cluster), the client here; both on 127.0.0.1.
Prints the p50 latency of one small call at a time, small calls/s with 64
concurrent calls on one connection (with the CPU time each side spends per
call: what bounds a busy server) for both kinds of handler (a task per call,
and an immediate handler, which the metaserver's namespace calls use), one-way
messages/s, and MiB/s of 4 MiB payloads sent to the server (upload) and fetched
from it (download), beside a
baseline: raw ``send_all``/``receive_some`` of the same bytes over a plain trio
TCP stream, measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import dataclass

import trio

from wire import schema
from wire.address import Address
from wire.rpc import CallContext, Handlers, RpcConnection, WithPayload
from wire.transport import bound_port, open_connection, serve

KEY = b"benchmark-cluster-key-0123456789"
PAYLOAD_BYTES = 4 * 1024 * 1024


@schema.message("bench.ping")
@dataclass(frozen=True)
class Ping:
    value: int


PING = schema.Method("bench.ping", Ping, Ping)
PING_IMMEDIATE = schema.Method("bench.ping_immediate", Ping, Ping)
NOTE = schema.Method("bench.note", Ping, type(None), one_way=True)
UPLOAD = schema.Method("bench.upload", Ping, Ping, carries_payload=True)
DOWNLOAD = schema.Method("bench.download", Ping, Ping, returns_payload=True)

_blob = bytes(PAYLOAD_BYTES)


async def _ping(request: Ping, _context: CallContext) -> Ping:
    return Ping(request.value + 1)


def _ping_immediately(request: Ping, _context: CallContext) -> Ping:
    return Ping(request.value + 1)


async def _note(_request: Ping, _context: CallContext) -> None:
    return None


async def _upload(_request: Ping, context: CallContext) -> Ping:
    return Ping(len(context.payload or b""))


async def _download(request: Ping, _context: CallContext) -> WithPayload[Ping]:
    return WithPayload(Ping(request.value), memoryview(_blob)[: request.value])


async def _raw_sink(stream: trio.SocketStream) -> None:
    while await stream.receive_some(4 * 1024 * 1024):
        pass


async def run_server(port_file: str) -> None:
    handlers = Handlers()
    handlers.register(PING, _ping)
    handlers.register_immediate(PING_IMMEDIATE, _ping_immediately)
    handlers.register(NOTE, _note)
    handlers.register(UPLOAD, _upload)
    handlers.register(DOWNLOAD, _download)
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(serve, handlers, KEY, Address("127.0.0.1", 0))
        raw = await nursery.start(trio.serve_tcp, _raw_sink, 0)
        raw_port = raw[0].socket.getsockname()[1]
        with open(port_file + ".tmp", "w") as out:
            out.write(f"{bound_port(listeners)} {raw_port}")
        os.rename(port_file + ".tmp", port_file)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (from /proc)."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def run_client(port: int, raw_port: int, seconds: float, server_pid: int) -> None:
    address = Address("127.0.0.1", port)
    async with open_connection(address, KEY, name="bench") as connection:
        latencies = []
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            await connection.call(PING, Ping(0), timeout_s=10.0)
            latencies.append(time.perf_counter() - started)
        latencies.sort()
        p50_us = latencies[len(latencies) // 2] * 1e6
        print(f"one call at a time:                  p50 {p50_us:8,.0f} us")

        for method, label in ((PING, "task per call"), (PING_IMMEDIATE, "immediate handler")):
            rate, client_us, server_us = await _concurrent_calls(
                connection, method, seconds, server_pid
            )
            print(
                f"small calls, 64 concurrent, one connection, {label + ':':19}"
                f" {rate:8,.0f} calls/s  (CPU us/call: client {client_us:.0f},"
                f" server {server_us:.0f})"
            )

        notes = 0
        started = time.perf_counter()
        while time.perf_counter() - started < seconds:
            await connection.notify(NOTE, Ping(notes))
            notes += 1
        await connection.call(PING, Ping(0), timeout_s=30.0)  # every note was handled
        rate = notes / (time.perf_counter() - started)
        print(f"one-way messages, one sender:        {rate:10,.0f} messages/s")

        upload_mib_s = await _measure(
            seconds, lambda: connection.call(UPLOAD, Ping(0), payload=_blob)
        )
        download_mib_s = await _measure(
            seconds, lambda: connection.call_with_payload(DOWNLOAD, Ping(PAYLOAD_BYTES))
        )

    raw_stream = await trio.open_tcp_stream("127.0.0.1", raw_port)
    raw_mib_s = await _measure(seconds, lambda: raw_stream.send_all(_blob))
    await raw_stream.aclose()
    for label, mib_s in (("upload", upload_mib_s), ("download", download_mib_s)):
        print(f"4 MiB payload {label:9} {mib_s:8,.0f} MiB/s  ({mib_s / raw_mib_s:.2f} x raw)")
    print(f"raw TCP send_all:       {raw_mib_s:8,.0f} MiB/s  (baseline)")


async def _concurrent_calls(
    connection: RpcConnection, method: schema.Method[Ping, Ping], seconds: float, server_pid: int
) -> tuple[float, float, float]:
    """Calls/s of 64 callers on one connection, and the CPU us per call on each side."""
    calls = 0
    deadline = time.perf_counter() + seconds

    async def caller() -> None:
        nonlocal calls
        while time.perf_counter() < deadline:
            await connection.call(method, Ping(calls), timeout_s=10.0)
            calls += 1

    started = time.perf_counter()
    client_cpu, server_cpu = time.process_time(), cpu_seconds(server_pid)
    async with trio.open_nursery() as nursery:
        for _ in range(64):
            nursery.start_soon(caller)
    rate = calls / (time.perf_counter() - started)
    client_us = (time.process_time() - client_cpu) * 1e6 / calls
    server_us = (cpu_seconds(server_pid) - server_cpu) * 1e6 / calls
    return rate, client_us, server_us


async def _measure(seconds: float, operation) -> float:  # type: ignore[no-untyped-def]
    count = 0
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        await operation()
        count += 1
    return count * PAYLOAD_BYTES / (1024 * 1024) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--serve", metavar="PORT_FILE", help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=3.0, help="duration of each phase")
    args = parser.parse_args()
    if args.serve:
        trio.run(run_server, args.serve)
        return
    port_file = f"/tmp/paxfs-bench-wire-{os.getpid()}"
    server = subprocess.Popen([sys.executable, "-m", "benchmarks.bench_wire", "--serve", port_file])
    try:
        for _ in range(500):
            if os.path.exists(port_file):
                break
            time.sleep(0.01)
        port, raw_port = (int(x) for x in open(port_file).read().split())
        trio.run(run_client, port, raw_port, args.seconds, server.pid)
    finally:
        server.terminate()
        server.wait()
        if os.path.exists(port_file):
            os.unlink(port_file)


if __name__ == "__main__":
    main()
