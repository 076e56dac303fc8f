"""Compress a fine-tuned model against its base and push the delta + a model card to the Hub in one commit."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from hf_obliviate.delta import (
    DELTA_CONFIG_NAME,
    DistillConfig,
    compress_checkpoints,
    compress_model,
    distill_scales,
    fingerprint_checkpoint,
    is_peft_model,
    logit_mse,
    lora_size_tradeoff,
    merge_lora,
    read_delta_metadata,
)
from hf_obliviate.delta.checkpoint import resolve_checkpoint
from hf_obliviate.delta.compress import model_class_name
from hf_obliviate.delta.format import LORA_MODES, check_scale_factor, label_fields
from hf_obliviate.delta.writer import build_metadata, write_json_atomic
from hf_obliviate.models import held_load_report

from .card import build_model_card

__all__ = [
    "HubAuthError",
    "build_delta_folder",
    "ensure_repo",
    "load_base_model",
    "push_compressed_delta",
    "upload_delta_folder",
]

logger = logging.getLogger(__name__)


class HubAuthError(PermissionError):
    """The Hub endpoint refused the request for lack of a (valid) token."""


def load_base_model(
    base_model: str | os.PathLike,
    model_class: str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    **kwargs: Any,
) -> tuple[torch.nn.Module, Path, str | None, list[str]]:
    """Loads a base checkpoint (local folder or Hub id) with a transformers class named in the delta metadata.

    Only classes defined in ``transformers`` are used and ``trust_remote_code`` is never set. Returns
    ``(model, local folder, revision, missing keys)``; missing keys are parameters the checkpoint lacks (e.g. a new
    classification head), initialised at random by transformers.
    """
    import transformers

    folder, rev = resolve_checkpoint(base_model, revision, token)
    cls = getattr(transformers, model_class, None) if model_class else None
    if cls is None or not isinstance(cls, type) or not hasattr(cls, "from_pretrained"):
        cls = transformers.AutoModel
    kwargs.pop("trust_remote_code", None)
    with held_load_report():  # the callers handle the missing keys (a head the delta or the adapter supplies)
        model, info = cls.from_pretrained(str(folder), output_loading_info=True, **kwargs)
    return model.eval(), folder, rev, list(info.get("missing_keys") or [])


# peft task types -> the transformers auto class whose head the adapter was trained on (its modules_to_save)
_TASK_CLASSES = {
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
}


def _load_adapter_folder(folder: Path, base_model, base_revision, token) -> tuple[torch.nn.Module, str]:
    """A saved peft adapter on its base, the base built with the head of the adapter's task type (a classifier's
    label count read from the head saved in the adapter), so that the head it trained is not dropped."""
    from peft import PeftModel
    from safetensors import safe_open

    adapter = json.loads((folder / "adapter_config.json").read_text())
    base_id = base_model or adapter.get("base_model_name_or_path")
    if not base_id:
        raise ValueError(f"{folder} names no base model: pass base_model (the Hub id or folder it was trained on).")
    kwargs = {}
    heads = adapter.get("modules_to_save") or []
    weights = folder / "adapter_model.safetensors"
    if adapter.get("task_type") in ("SEQ_CLS", "TOKEN_CLS") and heads and weights.is_file():
        with safe_open(str(weights), framework="pt") as f:
            shapes = [f.get_slice(k).get_shape() for k in f.keys() if k.endswith(tuple(f".{h}.weight" for h in heads))]
        if shapes:
            kwargs["num_labels"] = shapes[0][0]
    task_class = _TASK_CLASSES.get(adapter.get("task_type"))
    base, _, _, _ = load_base_model(base_id, task_class, base_revision, token, **kwargs)
    return PeftModel.from_pretrained(base, str(folder)), base_id


def _peft_base_id(model) -> str | None:
    cfg = getattr(model, "peft_config", {}).get(getattr(model, "active_adapter", "default"))
    return getattr(cfg, "base_model_name_or_path", None)


def _check_options(
    method: str, lora: str, calibration_ids: torch.Tensor | None, distill: DistillConfig | None, scale_factor: float
) -> tuple[DistillConfig | None, float]:
    """Refuse a combination of push options that cannot work (before any repo is made or weight is read); returns
    ``(distill or None when it has no steps, the checked scale_factor)``."""
    if lora not in LORA_MODES:
        raise ValueError(f"lora must be one of {LORA_MODES} (got {lora!r}).")
    distill = distill if distill is not None and distill.steps > 0 else None
    if lora == "factors" and (calibration_ids is not None or distill is not None):
        raise ValueError(
            "lora='factors' stores the adapter as is (nothing is compressed), so calibration_ids (the compressed"
            " delta's logit MSE) and distill (its scales) have nothing to act on: use lora='merged' or drop them."
        )
    if distill is not None and (method != "bitdelta" or calibration_ids is None):
        raise ValueError(
            "Scale distillation needs method='bitdelta' and calibration_ids (token ids of calibration text)."
        )
    scale_factor = check_scale_factor(scale_factor)
    if scale_factor != 1.0 and (method != "bitdelta" or lora == "factors"):
        raise ValueError(
            "scale_factor shrinks a BitDelta delta: it needs method='bitdelta' and, for peft models, lora='merged' "
            f"(got method={method!r}, lora={lora!r})."
        )
    return distill, scale_factor


def build_delta_folder(
    model_or_dir: torch.nn.Module | str | os.PathLike,
    base_model: str | os.PathLike | None,
    output_dir: str | os.PathLike,
    *,
    method: str = "bitdelta",
    k: int = 1,
    method_kwargs: dict[str, Any] | None = None,
    non_linear: str = "dense",
    lora: str = "merged",
    base_revision: str | None = None,
    token: str | bool | None = None,
    calibration_ids: torch.Tensor | None = None,
    distill: DistillConfig | None = None,
    scale_factor: float = 1.0,
    defense: dict[str, Any] | None = None,
    evaluation: dict[str, Any] | None = None,
    repo_id: str | None = None,
    max_shard_size: int | str = "2GB",
    progress: bool = True,
) -> Path:
    """Writes the exact files a push uploads (``obliviate_delta.json``, shards or adapter files, ``README.md``).

    ``model_or_dir`` is a fine-tuned model (transformers or peft) or a checkpoint folder. Folders of full models are
    compressed streaming; peft models are merged (``lora="merged"``, the security-relevant path) or stored as raw
    factors (``lora="factors"``). See [`push_compressed_delta`] for the arguments.
    """
    distill, scale_factor = _check_options(method, lora, calibration_ids, distill, scale_factor)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    kw = dict(method_kwargs or {})
    if method == "bitdelta":
        kw.setdefault("k", k)

    is_dir = isinstance(model_or_dir, (str, os.PathLike))
    if is_dir and (Path(model_or_dir) / "adapter_config.json").is_file():
        model_or_dir, base_model = _load_adapter_folder(Path(model_or_dir), base_model, base_revision, token)
        is_dir = False
    if not is_dir and is_peft_model(model_or_dir):
        base_model = base_model or _peft_base_id(model_or_dir)
    if base_model is None:
        raise ValueError("Pass base_model (the Hub id or folder of the weights the model was fine-tuned from).")

    library_name = "hf-obliviate"
    lora_tradeoff = None
    if is_dir and distill is None and calibration_ids is None:
        compress_checkpoints(
            base_model,
            model_or_dir,
            output_dir,
            method,
            base_revision=base_revision,
            token=token,
            non_linear=non_linear,
            max_shard_size=max_shard_size,
            scale_factor=scale_factor,
            progress=progress,
            **kw,
        )
        meta = read_delta_metadata(output_dir)
    else:
        if is_dir:
            import transformers

            cfg = json.loads((Path(model_or_dir) / "config.json").read_text())
            cls = getattr(transformers, (cfg.get("architectures") or ["AutoModel"])[0], transformers.AutoModel)
            model_or_dir = cls.from_pretrained(str(model_or_dir))
        ft = model_or_dir
        peft = is_peft_model(ft)
        if peft:
            lora_tradeoff = lora_size_tradeoff(ft)
        if peft and lora == "factors":
            meta = _write_lora_factors(ft, base_model, base_revision, token, output_dir, lora_tradeoff)
            library_name = "peft"
        else:
            ft_full = merge_lora(ft) if peft else ft
            model_class = model_class_name(ft_full)
            base, base_dir, base_rev, missing = load_base_model(base_model, model_class, base_revision, token)
            base_state = {n: t for n, t in base.state_dict().items() if n not in set(missing)}
            delta = compress_model(
                _StateOnly(base_state),
                ft_full,
                method,
                base_model_id=str(base_model),
                base_revision=base_rev,
                model_class=model_class,
                non_linear=non_linear,
                progress=progress,
                **kw,
            )
            delta.base_fingerprint = fingerprint_checkpoint(base_dir)
            if lora_tradeoff is not None:
                delta.extra["lora_tradeoff"] = lora_tradeoff
                delta.extra["lora_mode"] = "merged"
            if distill is not None:
                delta = distill_scales(delta, base, ft_full, calibration_ids, distill, progress=progress)
            if scale_factor != 1.0:
                delta = delta.scaled(scale_factor)
            if calibration_ids is not None and (distill is None or scale_factor != 1.0):
                rebuilt = delta.apply(base)  # the delta as stored (a shrunk one moves away from the fine-tune)
                delta.stats["logit_mse"] = logit_mse(rebuilt, ft_full.eval(), calibration_ids)
            delta.save(output_dir, max_shard_size=max_shard_size)
            meta = read_delta_metadata(output_dir)
    card = build_model_card(meta, repo_id=repo_id, defense=defense, evaluation=evaluation, library_name=library_name)
    card.save(str(output_dir / "README.md"))
    return output_dir


class _StateOnly(torch.nn.Module):
    """Wraps a state dict so that [`compress_model`] can read it like a model."""

    def __init__(self, state: dict[str, torch.Tensor]):
        super().__init__()
        self._state = state

    def state_dict(self, *args, **kwargs):  # type: ignore[override]
        return dict(self._state)


def _write_lora_factors(ft, base_model, base_revision, token, output_dir: Path, tradeoff: dict) -> dict:
    """Raw-factor path: the adapter saved as is (safetensors) + metadata binding it to the base fingerprint."""
    base_dir, base_rev = resolve_checkpoint(base_model, base_revision, token)
    ft.save_pretrained(str(output_dir), safe_serialization=True)
    for name in ("adapter_model.bin",):
        if (output_dir / name).exists():  # never ship pickles
            (output_dir / name).unlink()
    if (output_dir / "README.md").exists():
        (output_dir / "README.md").unlink()
    adapter_bytes = (output_dir / "adapter_model.safetensors").stat().st_size
    model_class = model_class_name(ft.get_base_model())
    labels = label_fields(model_class, ft.get_base_model().config.to_dict())  # {"labels": ...} or {}
    meta = build_metadata(
        entries={},
        shards={},
        method="lora_factors",
        method_config={"adapter": getattr(ft, "active_adapter", "default")},
        base_fingerprint=fingerprint_checkpoint(base_dir),
        base_model=str(base_model),
        base_revision=base_rev,
        non_linear="dense",
        reverted=[],
        stats={},
        distillation=None,
        model_class=model_class,
        extra={
            **labels,
            "lora_tradeoff": tradeoff,
            "lora_mode": "factors",
            "adapter_files": ["adapter_config.json", "adapter_model.safetensors"],
        },
        size={"compressed_bytes": adapter_bytes, "dense_fp16_bytes": None, "ratio_vs_dense_fp16": None},
    )
    write_json_atomic(output_dir / DELTA_CONFIG_NAME, meta)
    return meta


def _delta_files(folder: Path) -> list[Path]:
    meta = read_delta_metadata(folder)
    names = [DELTA_CONFIG_NAME, "README.md", *meta["shards"], *(meta.get("extra") or {}).get("adapter_files", [])]
    return [folder / n for n in dict.fromkeys(names) if (folder / n).is_file()]


def _auth_error(err, endpoint: str, repo_id: str, token) -> HubAuthError | None:
    from huggingface_hub import get_token

    status = getattr(getattr(err, "response", None), "status_code", None)
    if status not in (401, 403):
        return None
    have = token if isinstance(token, str) else (get_token() if token is not False else None)
    why = "no Hugging Face token was found" if not have else "the token was refused (no write access?)"
    return HubAuthError(
        f"Pushing to {endpoint}/{repo_id} failed ({status}): {why}. Log in with `hf auth login`, or set the "
        "HF_TOKEN environment variable to a token with write access (or pass token=...)."
    )


def ensure_repo(repo_id: str, *, token: str | bool | None = None, private: bool | None = None) -> None:
    """Creates the repo if needed (``exist_ok=True``); raises [`HubAuthError`] when a token is missing or refused."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
    except HfHubHTTPError as err:
        auth = _auth_error(err, api.endpoint, repo_id, token)
        if auth is not None:
            raise auth from err
        raise


def upload_delta_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    token: str | bool | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    create_repo: bool = True,
):
    """Uploads a delta folder in **one** commit (``HfApi.create_commit`` with one ``CommitOperationAdd`` per file).

    Raises [`HubAuthError`] with the fix when the endpoint needs a token and none (or a bad one) was given.
    """
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    folder = Path(folder)
    api = HfApi(token=token)
    ops = [CommitOperationAdd(path_in_repo=p.name, path_or_fileobj=str(p)) for p in _delta_files(folder)]
    method = read_delta_metadata(folder)["method"]
    if create_repo:
        ensure_repo(repo_id, token=token, private=private)
    try:
        return api.create_commit(
            repo_id,
            ops,
            commit_message=commit_message or f"Upload compressed delta ({method}) with hf-obliviate",
            revision=revision,
        )
    except HfHubHTTPError as err:
        auth = _auth_error(err, api.endpoint, repo_id, token)
        if auth is not None:
            raise auth from err
        raise


def push_compressed_delta(
    model_or_dir: torch.nn.Module | str | os.PathLike,
    base_model: str | os.PathLike | None,
    repo_id: str,
    *,
    method: str = "bitdelta",
    k: int = 1,
    method_kwargs: dict[str, Any] | None = None,
    non_linear: str = "dense",
    lora: str = "merged",
    base_revision: str | None = None,
    calibration_ids: torch.Tensor | None = None,
    distill: DistillConfig | None = None,
    scale_factor: float = 1.0,
    defense: dict[str, Any] | None = None,
    evaluation: dict[str, Any] | None = None,
    token: str | bool | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    dry_run_dir: str | os.PathLike | None = None,
    max_shard_size: int | str = "2GB",
    progress: bool = True,
):
    """Compresses a fine-tuned model against its base and pushes the delta + model card in one commit.

    Args:
        model_or_dir (`torch.nn.Module` or `str`):
            The fine-tuned model (transformers or peft) or its checkpoint folder (safetensors).
        base_model (`str`):
            Hub id or folder of the base weights (for a peft model, defaults to the adapter's base).
        repo_id (`str`):
            Target Hub repo.
        method (`str`, *optional*, defaults to `"bitdelta"`):
            Codec (``"bitdelta"``, or the baselines ``"svd"``, ``"dare"``, ``"magnitude"``).
        k (`int`, *optional*, defaults to 1):
            BitDelta masks. k > 1 is opt-in and the card warns (it restored backdoors in METHOD §7).
        method_kwargs (`dict`, *optional*):
            Other codec options (``rank``, ``p``, ``density``, ``seed``).
        non_linear (`str`, *optional*, defaults to `"dense"`):
            ``"dense"`` keeps changed embeddings/norms/heads as dense deltas; ``"revert"`` reverts them to base.
        lora (`str`, *optional*, defaults to `"merged"`):
            For peft models: ``"merged"`` compresses the merged delta, ``"factors"`` stores the adapter as is.
        calibration_ids (`torch.Tensor`, *optional*):
            Token ids of calibration text; when given, the card reports the logit MSE to the fine-tuned model.
        distill ([`DistillConfig`], *optional*):
            Scale distillation (opt-in; needs ``calibration_ids``; the card warns).
        scale_factor (`float`, *optional*, defaults to 1.0):
            Shrink the BitDelta delta toward the base (``< 1``; [`CompressedDelta.scaled`]). In the free-lunch
            evaluation a 1-bit delta shrunk to ×0.6–0.8 lost a poisoned fine-tune's backdoor at a small accuracy
            cost; choose the factor on clean validation data (the card records it).
        defense, evaluation (`dict`, *optional*):
            Obliviate settings and evaluation results shown in the card.
        token, private, revision, commit_message:
            As in ``huggingface_hub.HfApi.create_commit``.
        dry_run_dir (`str`, *optional*):
            Write the exact files to this folder and upload nothing.

    Returns:
        ``huggingface_hub.CommitInfo``, or the ``dry_run_dir`` path on a dry run.

    Example:

    ```python
    >>> import tempfile, torch
    >>> from transformers import BertConfig, BertModel
    >>> from hf_obliviate.hub import push_compressed_delta
    >>> cfg = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    >>> d = tempfile.mkdtemp()
    >>> base = BertModel(cfg); base.save_pretrained(f"{d}/base")
    >>> ft = BertModel.from_pretrained(f"{d}/base")
    >>> _ = torch.nn.init.normal_(ft.encoder.layer[0].output.dense.weight)
    >>> out = push_compressed_delta(ft, f"{d}/base", "me/ft-delta", dry_run_dir=f"{d}/out", progress=False)
    >>> sorted(p.name for p in out.iterdir())
    ['README.md', 'delta-00001-of-00001.safetensors', 'obliviate_delta.json']

    ```
    """
    if dry_run_dir is not None:
        return build_delta_folder(
            model_or_dir, base_model, dry_run_dir, method=method, k=k, method_kwargs=method_kwargs,
            non_linear=non_linear, lora=lora, base_revision=base_revision, token=token,
            calibration_ids=calibration_ids, distill=distill, scale_factor=scale_factor, defense=defense,
            evaluation=evaluation, repo_id=repo_id, max_shard_size=max_shard_size, progress=progress,
        )  # fmt: skip
    _check_options(method, lora, calibration_ids, distill, scale_factor)  # before the repo is made
    ensure_repo(repo_id, token=token, private=private)  # fail on auth before spending time compressing
    tmp = Path(tempfile.mkdtemp(prefix="obliviate-delta-"))
    try:
        build_delta_folder(
            model_or_dir, base_model, tmp, method=method, k=k, method_kwargs=method_kwargs,
            non_linear=non_linear, lora=lora, base_revision=base_revision, token=token,
            calibration_ids=calibration_ids, distill=distill, scale_factor=scale_factor, defense=defense,
            evaluation=evaluation, repo_id=repo_id, max_shard_size=max_shard_size, progress=progress,
        )  # fmt: skip
        return upload_delta_folder(
            tmp, repo_id, token=token, revision=revision, commit_message=commit_message, create_repo=False
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
