"""django-q2 as the queue of wake-ups.

django-q2 has no priorities and no FIFO guarantee, so its tasks carry no message: each one is
a token that tells a worker process "there is work". The worker's runner then claims the
highest-priority claimable message itself (messaging/runner.py), so a token lost with a killed
cluster, or one too many, costs nothing but a query: runners with free slots also look for
work on their own every MESSAGING_RECOVERY_INTERVAL.
"""

from __future__ import annotations

from functools import cache

from django.conf import settings
from django_q.brokers import Broker, get_broker
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
