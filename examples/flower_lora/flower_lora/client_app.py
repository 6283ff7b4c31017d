"""ClientApp: a NumPy LoRA node of the synthetic task (see task.py).

train: fit the received adapter to this node's noisy target and reply with it,
``num-examples`` in the MetricRecord (and the partition id in a ConfigRecord, so
the ServerApp can name nodes by partition). evaluate: the received adapter's
error against this node's true update.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from flower_lora import task

app = ClientApp()


def _received(msg: Message) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in msg.content["arrays"].items()}


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Fit the received adapter locally and send it back."""
    cfg, pid = task.TaskConfig.from_run_config(context.run_config), int(context.node_config["partition-id"])
    server_round = int(msg.content["config"]["server-round"])
    fitted = task.local_fit(_received(msg), task.target(cfg, pid, server_round), cfg.local_steps)
    content = RecordDict({
        "arrays": ArrayRecord({k: Array(v) for k, v in fitted.items()}),
        "metrics": MetricRecord({"num-examples": 100, "train-error": task.adapter_error(fitted, cfg, pid)}),
        "node": ConfigRecord({"partition-id": pid}),
    })
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """The received adapter's error against this node's true update."""
    cfg, pid = task.TaskConfig.from_run_config(context.run_config), int(context.node_config["partition-id"])
    content = RecordDict({
        "metrics": MetricRecord({"num-examples": 100, "error": task.adapter_error(_received(msg), cfg, pid),
                                 "poisoned": int(cfg.poisoned(pid)), "partition-id": pid}),
    })
    return Message(content, reply_to=msg)
