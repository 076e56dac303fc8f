"""``hf-obliviate compress`` / ``push`` / ``pull`` / ``hub serve``: one config dataclass and one function each
(HfArgumentParser)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hf_obliviate.delta.format import LORA_MODES, check_scale_factor

__all__ = [
    "CompressConfig",
    "PullConfig",
    "PushConfig",
    "ServeConfig",
    "compress_main",
    "pull_main",
    "push_main",
    "serve_main",
]

_METHODS = ("bitdelta", "svd", "dare", "magnitude")


def _method_kwargs(cfg) -> dict[str, Any]:
    if cfg.method == "bitdelta":
        return {"k": cfg.k}
    if cfg.method == "svd":
        return {"rank": cfg.rank}
    if cfg.method == "dare":
        return {"p": cfg.dare_p, "seed": cfg.seed}
    return {"density": cfg.density}


def _validate_method(cfg) -> None:
    if cfg.method not in _METHODS:
        raise ValueError(f"--method must be one of {_METHODS}, got {cfg.method!r}.")
    if cfg.k < 1:
        raise ValueError(f"--k must be >= 1 (1 is plain BitDelta, the safe default), got {cfg.k}.")
    try:
        check_scale_factor(cfg.scale_factor)
    except ValueError:
        raise ValueError(
            f"--scale_factor must be a finite number >= 0 (1: the delta as compressed), got {cfg.scale_factor}."
        ) from None
    if cfg.scale_factor != 1.0 and cfg.method != "bitdelta":
        raise ValueError(f"--scale_factor shrinks a BitDelta delta: use --method bitdelta (got {cfg.method!r}).")
    if cfg.non_linear not in ("dense", "revert"):
        raise ValueError(f"--non_linear must be 'dense' or 'revert', got {cfg.non_linear!r}.")


@dataclass
class _MethodFields:
    method: str = field(default="bitdelta", metadata={"help": f"Codec for nn.Linear weights: one of {_METHODS}."})
    k: int = field(default=1, metadata={"help": "BitDelta masks; k>1 is closer to the fine-tune (and its backdoors)."})
    rank: int = field(default=16, metadata={"help": "SVD baseline: kept rank."})
    dare_p: float = field(default=0.9, metadata={"help": "DARE baseline: drop probability."})
    density: float = field(default=0.1, metadata={"help": "Magnitude baseline: kept fraction."})
    seed: int = field(default=0, metadata={"help": "Random seed (DARE baseline; push: scale distillation)."})
    non_linear: str = field(
        default="dense",
        metadata={"help": "Changed embeddings/norms/heads: 'dense' (keep as fp16 delta) or 'revert' (to base)."},
    )
    scale_factor: float = field(
        default=1.0,
        metadata={
            "help": "Shrink the BitDelta delta toward the base (< 1; 1: as compressed). In the free-lunch evaluation "
            "a 1-bit delta shrunk to x0.6-0.8 lost a poisoned fine-tune's backdoor; choose it on clean data."
        },
    )


@dataclass
class CompressConfig(_MethodFields):
    """Options of ``hf-obliviate compress``: stream two checkpoints into a compressed delta folder.

    Example:

    ```python
    >>> from hf_obliviate.hub.cli import CompressConfig
    >>> CompressConfig(base="base_dir", finetuned="ft_dir", output_dir="delta").k
    1

    ```
    """

    base: str = field(default=None, metadata={"help": "Base checkpoint: local folder or Hub id."})
    finetuned: str = field(default=None, metadata={"help": "Fine-tuned checkpoint: local folder or Hub id."})
    output_dir: str = field(default=None, metadata={"help": "Folder to write obliviate_delta.json and shards to."})
    base_revision: str | None = field(default=None, metadata={"help": "Revision of the base repo."})
    max_shard_size: str = field(default="2GB", metadata={"help": "Maximum size of one delta shard."})

    def __post_init__(self):
        for name in ("base", "finetuned", "output_dir"):
            if not getattr(self, name):
                raise ValueError(f"--{name} is required.")
        _validate_method(self)


@dataclass
class PushConfig(_MethodFields):
    """Options of ``hf-obliviate push``: compress a fine-tuned checkpoint and push delta + card in one commit.

    Example:

    ```python
    >>> from hf_obliviate.hub.cli import PushConfig
    >>> PushConfig(model="ft_dir", base_model="base_dir", repo_id="me/delta", dry_run_dir="out").method
    'bitdelta'

    ```
    """

    model: str = field(default=None, metadata={"help": "Fine-tuned checkpoint or peft adapter folder."})
    base_model: str | None = field(default=None, metadata={"help": "Base model: Hub id or folder."})
    repo_id: str = field(default=None, metadata={"help": "Target Hub repo, e.g. me/my-model-delta."})
    lora: str = field(default="merged", metadata={"help": "For adapters: 'merged' (compress B·A) or 'factors'."})
    private: bool | None = field(default=None, metadata={"help": "Create the repo private."})
    revision: str | None = field(default=None, metadata={"help": "Branch to commit to."})
    dry_run_dir: str | None = field(default=None, metadata={"help": "Write the exact files here; upload nothing."})
    max_shard_size: str = field(default="2GB", metadata={"help": "Maximum size of one delta shard."})
    distill_steps: int = field(
        default=0,
        metadata={
            "help": "Scale-distillation steps on calibration text (0: off). Distillation brings the compressed model "
            "closer to the fine-tune, backdoors included: off by default, and the card warns."
        },
    )
    distill_lr: float = field(default=1e-4, metadata={"help": "Scale-distillation AdamW learning rate."})
    calibration_file: str | None = field(
        default=None,
        metadata={
            "help": "Calibration text: a .txt (one text per line), .jsonl or .csv file, or a `datasets` folder "
            "(default with --distill_steps: bundled IMDB sentences). Given alone, the card of a compressed delta "
            "reports its logit MSE to the fine-tune."
        },
    )
    calibration_column: str = field(default="text", metadata={"help": "Text column of --calibration_file."})
    calibration_sequences: int = field(default=800, metadata={"help": "Calibration windows (METHOD §4: 800)."})
    calibration_seq_len: int = field(default=128, metadata={"help": "Tokens per calibration window."})

    def __post_init__(self):
        for name in ("model", "repo_id"):
            if not getattr(self, name):
                raise ValueError(f"--{name} is required.")
        if self.lora not in LORA_MODES:
            raise ValueError(f"--lora must be one of {', '.join(LORA_MODES)}, got {self.lora!r}.")
        _validate_method(self)
        if self.distill_steps < 0:
            raise ValueError(f"--distill_steps must be >= 0 (0: off), got {self.distill_steps}.")
        if self.distill_steps and (self.method != "bitdelta" or self.lora == "factors"):
            raise ValueError(
                "--distill_steps trains BitDelta scales: use --method bitdelta and, for an adapter, --lora merged "
                f"(got --method {self.method}, --lora {self.lora})."
            )
        if self.calibration_sequences < 1 or self.calibration_seq_len < 2:
            raise ValueError("--calibration_sequences must be >= 1 and --calibration_seq_len >= 2.")
        if self.calibration_file is not None and self.lora == "factors":
            raise ValueError(
                "--calibration_file measures a compressed delta's logit MSE, but --lora factors stores the adapter as "
                "is (nothing is compressed): use --lora merged, or leave out --calibration_file."
            )
        if self.calibration_file is not None and not Path(self.calibration_file).exists():
            raise ValueError(f"--calibration_file {self.calibration_file} does not exist.")


@dataclass
class PullConfig:
    """Options of ``hf-obliviate pull``: verify and rebuild base + delta, then save the model.

    Example:

    ```python
    >>> from hf_obliviate.hub.cli import PullConfig
    >>> PullConfig(base_model="base_dir", repo_id="me/delta", output_dir="rebuilt").revision is None
    True

    ```
    """

    base_model: str = field(default=None, metadata={"help": "Base model the delta was made for: Hub id or folder."})
    repo_id: str = field(default=None, metadata={"help": "Delta repo on the Hub, or a local delta folder."})
    output_dir: str = field(
        default=None, metadata={"help": "Where to save the rebuilt model (save_pretrained; an adapter is merged in)."}
    )
    revision: str | None = field(default=None, metadata={"help": "Revision of the delta repo."})
    base_revision: str | None = field(default=None, metadata={"help": "Revision of the base repo."})

    def __post_init__(self):
        for name in ("base_model", "repo_id", "output_dir"):
            if not getattr(self, name):
                raise ValueError(f"--{name} is required.")


@dataclass
class ServeConfig:
    """Options of ``hf-obliviate hub serve``: a local Hub-compatible endpoint for development and tests.

    Example:

    ```python
    >>> from hf_obliviate.hub.cli import ServeConfig
    >>> ServeConfig(root="hub-data").host
    '127.0.0.1'

    ```
    """

    root: str = field(default=None, metadata={"help": "Folder holding the repos (created if missing, kept on exit)."})
    port: int = field(default=8765, metadata={"help": "TCP port (0 picks a free one)."})
    host: str = field(default="127.0.0.1", metadata={"help": "Interface to bind; keep the loopback (no TLS)."})
    token: str | None = field(
        default=None,
        metadata={"help": "Require this token (Authorization: Bearer) for writes, whoami and private repos."},
    )
    user: str = field(default="local-user", metadata={"help": "User name reported by whoami."})

    def __post_init__(self):
        if not self.root:
            raise ValueError("--root is required (the folder that stores the repos).")
        if not 0 <= self.port < 65536:
            raise ValueError(f"--port must be in [0, 65535], got {self.port}.")


def compress_main(cfg: CompressConfig) -> Path:
    """Runs ``hf-obliviate compress``; returns the delta folder."""
    from hf_obliviate.delta import compress_checkpoints

    out = compress_checkpoints(
        cfg.base,
        cfg.finetuned,
        cfg.output_dir,
        cfg.method,
        base_revision=cfg.base_revision,
        non_linear=cfg.non_linear,
        max_shard_size=cfg.max_shard_size,
        scale_factor=cfg.scale_factor,
        **_method_kwargs(cfg),
    )
    print(f"Compressed delta written to {out}")
    return out


def push_main(cfg: PushConfig):
    """Runs ``hf-obliviate push``; returns the commit info (or the dry-run folder)."""
    from .push import push_compressed_delta

    kw = _method_kwargs(cfg)
    k = kw.pop("k", 1)
    calibration, distill = _push_calibration(cfg)
    result = push_compressed_delta(
        cfg.model,
        cfg.base_model,
        cfg.repo_id,
        method=cfg.method,
        k=k,
        method_kwargs=kw,
        non_linear=cfg.non_linear,
        scale_factor=cfg.scale_factor,
        lora=cfg.lora,
        calibration_ids=calibration,
        distill=distill,
        private=cfg.private,
        revision=cfg.revision,
        dry_run_dir=cfg.dry_run_dir,
        max_shard_size=cfg.max_shard_size,
    )
    where = result if cfg.dry_run_dir else getattr(result, "commit_url", result)
    print(f"{'Dry run: files written to' if cfg.dry_run_dir else 'Pushed:'} {where}")
    return result


def _push_calibration(cfg: PushConfig):
    """``(calibration_ids, DistillConfig)`` for ``push``: both ``None`` unless --distill_steps or --calibration_file
    is given. The text is tokenised with the model's tokenizer, else its base's."""
    if not cfg.distill_steps and cfg.calibration_file is None:
        return None, None
    from transformers import AutoTokenizer

    from hf_obliviate.delta import DistillConfig
    from hf_obliviate.delta.calibration import calibration_ids

    tokenizer = None
    for source in (cfg.model, cfg.base_model or _adapter_base(cfg.model)):
        try:
            tokenizer = AutoTokenizer.from_pretrained(source) if source else None
        except (OSError, ValueError):
            continue
        if tokenizer is not None:
            break
    if tokenizer is None:
        raise ValueError(
            f"No tokenizer in {cfg.model} or its base for the calibration text: save the tokenizer with the model "
            "(tokenizer.save_pretrained) or pass --base_model."
        )
    ids = calibration_ids(
        tokenizer, source=cfg.calibration_file, column=cfg.calibration_column,
        num_sequences=cfg.calibration_sequences, seq_len=cfg.calibration_seq_len, seed=cfg.seed,
    )  # fmt: skip
    if not cfg.distill_steps:
        return ids, None
    print(
        f"Distilling the delta scales for {cfg.distill_steps} steps on {ids.shape[0]} calibration windows: this "
        "brings the compressed model closer to the fine-tune, backdoors included (METHOD §7); the card says so."
    )
    config = DistillConfig(
        steps=cfg.distill_steps, lr=cfg.distill_lr, num_sequences=ids.shape[0], seq_len=ids.shape[1], seed=cfg.seed
    )
    return ids, config


def _adapter_base(model: str) -> str | None:
    """The base recorded in a peft adapter folder's config, if ``model`` is one."""
    import json

    config = Path(model) / "adapter_config.json"
    return json.loads(config.read_text()).get("base_model_name_or_path") if config.is_file() else None


def pull_main(cfg: PullConfig) -> Path:
    """Runs ``hf-obliviate pull``: verified load, then ``save_pretrained`` to ``output_dir`` (an adapter stored as raw
    factors is merged into its base first, so the folder always holds a standalone transformers model)."""
    from hf_obliviate.delta import is_peft_model

    from .load import load_compressed

    model = load_compressed(cfg.base_model, cfg.repo_id, revision=cfg.revision, base_revision=cfg.base_revision)
    if is_peft_model(model):  # an adapter stored as raw factors: save base + adapter as one standalone model
        model = model.merge_and_unload()
    model.save_pretrained(cfg.output_dir)
    print(f"Rebuilt model saved to {cfg.output_dir}")
    return Path(cfg.output_dir)


def serve_main(cfg: ServeConfig, ready: Any = None) -> None:
    """Runs ``hf-obliviate hub serve`` until interrupted (Ctrl-C or SIGTERM).

    Prints ``HF_ENDPOINT=<url>`` on its own line once the port is bound. ``ready``, if given, is called with the
    running [`~hf_obliviate.hub.local.LocalHub`] (for embedding).
    """
    import logging
    import signal
    import threading

    from .local import LocalHub

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    stop = threading.Event()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with LocalHub(cfg.root, host=cfg.host, port=cfg.port, require_token=cfg.token, user=cfg.user) as hub:
        auth = "a token is required for writes" if cfg.token else "no token required (anyone on this host may write)"
        print(f"Local Hub endpoint for development and tests, serving {hub.root} ({auth}).")
        print(f"HF_ENDPOINT={hub.endpoint}", flush=True)
        if ready is not None:
            ready(hub)
        try:
            while not stop.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass
    print("Local Hub stopped; the repos stay in", cfg.root, flush=True)
