"""Torch-free selection of a checkpoint's ``nn.Linear`` weights from tensor names and shapes alone.

:func:`hf_obliviate.delta.checkpoint.linear_weight_names` selects by module type, which needs the model built (torch
and transformers imported, the architecture instantiated). For the architectures listed in
:data:`VERIFIED_MODEL_TYPES` the same answer follows from the safetensors header and ``config.json``: this module
only uses the standard library, so a checkpoint can be planned (which tensors get a Linear codec, which stay dense)
without importing torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["VERIFIED_MODEL_TYPES", "linear_weight_names_by_name"]

VERIFIED_MODEL_TYPES: frozenset[str] = frozenset(
    {
        "llama",
        "mistral",
        "qwen2",
        "qwen3",
        "gemma",
        "gemma2",
        "phi3",
        "olmo",
        "bert",
        "roberta",
        "xlm-roberta",
        "distilbert",
        "electra",
    }
)
"""``config["model_type"]`` values for which ``tests/test_linear_names.py`` proves the name rule equal to the by-type
selection (bare model, LM head and classification heads, tied and untied output embeddings)."""

# Last module-path component of an embedding table or an output embedding (LM head).
_NON_LINEAR_MODULES = frozenset(
    {
        "wte",  # GPT-2 style token embeddings
        "wpe",  # GPT-2 style position embeddings
        "shared",  # T5 / BART shared embeddings
        "embed_tokens",
        "embed_positions",
        "embed_out",  # GPT-NeoX LM head
        "lm_head",  # decoder LM head (a Linear that is the output embeddings)
        "generator_lm_head",  # ELECTRA masked-LM head
        "vocab_projector",  # DistilBERT masked-LM head
        "relative_attention_bias",  # T5-style relative position bias table
    }
)
# Module-path suffixes of masked-LM decoders (``lm_head.dense`` of RoBERTa is a real Linear, ``lm_head.decoder`` not).
_NON_LINEAR_SUFFIXES = ("predictions.decoder", "lm_head.decoder")


def _is_embedding_or_head(module: str) -> bool:
    last = module.rsplit(".", 1)[-1]
    return (
        last in _NON_LINEAR_MODULES
        or last.endswith("_embeddings")  # word_/position_/token_type_embeddings
        or module.endswith(_NON_LINEAR_SUFFIXES)
    )


def linear_weight_names_by_name(
    shapes: Mapping[str, Sequence[int]], config: Mapping[str, Any] | None
) -> set[str] | None:
    """Names of the tensors that are the ``weight`` of an ``nn.Linear`` module, decided from names and shapes only.

    The rule: a tensor is a Linear weight when its name ends in ``.weight``, it is 2-D, and its module (the name
    without ``.weight``) is not an embedding table or an output embedding. A module is an embedding or a head when
    its last path component is one of ``wte``, ``wpe``, ``shared``, ``embed_tokens``, ``embed_positions``,
    ``embed_out``, ``lm_head``, ``generator_lm_head``, ``vocab_projector``, ``relative_attention_bias`` or ends in
    ``_embeddings`` (``word_embeddings``, ``position_embeddings``, ``token_type_embeddings``), or when its path ends in
    ``predictions.decoder`` (BERT) or ``lm_head.decoder`` (RoBERTa). A bare ``"embed"`` substring is not
    enough: ELECTRA's ``embeddings_project`` is a Linear.

    The rule is only trusted for the architectures in :data:`VERIFIED_MODEL_TYPES`, where it gives the same set as
    :func:`hf_obliviate.delta.checkpoint.linear_weight_names` restricted to the tensors stored in the checkpoint
    (tied output embeddings are not stored). GPT-2 is not among them: its projections are ``Conv1D``, 2-D but not
    Linear.

    Args:
        shapes: Tensor name to shape, e.g. read from the safetensors header(s) of a checkpoint.
        config: The checkpoint's ``config.json`` as a dict, or ``None`` when there is none.

    Returns:
        The Linear weight names, or ``None`` when ``config`` is ``None`` or ``config["model_type"]`` is not in
        :data:`VERIFIED_MODEL_TYPES` (callers then build the model and select by type).

    Example:

    ```python
    >>> from hf_obliviate.delta.linear_names import linear_weight_names_by_name
    >>> shapes = {
    ...     "model.embed_tokens.weight": [100, 32],
    ...     "model.layers.0.self_attn.q_proj.weight": [32, 32],
    ...     "model.layers.0.input_layernorm.weight": [32],
    ...     "lm_head.weight": [100, 32],
    ... }
    >>> sorted(linear_weight_names_by_name(shapes, {"model_type": "llama"}))
    ['model.layers.0.self_attn.q_proj.weight']
    >>> linear_weight_names_by_name(shapes, {"model_type": "gpt2"}) is None
    True

    ```
    """
    if config is None or config.get("model_type") not in VERIFIED_MODEL_TYPES:
        return None
    names = set()
    for name, shape in shapes.items():
        if not name.endswith(".weight") or len(shape) != 2:
            continue
        if not _is_embedding_or_head(name[: -len(".weight")]):
            names.add(name)
    return names
