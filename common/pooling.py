"""BERT sequence classifier with a choice of pooling: the pooled [CLS] output (``cls``), the mean of the
last hidden states over real tokens (``mean``, how sentence-transformers models such as all-MiniLM-L6-v2 were
trained), or that token mean taken at every transformer layer's output and averaged over the layers
(``mean-layers``: the lower layers keep word-level cues that a frozen last layer averages away; a better
non-private probe on SST-2, no better under DP: docs/measured-dp-utility.md).

The pooling is a property of the model, stored in its ``config.json`` as ``fedpriv_pooling`` so that training,
evaluation, ``fedpriv fairness``, ``fedpriv compress`` and a reloaded model all pool the same way. With
``cls`` (or no ``fedpriv_pooling`` at all) the class is exactly ``BertForSequenceClassification``.

This file imports nothing from fedpriv: :func:`common.model.save_pretrained` copies it into every saved
model directory as ``modeling_fedpriv.py`` (with an ``auto_map`` in ``config.json``), so plain transformers
loads a mean-pooled model with ``AutoModelForSequenceClassification.from_pretrained(dir,
trust_remote_code=True)``. It is imported lazily by common.model (it needs torch and transformers at import).
"""

from __future__ import annotations

import torch
from transformers import BertForSequenceClassification
from transformers.modeling_outputs import SequenceClassifierOutput

POOLINGS = ("cls", "mean", "mean-layers")
CONFIG_KEY = "fedpriv_pooling"


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``hidden`` [B, T, H] over the positions where ``attention_mask`` [B, T] is 1 -> [B, H].

    A row without any real token (all-zero mask) pools to zeros instead of dividing by zero.
    """
    if attention_mask is None:
        return hidden.mean(dim=1)
    m = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)


def layers_mean_pool(hidden_states, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """The average over the transformer layers (``hidden_states[1:]``: the embedding output is left out) of
    each layer's masked token mean -> [B, H]."""
    return torch.stack([mean_pool(h, attention_mask) for h in hidden_states[1:]]).mean(dim=0)


class FedprivBertForSequenceClassification(BertForSequenceClassification):
    """``BertForSequenceClassification`` whose ``config.fedpriv_pooling`` chooses ``cls``, ``mean`` or
    ``mean-layers`` pooling.

    With ``mean`` the classifier (after dropout) reads the masked mean of the last hidden states, with
    ``mean-layers`` the average of every transformer layer's masked token mean; with either, the BERT pooler is
    not used (its weights stay in the checkpoint, untouched).
    """

    @property
    def pooling(self) -> str:
        pooling = str(getattr(self.config, CONFIG_KEY, "cls") or "cls")
        if pooling not in POOLINGS:
            raise ValueError(f"config.json {CONFIG_KEY} must be one of {', '.join(POOLINGS)}; got {pooling!r}")
        return pooling

    def features(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                 inputs_embeds=None, **kwargs) -> torch.Tensor:
        """The classifier's input [B, H] before dropout: the pooled output (``cls``), the token mean
        (``mean``) or the layers' average token mean (``mean-layers``)."""
        kwargs.pop("return_dict", None)  # always a ModelOutput here (PEFT passes return_dict=None)
        layers = self.pooling == "mean-layers"
        if layers:
            kwargs["output_hidden_states"] = True
        out = self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                        position_ids=position_ids, inputs_embeds=inputs_embeds, return_dict=True, **kwargs)
        if layers:
            return layers_mean_pool(out.hidden_states, attention_mask)
        if self.pooling == "mean":
            return mean_pool(out.last_hidden_state, attention_mask)
        return out.pooler_output

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, labels=None, **kwargs):
        if self.pooling == "cls":
            return super().forward(input_ids=input_ids, attention_mask=attention_mask,
                                   token_type_ids=token_type_ids, position_ids=position_ids,
                                   inputs_embeds=inputs_embeds, labels=labels, **kwargs)
        pooled = self.features(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                               position_ids=position_ids, inputs_embeds=inputs_embeds, **kwargs)
        logits = self.classifier(self.dropout(pooled))
        loss = None
        if labels is not None:
            loss = torch.nn.functional.cross_entropy(logits.view(-1, self.num_labels), labels.view(-1))
        return SequenceClassifierOutput(loss=loss, logits=logits)
