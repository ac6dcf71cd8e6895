"""TCP stores that listen only on the address a run names, never on every interface.

torch's ``TCPStore`` server binds the wildcard address whatever host it is given (checked with
``ss -ltn`` in torch 2.13: ``*:PORT``), so a run's rendezvous would be reachable from the network
even when it names ``127.0.0.1``. Given a socket that is already bound and listening
(``master_listen_fd``), the store serves on that socket instead; these helpers bind it to the
named address first.

* :func:`listening_store` — a store server on ``(host, port)`` only.
* :func:`loopback_rendezvous` — a store on ``127.0.0.1`` for the elastic agent's c10d rendezvous.
  It is created ``multi_tenant``, so the rendezvous handler's own ``TCPStore(host, port,
  is_master=True, multi_tenant=True)`` in the same process reuses this server instead of binding
  another; agents in other processes (``trainplan launch --on local``) connect to it as clients.
* :func:`join_process_group` — what a worker calls instead of ``init_process_group(env://)``:
  when the workers host their own store (no agent store is shared), rank 0 serves it on
  ``MASTER_ADDR`` only.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from datetime import timedelta

import torch
import torch.distributed as dist

LOOPBACK = "127.0.0.1"


def _listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` (port 0: a free one) and listening."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(1024)
    except OSError:
        sock.close()
        raise
    return sock


def listening_store(host: str, port: int, *, world_size: int | None, timeout: timedelta,
                    multi_tenant: bool = False) -> dist.TCPStore:
    """A ``TCPStore`` server that accepts connections on ``host:port`` only (``port`` 0: a free one).

    The store takes over the socket's file descriptor (``socket.detach``), so it is closed with
    the store, not by Python.
    """
    sock = _listening_socket(host, port)
    bound_port = sock.getsockname()[1]
    return dist.TCPStore(host, bound_port, world_size, True, timeout=timeout, wait_for_workers=False,
                         multi_tenant=multi_tenant, master_listen_fd=sock.detach())


@contextlib.contextmanager
def loopback_rendezvous(timeout_s: float = 600.0) -> Iterator[str]:
    """Host a rendezvous store on ``127.0.0.1`` for the duration; yields its ``host:port`` endpoint."""
    store = listening_store(LOOPBACK, 0, world_size=None, timeout=timedelta(seconds=timeout_s), multi_tenant=True)
    try:
        yield f"{LOOPBACK}:{store.port}"
    finally:
        del store


def join_process_group(backend: str, timeout: timedelta, device: torch.device | None = None) -> None:
    """``init_process_group`` for a worker started by torchrun's agent (``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``/``MASTER_PORT`` in the environment).

    When the agent shares its rendezvous store (``TORCHELASTIC_USE_AGENT_STORE=True``) the workers
    are its clients and ``env://`` is used as is. Otherwise the workers make their own store, and
    rank 0 serves it on ``MASTER_ADDR`` only (every rank passes its store explicitly, so all use the
    same keys).
    """
    device_id = device if device is not None and device.type == "cuda" else None
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        dist.init_process_group(backend, timeout=timeout, device_id=device_id)
        return
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    if rank == 0:
        store = listening_store(host, port, world_size=world, timeout=timeout)
    else:
        store = dist.TCPStore(host, port, world, False, timeout=timeout)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout, device_id=device_id)
