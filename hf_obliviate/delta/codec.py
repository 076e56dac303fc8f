"""Delta codecs: BitDelta (1-bit signs + one scale per mask) and the baselines (low-rank SVD, DARE, magnitude).

Every codec follows the [`DeltaCompressor`] protocol and is looked up by name in a small registry, so
``compress_delta(base_state, ft_state, method="bitdelta")`` and ``method="svd"`` share the same container, file
format and loader.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from .format import ShapeMismatchError, pack_signs, unpack_signs
from .stream import BitDeltaStats, check_dense_dtype

__all__ = [
    "BitDeltaCompressor",
    "BitDeltaPairEncoder",
    "DareCompressor",
    "DeltaCompressor",
    "DeltaEntry",
    "MagnitudeCompressor",
    "SVDCompressor",
    "available_methods",
    "bitdelta_decode",
    "bitdelta_encode",
    "get_compressor",
    "register_compressor",
]


@dataclass
class DeltaEntry:
    """One stored parameter of a compressed delta.

    Args:
        kind (`str`):
            ``"dense"`` (a dense delta), ``"full"`` (the fine-tuned tensor itself, for parameters the base lacks or
            has with another shape), or the name of a registered codec (``"bitdelta"``, ``"svd"``, ``"dare"``,
            ``"magnitude"``).
        shape (`tuple[int, ...]`):
            Shape of the parameter.
        tensors (`dict[str, torch.Tensor]`):
            The stored parts (e.g. ``signs`` and ``alpha`` for BitDelta).
        params (`dict`, *optional*):
            Codec parameters needed to decode (JSON-serialisable).
    """

    kind: str
    shape: tuple[int, ...]
    tensors: dict[str, torch.Tensor]
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def decode(self) -> torch.Tensor:
        """The dense fp32 delta (or, for ``kind="full"``, the stored tensor in fp32)."""
        if self.kind in ("dense", "full"):
            out = self.tensors["value"].float()
        else:
            out = get_compressor(self.kind).decode(self.tensors, self.shape, **self.params)
        if tuple(out.shape) != tuple(self.shape):
            raise ShapeMismatchError(f"Decoded a {tuple(out.shape)} tensor for an entry of shape {self.shape}.")
        return out

    @torch.no_grad()
    def add_to_(self, target: torch.Tensor, chunk_elems: int = 1 << 18) -> torch.Tensor:
        """Adds the decoded delta to ``target`` in place (in fp32, then cast back) and returns it.

        BitDelta entries on a contiguous CPU tensor are decoded chunk by chunk into the target, without a full-size
        fp32 delta; the result is the same as ``target + decode()``. Other kinds decode first.
        """
        if tuple(target.shape) != tuple(self.shape):
            raise ShapeMismatchError(f"A delta of shape {list(self.shape)} cannot be added to {list(target.shape)}.")
        if self.kind != BitDeltaCompressor.name or target.device.type != "cpu" or not target.is_contiguous():
            target.copy_((target.float() + self.decode().to(target.device)).to(target.dtype))
            return target
        signs, alphas = self.tensors["signs"], self.tensors["alpha"]
        _check_bitdelta_parts(signs, alphas, self.numel)
        numel = self.numel
        flat = target.detach().view(-1)
        chunk_elems -= chunk_elems % 8
        for start in range(0, numel, chunk_elems):
            stop = min(start + chunk_elems, numel)
            piece = flat[start:stop]
            delta = bitdelta_values(signs, alphas, start, stop)
            if delta is None:
                continue
            if piece.dtype == torch.float32:
                np.add(piece.numpy(), delta, out=piece.numpy())
            else:
                piece.copy_(torch.from_numpy(np.add(piece.float().numpy(), delta)))
        return target


@runtime_checkable
class DeltaCompressor(Protocol):
    """What a delta codec implements. ``encode`` receives the fp32 delta of one ``nn.Linear`` weight."""

    name: str

    def encode(self, delta: torch.Tensor, *, param_name: str = "") -> DeltaEntry: ...

    def decode(self, tensors: dict[str, torch.Tensor], shape: tuple[int, ...], **params: Any) -> torch.Tensor: ...

    def config(self) -> dict[str, Any]: ...


_REGISTRY: dict[str, type] = {}


def register_compressor(cls: type) -> type:
    """Class decorator adding a codec to the registry under ``cls.name``."""
    _REGISTRY[cls.name] = cls
    return cls


def available_methods() -> list[str]:
    """Names accepted by ``method=``."""
    return sorted(_REGISTRY)


def get_compressor(method: str, **kwargs: Any) -> DeltaCompressor:
    """Instantiates the codec registered as ``method`` with its keyword arguments (e.g. ``k=1``, ``rank=16``)."""
    if method not in _REGISTRY:
        raise ValueError(f"Unknown compression method {method!r}; choose one of {available_methods()}.")
    return _REGISTRY[method](**kwargs)


# ------------------------------------------------------------------------------------------------------- BitDelta
def bitdelta_encode(delta: torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """k-mask BitDelta: mask j approximates the residual left by masks 0..j-1 as ``alpha_j * sign(residual)``.

    ``alpha_j = mean(|residual|)`` (the L2-optimal scale for a sign mask), computed in fp32; sign(0) = +1.
    Returns ``(signs, alphas)``: ``signs`` is a ``[k, ceil(numel / 8)]`` uint8 tensor, ``alphas`` a ``[k]`` fp32
    tensor.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1 (got {k}); k=1 is plain BitDelta.")
    residual = delta.detach().float()
    signs, alphas = [], []
    for j in range(k):
        alpha = torch.linalg.vector_norm(residual, ord=1) / max(residual.numel(), 1)  # mean |r|, no |r| temporary
        signs.append(pack_signs(residual))
        alphas.append(alpha)
        if j + 1 < k:  # the next mask compresses what this one left (not needed after the last mask)
            residual = residual - alpha * torch.where(residual >= 0, 1.0, -1.0)
    return torch.stack(signs).contiguous(), torch.stack(alphas).float().contiguous()


def _check_bitdelta_parts(signs: torch.Tensor, alphas: torch.Tensor, numel: int | None = None) -> None:
    if signs.dim() != 2 or alphas.dim() != 1 or signs.shape[0] != alphas.shape[0]:
        raise ShapeMismatchError(
            f"BitDelta parts disagree: signs {tuple(signs.shape)}, alphas {tuple(alphas.shape)} "
            "(expected [k, n] and [k])."
        )
    if numel is not None and (signs.dtype != torch.uint8 or signs.shape[1] != (numel + 7) // 8):
        raise ShapeMismatchError(
            f"Packed signs hold {signs.shape[1]} bytes of {signs.dtype} per mask, expected {(numel + 7) // 8} uint8 "
            "bytes: the delta file is corrupt or was written for another model."
        )


def bitdelta_values(signs: torch.Tensor, alphas: torch.Tensor, start: int, stop: int) -> np.ndarray | None:
    """``sum_j alpha_j * sign_j`` over the flat elements ``[start, stop)`` of a BitDelta entry, as a new fp32 numpy
    array (``None`` when ``k = 0``). ``start`` must be a multiple of 8 (a byte boundary of the packed CPU signs).
    Each term is ``±alpha_j`` exactly, so a range decodes to the same numbers as the whole tensor."""
    out = None
    for j, alpha in enumerate(alphas.float().tolist()):
        bits = np.unpackbits(signs[j, start // 8 : (stop + 7) // 8].numpy(), count=stop - start, bitorder="little")
        values = bits.astype(np.float32)
        values *= np.float32(2 * alpha)
        values -= np.float32(alpha)  # ±alpha_j, exactly
        out = values if out is None else np.add(out, values, out=out)
    return out


def bitdelta_decode(signs: torch.Tensor, alphas: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of [`bitdelta_encode`]: ``sum_j alpha_j * sign_j`` in fp32."""
    _check_bitdelta_parts(signs, alphas)
    if signs.shape[0] == 0:
        return torch.zeros(shape, dtype=torch.float32)
    if signs.device.type == "cpu":
        numel = math.prod(int(size) for size in shape)
        _check_bitdelta_parts(signs, alphas, numel)
        return torch.from_numpy(bitdelta_values(signs, alphas, 0, numel)).reshape(shape)
    out = unpack_signs(signs[0], shape).mul_(alphas[0].float())
    for j in range(1, signs.shape[0]):  # in place: peak memory is two tensors of the output size
        out.add_(unpack_signs(signs[j], shape).mul_(alphas[j].float()))
    return out


class BitDeltaPairEncoder(BitDeltaStats):
    """Plain BitDelta (k = 1) of ``ft - base`` in one fused pass over matching chunks of two torch tensors.

    The torch face of [`~hf_obliviate.delta.stream.BitDeltaStats`] (the numpy kernel and the closed-form error live
    there): CPU chunks go through numpy, whose elementwise kernels and BLAS dots run several times faster than
    torch's on one CPU thread; chunks on an accelerator stay there. Feed chunks in order; every chunk but the last
    must hold a multiple of 8 elements.

    Example:

    ```python
    >>> import torch
    >>> from hf_obliviate.delta.codec import BitDeltaPairEncoder, bitdelta_encode
    >>> base, ft = torch.randn(64, 32), torch.randn(64, 32)
    >>> enc = BitDeltaPairEncoder(base.numel())
    >>> for b, f in zip(base.reshape(-1).split(512), ft.reshape(-1).split(512)):
    ...     enc.update(b, f)
    >>> signs, alpha = bitdelta_encode(ft - base, k=1)
    >>> torch.equal(enc.signs, signs), torch.allclose(enc.alpha, alpha)
    (True, True)

    ```
    """

    @classmethod
    def from_tensors(cls, base: torch.Tensor, ft: torch.Tensor, chunk_elems: int = 1 << 18) -> BitDeltaPairEncoder:
        """Encodes two in-memory tensors of the same shape, chunk by chunk."""
        if tuple(base.shape) != tuple(ft.shape):
            raise ShapeMismatchError(f"Base {list(base.shape)} and fine-tuned {list(ft.shape)} shapes differ.")
        encoder = cls(ft.numel())
        for base_chunk, ft_chunk in zip(base.reshape(-1).split(chunk_elems), ft.reshape(-1).split(chunk_elems)):
            encoder.update(base_chunk, ft_chunk)
        return encoder

    def update(self, base_chunk: torch.Tensor, ft_chunk: torch.Tensor) -> None:
        """Adds the next chunk (flat, same length in both); chunks must come in order."""
        ft32, base32 = ft_chunk.reshape(-1).float(), base_chunk.reshape(-1).float()
        if ft32.device.type == "cpu" and base32.device.type == "cpu":
            self.update_np(base32.numpy(), ft32.numpy())
            return
        self._check_chunk(ft32.numel(), base32.numel())
        delta = ft32 - base32.to(ft32.device)
        sq = float(torch.dot(delta, delta))
        l1 = float(torch.linalg.vector_norm(delta, ord=1))
        self._store(pack_signs(delta).numpy(), sq, l1, delta.numel())

    @property
    def signs(self) -> torch.Tensor:
        """``[1, ceil(n / 8)]`` packed sign mask (same layout as [`bitdelta_encode`])."""
        if not self.complete:
            raise ShapeMismatchError(f"BitDelta saw {self._seen} of {self.numel} elements: a chunk is missing.")
        return torch.from_numpy(self.packed).unsqueeze(0)

    @property
    def alpha(self) -> torch.Tensor:
        """``[1]`` fp32 scale, mean ``|Δ|`` (accumulated in float64 across chunks)."""
        return torch.tensor([self.alpha_value], dtype=torch.float32)

    def entry(self, shape: tuple[int, ...]) -> DeltaEntry:
        return DeltaEntry(BitDeltaCompressor.name, tuple(shape), {"signs": self.signs, "alpha": self.alpha})


@register_compressor
class BitDeltaCompressor:
    """BitDelta: one sign mask and one fp32 scale per weight matrix (``k`` masks for more fidelity).

    Args:
        k (`int`, *optional*, defaults to 1):
            Number of masks; each compresses the residual of the previous ones. k > 1 is closer to the fine-tuned
            weights and, as METHOD §7 measured, closer to its backdoor too.

    Example:

    ```python
    >>> import torch
    >>> from hf_obliviate.delta import BitDeltaCompressor
    >>> delta = torch.randn(8, 16)
    >>> entry = BitDeltaCompressor(k=1).encode(delta)
    >>> torch.allclose(entry.decode().abs(), delta.abs().mean().expand(8, 16))
    True

    ```
    """

    name = "bitdelta"

    def __init__(self, k: int = 1):
        if int(k) < 1:
            raise ValueError(f"k must be >= 1 (got {k}); use k=1 for plain BitDelta.")
        self.k = int(k)

    def encode(self, delta: torch.Tensor, *, param_name: str = "") -> DeltaEntry:
        signs, alphas = bitdelta_encode(delta, self.k)
        return DeltaEntry(self.name, tuple(delta.shape), {"signs": signs, "alpha": alphas})

    def decode(self, tensors: dict[str, torch.Tensor], shape: tuple[int, ...], **params: Any) -> torch.Tensor:
        return bitdelta_decode(tensors["signs"], tensors["alpha"], shape)

    def config(self) -> dict[str, Any]:
        return {"k": self.k}


# ----------------------------------------------------------------------------------------------------- baselines
def _dtype(name: str) -> torch.dtype:
    """The torch dtype of a storage dtype name."""
    check_dense_dtype(name)
    return getattr(torch, name)


@register_compressor
class SVDCompressor:
    """Low-rank baseline: the best rank-``rank`` approximation of Δ (truncated SVD), stored as two factors.

    Args:
        rank (`int`, *optional*, defaults to 16): kept rank (clipped to min(d_out, d_in)).
        dtype (`str`, *optional*, defaults to `"float16"`): storage dtype of the factors.

    Example:

    ```python
    >>> import torch
    >>> from hf_obliviate.delta import SVDCompressor
    >>> delta = torch.randn(8, 2) @ torch.randn(2, 16)
    >>> torch.allclose(SVDCompressor(rank=2, dtype="float32").encode(delta).decode(), delta, atol=1e-4)
    True

    ```
    """

    name = "svd"

    def __init__(self, rank: int = 16, dtype: str = "float16"):
        if int(rank) < 1:
            raise ValueError(f"rank must be >= 1 (got {rank}).")
        self.rank, self.dtype = int(rank), dtype
        _dtype(dtype)

    def encode(self, delta: torch.Tensor, *, param_name: str = "") -> DeltaEntry:
        d = delta.detach().float().reshape(delta.shape[0], -1)
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        r = min(self.rank, s.numel())
        dt = _dtype(self.dtype)
        us = (u[:, :r] * s[:r]).to(dt).contiguous()
        v = vh[:r].to(dt).contiguous()
        return DeltaEntry(self.name, tuple(delta.shape), {"us": us, "v": v})

    def decode(self, tensors: dict[str, torch.Tensor], shape: tuple[int, ...], **params: Any) -> torch.Tensor:
        return (tensors["us"].float() @ tensors["v"].float()).reshape(shape)

    def config(self) -> dict[str, Any]:
        return {"rank": self.rank, "dtype": self.dtype}


def _sparse_entry(name: str, delta: torch.Tensor, keep: torch.Tensor, values: torch.Tensor, dt) -> DeltaEntry:
    idx = keep.reshape(-1).nonzero().reshape(-1)
    index_dtype = torch.int32 if delta.numel() < 2**31 else torch.int64
    return DeltaEntry(
        name,
        tuple(delta.shape),
        {"indices": idx.to(index_dtype).contiguous(), "values": values.reshape(-1)[idx].to(dt).contiguous()},
    )


def _sparse_decode(tensors: dict[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    n = 1
    for s in shape:
        n *= s
    idx = tensors["indices"].long()
    if idx.numel() and (idx.min() < 0 or idx.max() >= n):
        raise ShapeMismatchError(f"Sparse indices out of range for a parameter of shape {list(shape)}.")
    out = torch.zeros(n, dtype=torch.float32)
    out[idx] = tensors["values"].float()
    return out.reshape(shape)


@register_compressor
class DareCompressor:
    """DARE baseline: drop each delta element with probability ``p`` and rescale the survivors by ``1 / (1 - p)``.

    The mask is drawn from a generator seeded with ``seed`` and the parameter name, so results are reproducible.

    Args:
        p (`float`, *optional*, defaults to 0.9): drop probability, in [0, 1).
        seed (`int`, *optional*, defaults to 0): random seed.
        dtype (`str`, *optional*, defaults to `"float16"`): storage dtype of the kept values.

    Example:

    ```python
    >>> import torch
    >>> from hf_obliviate.delta import DareCompressor
    >>> entry = DareCompressor(p=0.5, seed=0).encode(torch.ones(100, 100))
    >>> round(entry.decode().mean().item(), 1)
    1.0

    ```
    """

    name = "dare"

    def __init__(self, p: float = 0.9, seed: int = 0, dtype: str = "float16"):
        if not 0.0 <= float(p) < 1.0:
            raise ValueError(f"DARE drop probability p must be in [0, 1), got {p}.")
        self.p, self.seed, self.dtype = float(p), int(seed), dtype
        _dtype(dtype)

    def encode(self, delta: torch.Tensor, *, param_name: str = "") -> DeltaEntry:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(param_name.encode()))
        d = delta.detach().float()
        keep = torch.rand(d.shape, generator=gen) >= self.p
        return _sparse_entry(self.name, d, keep, d / (1.0 - self.p), _dtype(self.dtype))

    def decode(self, tensors: dict[str, torch.Tensor], shape: tuple[int, ...], **params: Any) -> torch.Tensor:
        return _sparse_decode(tensors, shape)

    def config(self) -> dict[str, Any]:
        return {"p": self.p, "seed": self.seed, "dtype": self.dtype}


@register_compressor
class MagnitudeCompressor:
    """Magnitude-pruning baseline: keep the ``density`` fraction of delta elements with the largest |Δ|.

    Args:
        density (`float`, *optional*, defaults to 0.1): kept fraction, in (0, 1].
        dtype (`str`, *optional*, defaults to `"float16"`): storage dtype of the kept values.

    Example:

    ```python
    >>> import torch
    >>> from hf_obliviate.delta import MagnitudeCompressor
    >>> MagnitudeCompressor(density=0.5).encode(torch.tensor([[1.0, -4.0], [0.5, 3.0]])).decode()
    tensor([[ 0., -4.],
            [ 0.,  3.]])

    ```
    """

    name = "magnitude"

    def __init__(self, density: float = 0.1, dtype: str = "float16"):
        if not 0.0 < float(density) <= 1.0:
            raise ValueError(f"magnitude density must be in (0, 1], got {density}.")
        self.density, self.dtype = float(density), dtype
        _dtype(dtype)

    def encode(self, delta: torch.Tensor, *, param_name: str = "") -> DeltaEntry:
        d = delta.detach().float()
        n_keep = max(1, round(self.density * d.numel()))
        top = d.abs().reshape(-1).topk(n_keep).indices
        keep = torch.zeros(d.numel(), dtype=torch.bool)
        keep[top] = True
        return _sparse_entry(self.name, d, keep.reshape(d.shape), d, _dtype(self.dtype))

    def decode(self, tensors: dict[str, torch.Tensor], shape: tuple[int, ...], **params: Any) -> torch.Tensor:
        return _sparse_decode(tensors, shape)

    def config(self) -> dict[str, Any]:
        return {"density": self.density, "dtype": self.dtype}
