"""Stores listen on the address a run names (loopback here), never on every interface."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from datetime import timedelta
from pathlib import Path

import pytest
import torch.distributed as dist

from trainplan.runtime.stores import listening_store, loopback_rendezvous

LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp


def listeners(port: int) -> set[str]:
    """Local addresses (hex, as /proc/net/tcp{,6} writes them) listening on ``port`` on this host."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not Path(table).exists():
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, hex_port = fields[1].split(":")
            if int(hex_port, 16) == port and fields[3] == LISTEN:
                found.add(address)
    return found


LOOPBACK_HEX = "0100007F"  # 127.0.0.1, little-endian


pytestmark = pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads Linux's /proc/net/tcp")


def test_a_store_listens_only_on_its_host() -> None:
    store = listening_store("127.0.0.1", 0, world_size=1, timeout=timedelta(seconds=10))
    store.set("key", "value")
    client = dist.TCPStore("127.0.0.1", store.port, None, False, timeout=timedelta(seconds=10))
    assert client.get("key") == b"value"
    assert listeners(store.port) == {LOOPBACK_HEX}


def test_the_rendezvous_store_is_reused_by_the_agents_own_store_in_this_process() -> None:
    with loopback_rendezvous(10) as endpoint:
        host, port = endpoint.split(":")
        # what torch's c10d rendezvous handler creates when it hosts (multi-tenant, is_master)
        agent = dist.TCPStore(host, int(port), None, True, timeout=timedelta(seconds=10), multi_tenant=True)
        agent.set("round", "1")
        assert dist.TCPStore(host, int(port), None, False, timeout=timedelta(seconds=10)).get("round") == b"1"
        assert listeners(int(port)) == {LOOPBACK_HEX}
        del agent
    assert listeners(int(port)) == set()


WORKER = textwrap.dedent("""
    import os, sys
    from datetime import timedelta
    import torch, torch.distributed as dist
    from trainplan.runtime.stores import join_process_group
    join_process_group("gloo", timedelta(seconds=30))
    t = torch.ones(1) * (dist.get_rank() + 1)
    dist.all_reduce(t)
    if dist.get_rank() == 0:
        port = int(os.environ["MASTER_PORT"])
        tables = [open(p).read().splitlines()[1:] for p in ("/proc/net/tcp", "/proc/net/tcp6")]
        bound = {l.split()[1].split(":")[0] for rows in tables for l in rows
                 if int(l.split()[1].split(":")[1], 16) == port and l.split()[3] == "0A"}
        print("sum", int(t.item()), "bound", sorted(bound), flush=True)
    dist.barrier()
    dist.destroy_process_group()
""")


@pytest.mark.slow
def test_workers_that_host_their_own_store_listen_on_master_addr_only(repo: Path) -> None:
    from trainplan.runtime.launchers.command import free_port

    port = free_port("127.0.0.1")
    env = {k: v for k, v in os.environ.items() if k != "TORCHELASTIC_USE_AGENT_STORE"}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2")
    procs = [subprocess.Popen([sys.executable, "-c", WORKER], cwd=repo, env={**env, "RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    assert f"sum 3 bound ['{LOOPBACK_HEX}']" in outs[0][0], outs[0]
