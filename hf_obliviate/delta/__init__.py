"""Compressed fine-tuning deltas (BitDelta and baselines): codec, streaming compressor, verified format.

Plain torch + safetensors; importing this package does not import transformers, peft or huggingface_hub.
"""

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
from .compress import compress_checkpoints, compress_delta, compress_model, summarize_errors
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
