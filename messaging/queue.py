"""django-q2 as the queue of wake-ups.

django-q2 has no priorities and no FIFO guarantee, so its tasks carry no message: each one is
a token that tells a worker process "there is work". The worker's runner then claims the
highest-priority claimable messages itself, up to a batch (messaging/runner.py), and when it
filled its batch it wakes another worker in turn. So one waiting token is enough however many
messages wait: a new message queues one only when none is waiting (`wake_a_worker`), and a
burst costs a few tokens rather than one each (every token is a write to queue it, one to take
it and one to acknowledge it). A token lost with a killed cluster costs nothing either: runners
with free slots also look for work on their own every MESSAGING_RECOVERY_INTERVAL.
"""

from __future__ import annotations

from functools import cache

from django.conf import settings
from django.utils import timezone
from django_q.brokers import Broker, get_broker
from django_q.models import OrmQ
from django_q.tasks import async_task

# With the ORM broker a token is a row in the same database, written in the same transaction
# as its message; with Redis it is pushed after the message is committed.
QUEUE_IN_DATABASE = "orm" in settings.Q_CLUSTER

TOKEN_TASK = "messaging.tasks.process_next"


@cache
def shared_broker() -> Broker:
    # One broker per process: the Redis broker otherwise opens a connection per enqueue.
    return get_broker()


def enqueue_token() -> None:
    async_task(TOKEN_TASK, broker=shared_broker())


def token_waiting() -> bool:
    """A token is queued that no worker has taken yet: whoever takes it claims after whatever
    is being committed now, so it will find that too."""
    broker = shared_broker()
    if QUEUE_IN_DATABASE:
        # Not a count: one row is enough to know, under a backlog of any size.
        return OrmQ.objects.using(settings.Q_CLUSTER["orm"]).filter(key=broker.list_key, lock__lt=timezone.now()).exists()
    return bool(broker.queue_size())


def wake_a_worker() -> None:
    """Queue a token, unless one is already waiting to be taken."""
    if not token_waiting():
        enqueue_token()
