"""What django-q2 runs: the token task.

A token carries no message (django-q2 has no priorities): it wakes this worker process's
runner, which claims the highest-priority claimable message itself (messaging/runner.py).
"""

from __future__ import annotations

from django.conf import settings

from messaging import runner


def process_next(rescue: object = None) -> str:
    """Claim work for this worker process's runner once it has a free slot. While every slot is
    busy the token waits (a little): a full worker leaves the next tokens to the others.
    `rescue` is ignored: tokens queued by earlier versions carried one."""
    return runner.worker_runner().take_token(wait=settings.MESSAGING_RECOVERY_INTERVAL)
