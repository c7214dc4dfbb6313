"""Hang detection: the pool probes each worker with a bounded Info call.

A worker process that stops answering (SIGSTOP, a deadlock, a GPU driver hang)
keeps its socket open, so nothing fails: without probes, every call on it waits
for its request's whole deadline. `probe_until_closed` runs one task per worker:

- up, and a probe is not answered within `probe.timeout_s`: the worker is marked
  down (readiness listeners fire, bon_workers_up drops, new groups go to the
  others) and its in-flight calls are cancelled, which their callers take as a
  worker failure and retry on another worker (a scoring group moves with them);
- hung, and a probe is answered: up again;
- hung for `probe.restart_after_s`, and spawned by the pool: SIGKILL; the pool's
  supervisor then restarts it as it does any worker that died (and counts it in
  bon_worker_restarts_total).

An answered probe's Info also carries the worker's HTTP backend servers (backend =
"vllm" / "sglang"): the pool records their figures and takes the worker out of
service while a model of it has no server up (`observe`); that is not a hang.

Probes only run while the worker is up or hung: one that is dead or restarting
is the supervisor's. Remote addresses that may name several workers (a host
name, `dns:///`, a comma list) are not probed: gRPC's round robin would send
one probe in N to a hung one, and the whole address would flap.

Front process: no torch.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Callable

from bon_gateway.logs import log_phase
from bon_gateway.scoring.handle import WorkerHandle

__all__ = ["is_probed", "probe_until_closed"]

log = logging.getLogger("bon_gateway.scoring")


def is_probed(worker: WorkerHandle) -> bool:
    """Whether the pool probes `worker`: spawned ones and remote IP:PORT literals, when
    the model entry's probe interval is not 0."""
    if worker.entry.probe.interval_s <= 0:
        return False
    target = worker.target
    if worker.argv is not None or target.startswith("unix:"):
        return True
    if "," in target or "://" in target or target.count(":") == 0:
        return False
    host = target.rsplit(":", 1)[0].removeprefix("ipv4:").removeprefix("ipv6:").strip("[]")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


async def probe_until_closed(
    worker: WorkerHandle,
    mark: Callable[[WorkerHandle, bool], None],
    closing: Callable[[], bool],
    observe: Callable[[WorkerHandle], None] | None = None,
) -> None:
    """Probe `worker` every `probe.interval_s` until `closing()`; `mark(worker, up)` as above;
    `observe(worker)` after every answered probe (its Info is in `worker.info`)."""
    probe = worker.entry.probe
    model = worker.entry.name
    while not closing():
        await asyncio.sleep(probe.interval_s)
        if closing() or (not worker.up and worker.hung_since is None):
            continue  # down for another reason (dead, restarting): the supervisor's
        connects = worker.connects
        answered = await worker.probe(probe.timeout_s)
        if closing() or connects != worker.connects:
            continue  # restarted meanwhile: the answer is about a channel that is gone
        if answered:
            if observe is not None:
                observe(worker)
            if worker.hung_since is not None:
                stalled_s = time.monotonic() - worker.hung_since
                worker.hung_since = None
                mark(worker, True)
                log_phase(
                    log, "worker-answers-again", model=model, target=worker.target, hung_s=round(stalled_s, 1)
                )
            continue
        if worker.up:
            worker.hung_since = time.monotonic()
            mark(worker, False)
            cancelled = worker.cancel_calls()
            log_phase(
                log,
                "worker-hung",
                logging.WARNING,
                model=model,
                target=worker.target,
                probe_timeout_s=probe.timeout_s,
                calls_retried=cancelled,
            )
            continue
        hung_since = worker.hung_since
        proc = worker.proc
        if (
            hung_since is not None
            and worker.argv is not None
            and proc is not None
            and proc.returncode is None
            and probe.restart_after_s > 0
            and time.monotonic() - hung_since >= probe.restart_after_s
        ):
            log_phase(
                log,
                "worker-hung-kill",
                logging.WARNING,
                model=model,
                target=worker.target,
                pid=proc.pid,
                hung_s=round(time.monotonic() - hung_since, 1),
            )
            worker.hung_since = None  # from here it is a dead worker: the supervisor restarts it
            proc.kill()
