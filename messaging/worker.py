"""Life inside a django-q2 worker process, beyond running tasks.

Each worker process starts a watchdog thread (on django-q2's `post_spawn`, which also fires
when the cluster replaces a dead worker). Every MESSAGING_RECOVERY_INTERVAL seconds it:
- writes the process's heartbeat, which /readyz reads,
- renews the lease of the message the process is running, so a model that says nothing for
  longer than a lease does not look like a dead worker,
- hands messages whose lease ran out to new tokens (`jobs.recover_stale`), and pending
  messages whose token was lost too (`jobs.requeue_lost`). django-q2's own scheduler runs at
  most twice a minute and the Redis broker forgets a killed worker's tasks, so recovery cannot
  be left to either.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

from django.conf import settings
from django.db import close_old_connections
from django.utils import timezone

logger = logging.getLogger(__name__)

_started = False
# The message this process is running, as (pk, attempt): the watchdog keeps its lease.
_running: tuple[int, int] | None = None


@contextmanager
def running(job_pk: int, attempt: int) -> Iterator[None]:
    global _running
    _running = (job_pk, attempt)
    try:
        yield
    finally:
        _running = None


def connect_signals() -> None:
    from django_q.signals import post_spawn

    post_spawn.connect(_on_worker_spawn, dispatch_uid="messaging.watchdog")


def _on_worker_spawn(sender: object, proc_name: str, **kwargs: object) -> None:
    start_watchdog(f"{socket.gethostname()}:{os.getpid()}")


def start_watchdog(name: str) -> None:
    global _started
    if _started:
        return
    _started = True
    thread = threading.Thread(target=_watch, args=(name,), name="messaging-watchdog", daemon=True)
    thread.start()


def _watch(name: str) -> None:
    stop = threading.Event()  # never set: the thread ends with its process
    while True:
        try:
            watch_round(name)
        except Exception:
            # The database may be briefly away; the next round tries again.
            logger.exception("watchdog round failed")
        finally:
            close_old_connections()
        stop.wait(settings.MESSAGING_RECOVERY_INTERVAL)


def watch_round(name: str) -> None:
    from messaging import jobs

    beat(name)
    current = _running
    if current is not None:
        # Before looking for stale leases, so that ours is never one of them.
        jobs.renew_lease(*current)
    jobs.recover_stale()
    jobs.requeue_lost()


def beat(name: str) -> None:
    from messaging.models import WorkerHeartbeat

    now = timezone.now()
    WorkerHeartbeat.objects.update_or_create(name=name, defaults={"seen_at": now})
    WorkerHeartbeat.objects.filter(seen_at__lt=now - timedelta(days=1)).delete()
