"""An in-process ``Grid``: runs a ClientApp's functions in this process, no Ray, no SuperLink.

For tests and benchmarks of a strategy's logic; ``flwr run``
is the real runtime. It plays the ServerApp's runtime too: it sets flwr's
``TaskIdentity`` (run, node and task ids), which ``Message(...)`` reads since flwr 1.38.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable

import numpy as np
from flwr.app import Context, Error, Message, RecordDict
from flwr.serverapp import Grid

SUPERLINK_NODE_ID = 1
RUN_ID = 1


def set_task_identity(run_id: int = RUN_ID, node_id: int = SUPERLINK_NODE_ID, task_id: int = 1) -> None:
    """What a ServerApp's runtime sets before the strategy builds messages (flwr ≥ 1.38)."""
    try:
        from flwr.supercore.task_identity import TaskIdentity
    except ImportError:  # flwr < 1.38 reads no identity
        return
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, node_id, task_id


class InProcessGrid(Grid):
    """Nodes ``0..num_nodes-1`` as partitions, each with a random 63-bit node id.

    Args:
        client: ``(message, context) -> Message`` (a ``ClientApp`` is one).
        num_nodes: how many nodes; node i gets ``node_config["partition-id"] = i``.
        run_config: the run config every node's context carries.
        seed: seeds the node ids.
        offline: node ids that never reply (their messages time out).
    """

    def __init__(self, client: Callable[[Message, Context], Message], num_nodes: int, run_config=None,
                 seed: int = 0, offline: Iterable[int] = ()):
        set_task_identity()
        rng = np.random.default_rng(seed)
        self.node_ids = [int(x) for x in rng.integers(2, 2**63 - 1, size=num_nodes)]
        self.partition_of = {n: i for i, n in enumerate(self.node_ids)}
        self.client = client
        self.offline = set(offline)
        self.contexts = {n: Context(run_id=RUN_ID, node_id=n,
                                    node_config={"partition-id": i, "num-partitions": num_nodes},
                                    state=RecordDict(), run_config=dict(run_config or {}))
                         for n, i in self.partition_of.items()}
        self.sent: list[Message] = []
        self._ids = itertools.count(1)
        self._replies: dict[str, Message] = {}
        self._run = None

    def set_run(self, run) -> None:  # noqa: D102
        self._run = run

    @property
    def run(self):  # noqa: D102
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:  # noqa: D102
        return Message(content, dst_node_id, message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:  # noqa: D102
        return list(self.node_ids)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:  # noqa: D102
        ids = []
        for msg in messages:
            message_id = f"m{next(self._ids)}"
            msg.metadata.__dict__["_message_id"] = message_id
            self.sent.append(msg)
            ids.append(message_id)
            node = msg.metadata.dst_node_id
            if node in self.offline:
                continue
            try:
                reply = self.client(msg, self.contexts[node])
            except Exception as err:  # noqa: BLE001  (a crashing client is an error reply)
                reply = Message(Error(code=1, reason=f"{type(err).__name__}: {err}"), reply_to=msg)
            self._replies[message_id] = reply
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:  # noqa: D102
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Run every message's client now and return the replies (offline nodes give none)."""
        return self.pull_messages(self.push_messages(messages))
