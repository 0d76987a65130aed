"""The torch modules ``torch.onnx.export`` traces: a PEFT model with the inputs and outputs the
device's training graph has."""

from __future__ import annotations

import torch


class ClassifierWrapper(torch.nn.Module):
    """(input_ids, attention_mask) -> logits [batch, classes]."""

    def __init__(self, inner):
        super().__init__()
        self.model = inner

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


class CausalLMWrapper(torch.nn.Module):
    """(input_ids, attention_mask, labels [batch * sequence]) -> (logits, targets) of the labeled
    positions only: logits [labeled, vocabulary] in row-major order and their labels [labeled].

    The output projection runs on the labeled positions alone (a pre-hook on the model's output
    embedding gathers their hidden states), so the logits, the softmax and their gradients cost
    O(labeled x vocabulary) rather than O(batch x sequence x vocabulary): for instruction data the
    response tokens, a few per row for a label task. Whatever the model applies after the
    projection (Gemma's soft-capping, Granite's scaling) is elementwise and still applies. A caller
    that wants the logits at some positions (decoding, label scoring) labels those positions with
    any token id.
    """

    def __init__(self, inner, ignore_index: int):
        super().__init__()
        self.model = inner
        self.ignore_index = ignore_index
        self._rows: torch.Tensor | None = None
        inner.get_base_model().get_output_embeddings().register_forward_pre_hook(self._labeled_rows_only)

    def _labeled_rows_only(self, module, args):
        if self._rows is None:  # a plain call of the model: every position
            return None
        hidden = args[0]
        return (hidden.reshape(-1, hidden.shape[-1]).index_select(0, self._rows), *args[1:])

    def forward(self, input_ids, attention_mask, labels):
        flat = labels.reshape(-1)
        self._rows = torch.nonzero(flat != self.ignore_index).reshape(-1)
        try:
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
        finally:
            rows, self._rows = self._rows, None
        return logits.reshape(-1, logits.shape[-1]), flat.index_select(0, rows)
