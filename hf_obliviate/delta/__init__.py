"""Compressed fine-tuning deltas (BitDelta and baselines): codec, streaming compressor, verified format.

Exports are lazy: importing this package loads nothing heavy, and the streaming compressor
(`compress_checkpoints`) runs its default case without torch. transformers, peft and huggingface_hub load only
where a function needs them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "CheckpointReader": ".checkpoint",
    "fingerprint_checkpoint": ".checkpoint",
    "linear_weight_names": ".checkpoint",
    "BitDeltaCompressor": ".codec",
    "BitDeltaPairEncoder": ".codec",
    "DareCompressor": ".codec",
    "DeltaCompressor": ".codec",
    "DeltaEntry": ".codec",
    "MagnitudeCompressor": ".codec",
    "SVDCompressor": ".codec",
    "available_methods": ".codec",
    "bitdelta_decode": ".codec",
    "bitdelta_encode": ".codec",
    "get_compressor": ".codec",
    "register_compressor": ".codec",
    "compress_delta": ".compress",
    "compress_model": ".compress",
    "compress_checkpoints": ".stream",
    "summarize_errors": ".writer",
    "CompressedDelta": ".container",
    "read_delta_metadata": ".container",
    "DistillConfig": ".distill",
    "RareTokenInsertion": ".distill",
    "distill_scales": ".distill",
    "logit_mse": ".distill",
    "DELTA_CONFIG_NAME": ".format",
    "FORMAT_VERSION": ".format",
    "BaseMismatchError": ".format",
    "CorruptDeltaError": ".format",
    "DeltaFormatError": ".format",
    "ShapeMismatchError": ".format",
    "UnsupportedFormatVersionError": ".format",
    "fingerprint_state_dict": ".format",
    "fingerprint_tensors": ".format",
    "pack_signs": ".format",
    "unpack_signs": ".format",
    "is_peft_model": ".lora",
    "lora_size_tradeoff": ".lora",
    "merge_lora": ".lora",
}

__all__ = [
    "DELTA_CONFIG_NAME",
    "FORMAT_VERSION",
    "BaseMismatchError",
    "BitDeltaCompressor",
    "BitDeltaPairEncoder",
    "CheckpointReader",
    "CompressedDelta",
    "CorruptDeltaError",
    "DareCompressor",
    "DeltaCompressor",
    "DeltaEntry",
    "DeltaFormatError",
    "DistillConfig",
    "MagnitudeCompressor",
    "RareTokenInsertion",
    "SVDCompressor",
    "ShapeMismatchError",
    "UnsupportedFormatVersionError",
    "available_methods",
    "bitdelta_decode",
    "bitdelta_encode",
    "compress_checkpoints",
    "compress_delta",
    "compress_model",
    "distill_scales",
    "fingerprint_checkpoint",
    "fingerprint_state_dict",
    "fingerprint_tensors",
    "get_compressor",
    "is_peft_model",
    "linear_weight_names",
    "logit_mse",
    "lora_size_tradeoff",
    "merge_lora",
    "pack_signs",
    "read_delta_metadata",
    "register_compressor",
    "summarize_errors",
    "unpack_signs",
]

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:  # pragma: no cover
    from .checkpoint import CheckpointReader, fingerprint_checkpoint, linear_weight_names
    from .codec import (
        BitDeltaCompressor,
        BitDeltaPairEncoder,
        DareCompressor,
        DeltaCompressor,
        DeltaEntry,
        MagnitudeCompressor,
        SVDCompressor,
        available_methods,
        bitdelta_decode,
        bitdelta_encode,
        get_compressor,
        register_compressor,
    )
    from .compress import compress_delta, compress_model
    from .container import CompressedDelta, read_delta_metadata
    from .distill import DistillConfig, RareTokenInsertion, distill_scales, logit_mse
    from .format import (
        DELTA_CONFIG_NAME,
        FORMAT_VERSION,
        BaseMismatchError,
        CorruptDeltaError,
        DeltaFormatError,
        ShapeMismatchError,
        UnsupportedFormatVersionError,
        fingerprint_state_dict,
        fingerprint_tensors,
        pack_signs,
        unpack_signs,
    )
    from .lora import is_peft_model, lora_size_tradeoff, merge_lora
    from .stream import compress_checkpoints
    from .writer import summarize_errors
