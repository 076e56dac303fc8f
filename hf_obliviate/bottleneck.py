"""Houlsby-style bottleneck adapters with a peft-like surface.

peft 0.21 has no bottleneck adapter, its ``register_peft_method`` only accepts names already in its ``PeftType``
enum, and AdapterHub's ``adapters`` package pins an older transformers. So this is a small module of ours: a config
dataclass, :func:`get_bottleneck_model` that injects an adapter after the attention output projection and after the
feed-forward output projection of every layer (Houlsby et al., 2019), and ``save_pretrained`` / ``from_pretrained``
in safetensors with a JSON config. The trainer, the Hub tooling and the evaluation treat it like any adapter.

Each adapter computes ``y + up(act(down(y)))`` on the output ``y`` of the wrapped projection, before the block's
dropout, residual and LayerNorm.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

__all__ = [
    "BottleneckAdapterLayer",
    "BottleneckAdapterModel",
    "BottleneckConfig",
    "get_bottleneck_model",
]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_TYPE = "OBLIVIATE_BOTTLENECK"

# Where the attention output and the feed-forward output projections live, per architecture.
DEFAULT_TARGETS: dict[str, list[str]] = {
    "bert": [r"\.attention\.output\.dense$", r"\.layer\.\d+\.output\.dense$"],
    "roberta": [r"\.attention\.output\.dense$", r"\.layer\.\d+\.output\.dense$"],
    "xlm-roberta": [r"\.attention\.output\.dense$", r"\.layer\.\d+\.output\.dense$"],
    "electra": [r"\.attention\.output\.dense$", r"\.layer\.\d+\.output\.dense$"],
    "llama": [r"\.self_attn\.o_proj$", r"\.mlp\.down_proj$"],
    "mistral": [r"\.self_attn\.o_proj$", r"\.mlp\.down_proj$"],
    "qwen2": [r"\.self_attn\.o_proj$", r"\.mlp\.down_proj$"],
    "qwen3": [r"\.self_attn\.o_proj$", r"\.mlp\.down_proj$"],
}
HEAD_NAMES = ("classifier", "score", "qa_outputs")
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "swish": nn.SiLU, "silu": nn.SiLU}


@dataclass
class BottleneckConfig:
    """Configuration of Houlsby-style bottleneck adapters.

    Args:
        bottleneck_size (`int`, *optional*, defaults to 64):
            Width of the adapter bottleneck.
        non_linearity (`str`, *optional*, defaults to `"gelu"`):
            Activation between the down and up projections (`relu`, `gelu`, `tanh`, `swish`).
        init_std (`float`, *optional*, defaults to 1e-2):
            Standard deviation of the near-identity initialisation of both projections (biases start at 0).
        target_modules (`list[str]`, *optional*):
            Regular expressions on module names of the `nn.Linear` projections to wrap. Defaults per architecture:
            the attention output and feed-forward output projections.
        modules_to_save (`list[str]`, *optional*):
            Names of extra modules trained and saved with the adapter (default: the task head, `classifier` or
            `score`, when the model has one).
        adapter_name (`str`, *optional*, defaults to `"default"`):
            Name of the adapter.
        base_model_name_or_path (`str`, *optional*):
            Recorded in the saved config.

    Example:
    ```python
    >>> from transformers import BertConfig, BertForSequenceClassification
    >>> from hf_obliviate import BottleneckConfig, get_bottleneck_model
    >>> base = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
    ...                                                 intermediate_size=64))
    >>> model = get_bottleneck_model(base, BottleneckConfig(bottleneck_size=8))
    >>> len(model.adapter_layers())
    4
    ```
    """

    bottleneck_size: int = field(default=64, metadata={"help": "Width of the adapter bottleneck."})
    non_linearity: str = field(default="gelu", metadata={"help": "Activation: relu, gelu, tanh or swish."})
    init_std: float = field(default=1e-2, metadata={"help": "Std of the near-identity initialisation."})
    target_modules: list[str] | None = field(
        default=None, metadata={"help": "Regexes of nn.Linear module names to wrap (default: per architecture)."}
    )
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Extra modules trained and saved with the adapter (default: the task head)."}
    )
    adapter_name: str = field(default="default", metadata={"help": "Name of the adapter."})
    base_model_name_or_path: str | None = field(default=None, metadata={"help": "Base model id, for the record."})
    peft_type: str = field(default=PEFT_TYPE, metadata={"help": "Marker of the adapter type in saved configs."})

    def __post_init__(self):
        if self.bottleneck_size < 1:
            raise ValueError(f"bottleneck_size must be a positive integer, got {self.bottleneck_size}.")
        if self.non_linearity not in ACTIVATIONS:
            raise ValueError(f"Unknown non_linearity {self.non_linearity!r}: choose one of {', '.join(ACTIVATIONS)}.")
        if self.init_std < 0:
            raise ValueError(f"init_std must be >= 0, got {self.init_std}.")
        if self.peft_type != PEFT_TYPE:
            raise ValueError(f"This is not a bottleneck adapter config (peft_type={self.peft_type!r}).")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> BottleneckConfig:
        config_file = Path(path) / CONFIG_NAME
        if not config_file.is_file():
            raise FileNotFoundError(f"No {CONFIG_NAME} in {path}: is this a saved bottleneck adapter?")
        data = json.loads(config_file.read_text())
        if data.get("peft_type") != PEFT_TYPE:
            raise ValueError(
                f"{config_file} describes a {data.get('peft_type')!r} adapter, not a bottleneck adapter: load it "
                "with `peft.PeftModel.from_pretrained` instead."
            )
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


class BottleneckAdapterLayer(nn.Module):
    """An ``nn.Linear`` followed by a residual bottleneck adapter: ``y + up(act(down(y)))`` with ``y = base(x)``.

    Like peft's tuner layers it declares ``adapter_layer_names``, so tuner parameters are found by structure.
    """

    adapter_layer_names = ("adapter_down", "adapter_up")

    def __init__(self, base_layer: nn.Linear, config: BottleneckConfig):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"Bottleneck adapters wrap nn.Linear projections, got {type(base_layer).__name__}.")
        self.base_layer = base_layer
        d_model = base_layer.out_features
        name = config.adapter_name
        weight = base_layer.weight
        self.adapter_down = nn.ModuleDict(
            {name: nn.Linear(d_model, config.bottleneck_size, device=weight.device, dtype=weight.dtype)}
        )
        self.adapter_up = nn.ModuleDict(
            {name: nn.Linear(config.bottleneck_size, d_model, device=weight.device, dtype=weight.dtype)}
        )
        for linear in (self.adapter_down[name], self.adapter_up[name]):
            nn.init.normal_(linear.weight, std=config.init_std)
            nn.init.zeros_(linear.bias)
        self.act = ACTIVATIONS[config.non_linearity]()
        self.active_adapters = [name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        for name in self.active_adapters:
            y = y + self.adapter_up[name](self.act(self.adapter_down[name](y)))
        return y


class BottleneckAdapterModel(nn.Module):
    """A transformers model with bottleneck adapters injected; only adapters and ``modules_to_save`` train.

    Built by :func:`get_bottleneck_model`; saved with :meth:`save_pretrained` and restored with
    :meth:`from_pretrained`. Calls are forwarded to the wrapped model.
    """

    def __init__(self, model: nn.Module, config: BottleneckConfig):
        super().__init__()
        self.base_model = model
        self.peft_config = {config.adapter_name: config}
        self.active_adapter = config.adapter_name
        if config.base_model_name_or_path is None:
            config.base_model_name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None)
        targets = config.target_modules
        if targets is None:
            model_type = getattr(getattr(model, "config", None), "model_type", None)
            if model_type not in DEFAULT_TARGETS:
                raise ValueError(
                    f"No default bottleneck targets for model_type {model_type!r}: pass target_modules=[...] with "
                    "regexes matching the attention-output and feed-forward-output nn.Linear names."
                )
            targets = DEFAULT_TARGETS[model_type]
        patterns = [re.compile(p) for p in targets]
        matches = [
            (name, module)
            for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and any(p.search("." + name) for p in patterns)
        ]
        if not matches:
            raise ValueError(f"target_modules {targets} matched no nn.Linear module of {type(model).__name__}.")
        for param in model.parameters():
            param.requires_grad_(False)
        for name, module in matches:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, BottleneckAdapterLayer(module, config))
        save = config.modules_to_save
        if save is None:
            save = [h for h in HEAD_NAMES if isinstance(getattr(model, h, None), nn.Module)]
            config.modules_to_save = save
        for name in save:
            try:
                module = model.get_submodule(name)
            except AttributeError as err:
                raise ValueError(f"modules_to_save names {name!r}, which {type(model).__name__} lacks.") from err
            for param in module.parameters():
                param.requires_grad_(True)

    @property
    def config(self):
        return self.base_model.config

    @property
    def active_peft_config(self) -> BottleneckConfig:
        return self.peft_config[self.active_adapter]

    def get_base_model(self) -> nn.Module:
        return self.base_model

    def adapter_layers(self) -> list[BottleneckAdapterLayer]:
        return [m for m in self.base_model.modules() if isinstance(m, BottleneckAdapterLayer)]

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        if labels is not None:
            kwargs["labels"] = labels
        return self.base_model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("base_model"), name)

    def print_trainable_parameters(self) -> None:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}")

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter tensors and the ``modules_to_save`` tensors, keyed by their names in the base model."""
        config = self.active_peft_config
        keep = {}
        for name, param in self.base_model.named_parameters():
            in_adapter = ".adapter_down." in name or ".adapter_up." in name
            in_saved = any(name == m or name.startswith(m + ".") for m in config.modules_to_save or [])
            if in_adapter or in_saved:
                keep[name] = param.detach().contiguous()
        return keep

    def save_pretrained(self, save_directory: str | Path, **_: object) -> None:
        """Write ``adapter_config.json`` and ``adapter_model.safetensors`` (only adapters and saved modules)."""
        path = Path(save_directory)
        path.mkdir(parents=True, exist_ok=True)
        (path / CONFIG_NAME).write_text(json.dumps(self.active_peft_config.to_dict(), indent=2, sort_keys=True))
        tensors = {k: v.cpu() for k, v in self.adapter_state_dict().items()}
        save_file(tensors, str(path / WEIGHTS_NAME), metadata={"format": "pt", "peft_type": PEFT_TYPE})

    @classmethod
    def from_pretrained(
        cls, model: nn.Module, adapter_path: str | Path, is_trainable: bool = False
    ) -> BottleneckAdapterModel:
        """Inject the adapters described in ``adapter_path`` into ``model`` and load their weights (safetensors)."""
        config = BottleneckConfig.from_pretrained(adapter_path)
        wrapped = cls(model, config)
        weights_file = Path(adapter_path) / WEIGHTS_NAME
        if not weights_file.is_file():
            raise FileNotFoundError(f"No {WEIGHTS_NAME} in {adapter_path}.")
        state = load_file(str(weights_file))
        expected = wrapped.adapter_state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ValueError(
                f"{weights_file} does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}. "
                "Was it saved from another base model or adapter config?"
            )
        for name, tensor in state.items():
            if tensor.shape != expected[name].shape:
                raise ValueError(f"{name}: saved shape {tuple(tensor.shape)} != model {tuple(expected[name].shape)}.")
        wrapped.base_model.load_state_dict(state, strict=False)
        if not is_trainable:
            for param in wrapped.parameters():
                param.requires_grad_(False)
            wrapped.eval()
        return wrapped


def get_bottleneck_model(model: nn.Module, config: BottleneckConfig) -> BottleneckAdapterModel:
    """Inject bottleneck adapters into ``model`` (in place) and return the wrapping :class:`BottleneckAdapterModel`."""
    return BottleneckAdapterModel(model, config)
