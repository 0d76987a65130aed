"""FedProx's proximal term, built into the exported training loss.

Tian Li, Anit Kumar Sahu, Manzil Zaheer, Maziar Sanjabi, Ameet Talwalkar and Virginia Smith,
"Federated Optimization in Heterogeneous Networks", MLSys 2020.

ORT's training graph has a fixed loss, so the term is part of it:

    loss' = loss + mu / 2 * sum_p ||w_p - c_p||^2        over every trainable tensor w_p

with ``mu`` (``core.lora.PROXIMAL_MU``, a float32 scalar) and the centres ``c_p``
(``PROXIMAL_CENTER_PREFIX + name``, one per trainable tensor, the same shape) frozen
parameters of the checkpoint. A device writes them through ``CheckpointState.parameters``
before local training: the centres to the adapter it starts the round from (the received
global), mu to the announced value (``edge_client.runtime.Trainer.set_proximal``). The
gradient ORT builds is then ``g + mu * (w - c)``, which AdamW sees exactly as PyTorch's
FedProx does. The export writes mu = 0 and the centres equal to the initial adapter, so
the term is zero (and its gradient too) until a device sets them: the exporter's self-check
and every round without FedProx train the plain loss. The eval model carries the term as
well; a device puts mu back to 0 after training so evaluation scores the plain loss.

``add_proximal_parameters`` adds the frozen parameters to the ONNX model before
``generate_artifacts``; ``proximal_loss`` wraps the task's loss block (any onnxblock
``Block``, or a ``LossType``'s) in one that adds the term.
"""

from __future__ import annotations

import numpy as np

from core.lora import PROXIMAL_CENTER_PREFIX, PROXIMAL_MU


def center_name(param: str) -> str:
    return PROXIMAL_CENTER_PREFIX + param


def add_proximal_parameters(model, trainable: list[str]) -> list[str]:
    """Add mu (0) and a centre (a copy of its initial value) for each of ``trainable`` to the
    ONNX ``model``'s initializers; returns their names, to be passed as frozen parameters."""
    from onnx import numpy_helper

    initializers = {init.name: init for init in model.graph.initializer}
    missing = [n for n in trainable if n not in initializers]
    if missing:
        raise ValueError(f"trainable parameters are not initializers of the graph: {missing[:3]}")
    added = [PROXIMAL_MU]
    model.graph.initializer.append(numpy_helper.from_array(np.zeros((), np.float32), PROXIMAL_MU))
    for name in trainable:
        value = numpy_helper.to_array(initializers[name]).astype(np.float32)
        model.graph.initializer.append(numpy_helper.from_array(value, center_name(name)))
        added.append(center_name(name))
    return added


def proximal_loss(inner, trainable: list[str]):
    """An onnxblock ``Block``: ``inner``'s loss (a Block, or an ``artifacts.LossType``) plus
    ``mu / 2 * sum ||w - c||^2`` over ``trainable``."""
    import onnx
    from onnxruntime.training import artifacts, onnxblock
    from onnxruntime.training.onnxblock import _graph_utils

    if not trainable:
        raise ValueError("the proximal term needs at least one trainable parameter")
    if isinstance(inner, artifacts.LossType):
        inner = {
            artifacts.LossType.CrossEntropyLoss: onnxblock.loss.CrossEntropyLoss,
            artifacts.LossType.MSELoss: onnxblock.loss.MSELoss,
        }[inner]()

    class ProximalLoss(onnxblock.Block):
        def __init__(self):
            super().__init__()
            self.inner = inner

        def build(self, *inputs):
            loss = self.inner(*inputs)
            graph = self.base.graph

            def node(op: str, ins: list[str], **attrs) -> str:
                out = _graph_utils.generate_graph_name(f"fedprox_{op.lower()}")
                graph.node.append(onnx.helper.make_node(op, ins, [out], name=out + "_node", **attrs))
                return out

            total: str | None = None
            for name in trainable:
                diff = node("Sub", [name, center_name(name)])
                squares = node("ReduceSum", [node("Mul", [diff, diff])], keepdims=0)
                total = squares if total is None else node("Add", [total, squares])
            assert total is not None  # trainable is not empty (checked above)
            half = _graph_utils.generate_graph_name("fedprox_half")
            graph.initializer.append(onnx.numpy_helper.from_array(np.array(0.5, np.float32), half))
            term = node("Mul", [node("Mul", [PROXIMAL_MU, half]), total])
            return node("Add", [loss, term])

    return ProximalLoss()
