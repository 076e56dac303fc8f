"""Property-based tests (hypothesis): sign packing, BitDelta invariants, exact file round trips, and corruption.

Kept fast: small tensors, modest ``max_examples``, no deadline (the machine is shared).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from hf_obliviate.delta import (
    BitDeltaCompressor,
    CompressedDelta,
    DeltaFormatError,
    ShapeMismatchError,
    compress_delta,
    pack_signs,
    read_delta_metadata,
    unpack_signs,
)

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])

shapes = st.lists(st.integers(1, 19), min_size=0, max_size=3).map(tuple)
dtypes = st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64])


@st.composite
def tensors(draw, shape=shapes, finite: bool = False, max_abs: float = 1e4) -> torch.Tensor:
    """Tensors of any small shape and float dtype with arbitrary values: ±0.0, subnormals, (optionally) ±inf,
    and the structured edge cases all-zero, all-negative and all-positive."""
    shape = draw(shape)
    dtype = draw(dtypes)
    kind = draw(st.sampled_from(["any", "zeros", "negative", "positive"]))
    floats = st.floats(
        -max_abs if finite else None,
        max_abs if finite else None,
        allow_nan=False,
        allow_infinity=not finite,
        width=32,
    )
    values = draw(arrays(np.float32, shape, elements=floats))
    t = torch.from_numpy(np.array(values, dtype=np.float32)).reshape(shape)
    if kind == "zeros":
        t = torch.zeros(shape) * draw(st.sampled_from([1.0, -1.0]))  # +0.0 or -0.0
    elif kind == "negative":
        t = -(t.abs() + 1.0)
    elif kind == "positive":
        t = t.abs()
    return t.to(dtype)


def expected_signs(t: torch.Tensor) -> torch.Tensor:
    return torch.where(t >= 0, 1.0, -1.0)  # sign(0) = sign(-0.0) = +1


# ------------------------------------------------------------------------------------------------- bit packing
@FAST
@given(tensors())
def test_pack_unpack_roundtrip(t):
    packed = pack_signs(t)
    n = t.numel()
    assert packed.dtype == torch.uint8 and packed.dim() == 1 and packed.numel() == (n + 7) // 8
    assert packed.is_contiguous()
    if n % 8:  # the padding bits of the last byte are zero
        assert int(packed[-1]) >> (n % 8) == 0
    for out_dtype in (torch.float32, torch.float16, torch.bfloat16):
        signs = unpack_signs(packed, t.shape, dtype=out_dtype)
        assert signs.shape == t.shape and signs.dtype == out_dtype
        assert torch.equal(signs.float(), expected_signs(t))


@FAST
@given(shapes, st.sampled_from(["zeros", "negative", "positive"]))
def test_pack_edge_cases(shape, kind):
    n = int(np.prod(shape)) if shape else 1
    t = {"zeros": torch.zeros(shape), "negative": -torch.ones(shape), "positive": torch.ones(shape)}[kind]
    packed = pack_signs(t)
    if kind == "negative":
        assert torch.equal(packed, torch.zeros_like(packed))
    else:  # all bits set, except the padding of the last byte
        full = torch.full((n // 8,), 255, dtype=torch.uint8)
        assert torch.equal(packed[: n // 8], full)
        if n % 8:
            assert int(packed[-1]) == (1 << (n % 8)) - 1


@FAST
@given(shapes, st.integers(-3, 3).filter(lambda d: d != 0))
def test_unpack_refuses_wrong_sizes(shape, extra):
    n = int(np.prod(shape)) if shape else 1
    nbytes = (n + 7) // 8 + extra
    if nbytes < 0:
        return
    with pytest.raises(ShapeMismatchError, match="corrupt or was written for another model"):
        unpack_signs(torch.zeros(nbytes, dtype=torch.uint8), shape)
    with pytest.raises(ShapeMismatchError):
        unpack_signs(torch.zeros((n + 7) // 8, dtype=torch.int8), shape)  # wrong dtype


# --------------------------------------------------------------------------------------------- codec invariants
matrices = st.tuples(st.integers(1, 24), st.integers(1, 24))


@FAST
@given(tensors(shape=matrices, finite=True))
def test_bitdelta_k1_invariants(delta):
    entry = BitDeltaCompressor(k=1).encode(delta)
    alpha = entry.tensors["alpha"]
    assert alpha.dtype == torch.float32 and alpha.shape == (1,)
    assert torch.allclose(alpha[0], delta.float().abs().mean(), rtol=1e-5, atol=0)  # the L2-optimal scale, fp32
    dec = entry.decode()
    assert dec.dtype == torch.float32 and dec.shape == delta.shape
    assert torch.equal(dec.abs(), alpha[0].expand_as(dec))  # one magnitude per matrix
    nonzero = delta != 0
    if float(alpha[0]) > 0:
        assert torch.equal(torch.sign(dec)[nonzero], torch.sign(delta.float())[nonzero])
        assert bool((dec[~nonzero] > 0).all())  # sign(0) = +1


@FAST
@given(tensors(shape=matrices, finite=True, max_abs=1e3), st.integers(2, 4))
def test_bitdelta_more_masks_never_worse(delta, k):
    """||r - α·sign(r)||² = ||r||² - n·α² with α = mean|r|: every extra mask can only shrink the residual."""
    d = delta.float()
    errors = [float((BitDeltaCompressor(k=j).encode(d).decode() - d).norm()) for j in range(1, k + 1)]
    scale = float(d.norm()) + 1e-12
    assert all(b <= a + 1e-5 * scale for a, b in zip(errors, errors[1:])), errors
    assert errors[0] <= scale * (1 + 1e-5)  # never worse than storing nothing


# -------------------------------------------------------------------------------------------- file round trips
@st.composite
def state_pairs(draw):
    """A base and a fine-tuned state dict: a few Linear weights (compressed) and vectors (kept dense)."""
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    n_linear = draw(st.integers(1, 3))
    base, ft, linear = {}, {}, set()
    for i in range(n_linear):
        shape = draw(matrices)
        name = f"layers.{i}.proj.weight"
        base[name] = torch.randn(shape, generator=gen)
        change = draw(st.sampled_from(["random", "zero-rows", "unchanged"]))
        delta = torch.randn(shape, generator=gen) * 0.01
        if change == "zero-rows":
            delta[: shape[0] // 2] = 0
        elif change == "unchanged":
            delta.zero_()
        ft[name] = base[name] + delta
        linear.add(name)
    for i in range(draw(st.integers(0, 2))):
        size = draw(st.integers(1, 17))
        base[f"norm.{i}.weight"] = torch.ones(size)
        ft[f"norm.{i}.weight"] = torch.ones(size) + torch.randn(size, generator=gen) * 0.1
    return base, ft, linear


@SLOW
@given(state_pairs(), st.integers(1, 2), st.sampled_from([64, 500, "2GB"]))
def test_file_roundtrip_is_exact(pair, k, shard_size):
    base, ft, linear = pair
    delta = compress_delta(base, ft, linear_names=linear, k=k, base_model="me/base")
    folder = Path(tempfile.mkdtemp(prefix="prop-delta-"))
    try:
        delta.save(folder, max_shard_size=shard_size)
        loaded = CompressedDelta.load(folder)
        assert loaded.entries.keys() == delta.entries.keys()
        for name, entry in delta.entries.items():
            got = loaded.entries[name]
            assert got.kind == entry.kind and got.shape == entry.shape
            assert got.tensors.keys() == entry.tensors.keys()
            for part, tensor in entry.tensors.items():
                assert got.tensors[part].dtype == tensor.dtype and torch.equal(got.tensors[part], tensor)
        assert (loaded.method, loaded.method_config, loaded.base_fingerprint) == (
            delta.method,
            delta.method_config,
            delta.base_fingerprint,
        )
        a, b = delta.apply_to_state_dict(base), loaded.apply_to_state_dict(base)
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------- corruption
@pytest.fixture(scope="module")
def saved_delta(tmp_path_factory):
    torch.manual_seed(0)
    base = {f"l{i}.weight": torch.randn(24, 40) for i in range(3)} | {"norm.weight": torch.ones(40)}
    ft = {n: t + 0.01 * torch.randn_like(t) for n, t in base.items()}
    delta = compress_delta(base, ft, linear_names={n for n in base if n.startswith("l")}, k=2)
    folder = tmp_path_factory.mktemp("delta")
    delta.save(folder, max_shard_size=200)  # several shards
    files = sorted(p.name for p in folder.iterdir())
    assert len(files) >= 3
    return folder, files, {n: t.clone() for n, t in delta.apply_to_state_dict(base).items()}, base


def _damage_and_load(saved_delta, file_index, action, position, mask):
    folder, files, rebuilt, base = saved_delta
    work = Path(tempfile.mkdtemp(prefix="prop-corrupt-"))
    try:
        for name in files:
            shutil.copy(folder / name, work / name)
        target = work / files[file_index % len(files)]
        data = bytearray(target.read_bytes())
        if action == "flip":
            data[position % len(data)] ^= mask
        else:
            data = data[: position % len(data)]
        target.write_bytes(bytes(data))
        try:
            loaded = CompressedDelta.load(work)
        except DeltaFormatError as err:  # refused, with an actionable message
            assert str(err) and type(err).__name__.endswith("Error")
            return "refused"
        # accepted only when the damage did not change the content (e.g. JSON whitespace -> other whitespace): the
        # same weights and the same metadata (base fingerprint, k, distillation flag, ... as shown in the card)
        got = loaded.apply_to_state_dict(base)
        assert got.keys() == rebuilt.keys() and all(torch.equal(got[n], rebuilt[n]) for n in got)
        assert read_delta_metadata(work) == read_delta_metadata(folder)
        return "harmless"
    finally:
        shutil.rmtree(work, ignore_errors=True)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(0, 50), st.integers(0, 10**7), st.integers(1, 255))
def test_any_byte_flip_is_refused_or_harmless(saved_delta, file_index, position, mask):
    _damage_and_load(saved_delta, file_index, "flip", position, mask)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(0, 50), st.integers(0, 10**7))
def test_any_truncation_is_refused(saved_delta, file_index, position):
    folder, files, _, _ = saved_delta
    name = files[file_index % len(files)]
    size = (folder / name).stat().st_size
    kept = position % size
    outcome = _damage_and_load(saved_delta, file_index, "truncate", position, 0)
    if name.endswith(".safetensors") or kept < len((folder / name).read_bytes().rstrip()):
        assert outcome == "refused", (name, kept, size)


def test_flip_in_a_shard_names_the_checksum(saved_delta):
    folder, files, _, _ = saved_delta
    shard = next(n for n in files if n.endswith(".safetensors"))
    work = Path(tempfile.mkdtemp())
    try:
        for name in files:
            shutil.copy(folder / name, work / name)
        data = bytearray((work / shard).read_bytes())
        data[-1] ^= 1
        (work / shard).write_bytes(bytes(data))
        with pytest.raises(DeltaFormatError, match="does not match its recorded sha256"):
            CompressedDelta.load(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
