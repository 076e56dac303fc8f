"""`CompressedPushMixin`: a `transformers.Trainer` that pushes a compressed delta + model card, not full weights."""

from __future__ import annotations

import logging
from dataclasses import fields
from pathlib import Path
from typing import Any

from hf_obliviate.config import ObliviateConfig
from hf_obliviate.delta.calibration import calibration_texts, token_windows

__all__ = ["CompressedPushMixin"]

logger = logging.getLogger(__name__)


class CompressedPushMixin:
    """Trainer mixin: with ``args.delta_compression == "bitdelta"``, Hub pushes upload a compressed delta.

    Put it first in the bases (``class ObliviateTrainer(CompressedPushMixin, transformers.Trainer)``). Both the
    end-of-training [`~transformers.Trainer.push_to_hub`] and the per-save ``_push_from_checkpoint`` (triggered by
    ``hub_strategy``) then upload ``obliviate_delta.json`` + shards + ``README.md`` in one commit. Without the option,
    every push is the Trainer's own. Only the main process uploads.

    Training-argument fields read (all optional, via ``getattr``): ``delta_compression`` (``None`` or
    ``"bitdelta"``), ``delta_k`` (1), ``delta_lora`` (``"merged"`` or ``"factors"``: a peft model's exact adapter;
    with ``obliviate`` on, a compressed merged delta logs a warning), ``delta_scale_factor`` (1.0),
    ``delta_distill_steps`` (0),
    ``delta_distill_lr`` (1e-4), the calibration text ``delta_calibration_texts`` / ``delta_calibration_dataset`` +
    ``delta_calibration_column`` (default: bundled IMDB sentences), ``delta_calibration_sequences`` (800) and
    ``delta_calibration_seq_len`` (128),
    ``delta_base_model`` (defaults to the model's ``config._name_or_path``), ``delta_dry_run_dir`` (write the files
    there, upload nothing). Subclasses may override [`~CompressedPushMixin.delta_card_info`] to put defense settings
    and evaluation results in the card, and [`~CompressedPushMixin.delta_calibration_texts`] to supply calibration
    text.

    With ``delta_distill_steps > 0`` the push trains the BitDelta scales (on CPU) so the compressed model's logits
    match the fine-tuned model's on the calibration text, tokenised with the trainer's ``processing_class``. The
    model card then warns: distillation on clean text brought a planted backdoor back in METHOD §7, so it is off by
    default.

    Example:

    ```python
    >>> import transformers
    >>> from hf_obliviate.trainer.hub_mixin import CompressedPushMixin
    >>> class MyTrainer(CompressedPushMixin, transformers.Trainer):
    ...     pass

    ```
    """

    _delta_methods = ("bitdelta",)

    # ------------------------------------------------------------------------------------------------ helpers
    def _delta_compression(self) -> str | None:
        method = getattr(self.args, "delta_compression", None)
        if method is not None and method not in self._delta_methods:
            raise ValueError(f"delta_compression must be None or one of {self._delta_methods}, got {method!r}.")
        return method

    def _delta_base_model(self) -> str:
        base = getattr(self.args, "delta_base_model", None)
        if base:
            return str(base)
        model = self.accelerator.unwrap_model(self.model) if hasattr(self, "accelerator") else self.model
        peft_cfg = getattr(model, "peft_config", None)
        if peft_cfg:
            cfg = peft_cfg.get(getattr(model, "active_adapter", "default")) or next(iter(peft_cfg.values()))
            if getattr(cfg, "base_model_name_or_path", None):
                return cfg.base_model_name_or_path
        name = getattr(getattr(model, "config", None), "_name_or_path", None)
        if not name:
            raise ValueError(
                "delta_compression needs the base model: set `delta_base_model` in the training arguments to the "
                "Hub id or folder of the weights you fine-tuned from."
            )
        return name

    def delta_card_info(self) -> dict[str, Any]:
        """``{"defense": {...}, "evaluation": {...}}`` for the model card; override to add more."""
        info: dict[str, Any] = {}
        defense = {
            k: getattr(self.args, k)
            for k in (f.name for f in fields(ObliviateConfig))
            if getattr(self.args, k, None) is not None
        }
        if defense.get("obliviate") is False:  # plain PEFT training: the coefficients were not used
            defense = {"obliviate": False}
        if defense:
            info["defense"] = defense
        history = getattr(getattr(self, "state", None), "log_history", None) or []
        evals = {k: v for row in history for k, v in row.items() if k.startswith("eval_")}
        if evals:
            info["evaluation"] = evals
        return info

    def delta_calibration_texts(self) -> list[str]:
        """Calibration texts for scale distillation: ``delta_calibration_texts``, else ``delta_calibration_dataset``
        (column ``delta_calibration_column``), else the bundled IMDB sentences. Override to supply your own."""
        args = self.args
        texts = getattr(args, "delta_calibration_texts", None) or None
        source = None if texts else getattr(args, "delta_calibration_dataset", None) or None  # the texts come first
        n = int(getattr(args, "delta_calibration_sequences", 800))
        column = getattr(args, "delta_calibration_column", "text")
        return calibration_texts(texts, source, column, n, int(getattr(args, "seed", 0)))

    def _delta_distillation(self):
        """``(calibration_ids, DistillConfig)`` when ``delta_distill_steps > 0``, else ``(None, None)``."""
        steps = int(getattr(self.args, "delta_distill_steps", 0) or 0)
        if steps <= 0:
            return None, None
        from hf_obliviate.delta import DistillConfig

        tokenizer = getattr(self, "processing_class", None) or getattr(self, "tokenizer", None)
        if tokenizer is None or not callable(tokenizer):
            raise ValueError(
                "delta_distill_steps > 0 needs a tokenizer for the calibration text: pass processing_class=tokenizer "
                "to the trainer (or set delta_distill_steps=0)."
            )
        n = int(getattr(self.args, "delta_calibration_sequences", 800))
        seq_len = int(getattr(self.args, "delta_calibration_seq_len", 128))
        ids = token_windows(tokenizer, self.delta_calibration_texts(), n, seq_len)
        logger.warning(
            "Distilling the delta scales for %d steps on %d calibration sequences: this brings the compressed model "
            "closer to the fine-tuned one, backdoors included (METHOD §7); the model card says so.",
            steps,
            ids.shape[0],
        )
        config = DistillConfig(
            steps=steps,
            lr=float(getattr(self.args, "delta_distill_lr", 1e-4)),
            num_sequences=ids.shape[0],
            seq_len=ids.shape[1],
            seed=int(getattr(self.args, "seed", 0)),
        )
        return ids, config

    def _push_delta(self, source, commit_message: str, token: str | None = None, revision: str | None = None):
        from hf_obliviate.hub import build_delta_folder, upload_delta_folder

        calibration_ids, distill = self._delta_distillation()
        if distill is not None and not isinstance(source, (str, Path)):
            params = list(source.parameters())
            if params and params[0].device.type != "cpu":  # distillation runs on CPU next to the base weights
                import copy

                source = copy.deepcopy(source).to("cpu")
        dry_run = getattr(self.args, "delta_dry_run_dir", None)
        repo_id = getattr(self, "hub_model_id", None) or self.args.hub_model_id or Path(self.args.output_dir).name
        lora = getattr(self.args, "delta_lora", "merged")
        self._warn_if_defense_is_compressed(source, lora)
        kwargs = {
            "method": self._delta_compression(),
            "k": int(getattr(self.args, "delta_k", 1) or 1),
            "lora": lora,
            "repo_id": repo_id,
            "progress": not getattr(self.args, "disable_tqdm", False),
            "calibration_ids": calibration_ids,
            "distill": distill,
            "scale_factor": float(getattr(self.args, "delta_scale_factor", 1.0)),
            **self.delta_card_info(),
        }
        base = self._delta_base_model()
        if dry_run:
            out = build_delta_folder(source, base, dry_run, **kwargs)
            logger.info("delta_dry_run_dir: wrote the compressed push to %s (nothing uploaded).", out)
            return out
        import tempfile

        with tempfile.TemporaryDirectory(prefix="obliviate-push-") as tmp:
            build_delta_folder(source, base, tmp, **kwargs)
            return upload_delta_folder(
                tmp,
                repo_id,
                token=token if token is not None else self.args.hub_token,
                private=getattr(self.args, "hub_private_repo", None),
                revision=revision if revision is not None else getattr(self.args, "hub_revision", None),
                commit_message=commit_message,
            )

    def _warn_if_defense_is_compressed(self, source, lora: str) -> None:
        """Obliviate's effect against a backdoor planted in the *base* lives in the fine-tuning delta, and compressing
        a merged delta can lose it; an exact adapter (``delta_lora="factors"``) keeps it."""
        if not getattr(self.args, "obliviate", False):
            return
        if lora == "factors" and not isinstance(source, (str, Path)):  # a folder source is a full checkpoint
            from hf_obliviate.delta import is_peft_model

            if is_peft_model(source):
                return
        logger.warning(
            "Pushing an Obliviate-defended fine-tune as a compressed merged delta: the defense against a backdoor "
            "planted in the base model lives in that delta, and compression can undo it (the README measures a "
            "defended LoRA on a POR-backdoored MiniLM: ASR 0.25 fine-tuned, 1.00 after BitDelta k=1 or k=2, 0.31 "
            "with the scales distilled on clean text). For a LoRA fine-tune set delta_lora='factors' to upload the "
            "exact adapter (0.58 MiB in fp32 against 0.23 MiB for the 1-bit merge there); otherwise consider "
            "delta_distill_steps, and evaluate the compressed model before publishing it."
        )

    def _delta_source(self, folder: str | None):
        """A full checkpoint folder is compressed streaming; otherwise (peft, no folder) the in-memory model."""
        model = self.accelerator.unwrap_model(self.model) if hasattr(self, "accelerator") else self.model
        if getattr(model, "peft_config", None) or folder is None:
            return model
        folder_path = Path(folder)
        if (folder_path / "model.safetensors").is_file() or (folder_path / "model.safetensors.index.json").is_file():
            return str(folder_path)
        return model

    # -------------------------------------------------------------------------------------- Trainer overrides
    def init_hf_repo(self, token: str | None = None, private: bool | None = None) -> None:
        if self._delta_compression() and getattr(self.args, "delta_dry_run_dir", None):
            # dry run: create nothing on the Hub
            self.hub_model_id = self.args.hub_model_id or Path(self.args.output_dir).absolute().name
            self.push_in_progress = None
            return
        return super().init_hf_repo(token=token, private=private)

    def push_to_hub(
        self,
        commit_message: str | None = "End of training",
        blocking: bool = True,
        token: str | None = None,
        revision: str | None = None,
        private: bool | None = None,
        **kwargs,
    ):
        if not self._delta_compression():
            return super().push_to_hub(
                commit_message=commit_message, blocking=blocking, token=token, revision=revision, private=private,
                **kwargs,
            )  # fmt: skip
        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        if getattr(self, "hub_model_id", None) is None:
            self.init_hf_repo(token=token, private=private)
        # all processes take part in saving (TPU / FSDP); only the main one compresses and uploads
        self.save_model(_internal_call=True)
        if not self.is_world_process_zero() or not self.args.should_save:
            return None
        self._finish_current_push()
        return self._push_delta(
            self._delta_source(self.args.output_dir), commit_message or "End of training", token, revision
        )

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        if not self._delta_compression():
            return super()._push_from_checkpoint(checkpoint_folder)
        from transformers.trainer_utils import HubStrategy

        if not self.is_world_process_zero() or self.args.hub_strategy == HubStrategy.END:
            return None
        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        step = self.state.global_step
        message = f"Training in progress, step {step} (compressed delta)"
        # blocking: the delta is small, and compressing from the checkpoint folder must finish before it rotates
        self._push_delta(self._delta_source(checkpoint_folder), message)
        return None
