"""Which tensors are the tuner's own: selected through peft's module classes, never by name substrings."""

from __future__ import annotations

import inspect
import types
from typing import Any

from torch import nn

__all__ = ["UnsupportedTunerError", "describe_tuner", "peft_type_of", "prepare_prefix_tuning", "tuner_parameters"]


class UnsupportedTunerError(ValueError):
    """Raised when a model carries no PEFT tuner we can find trainable tensors in."""


def _peft_classes():
    try:
        from peft import PeftModel
        from peft.tuners.prefix_tuning import PrefixEncoder
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils.other import AuxiliaryTrainingWrapper
    except ImportError:  # pragma: no cover - peft is a dependency
        return None
    return PeftModel, BaseTunerLayer, AuxiliaryTrainingWrapper, PrefixEncoder


def _active_adapters(module: nn.Module) -> list[str]:
    active = getattr(module, "active_adapters", None)
    if active is None:
        active = getattr(module, "active_adapter", "default")
    return [active] if isinstance(active, str) else list(active)


def tuner_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Return ``(name, parameter)`` for every trainable tensor of the active PEFT tuner(s) of ``model``.

    * peft tuner layers (LoRA, DoRA, IA3, AdaLoRA, ... any ``BaseTunerLayer``): the containers named in the layer
      class's ``adapter_layer_names`` (LoRA: ``lora_A``, ``lora_B``, ``lora_magnitude_vector``; IA3: ``ia3_l``),
      for the active adapters;
    * our bottleneck adapters (:class:`hf_obliviate.bottleneck.BottleneckAdapterLayer`): ``adapter_down``,
      ``adapter_up`` with their biases;
    * prompt learning: the prefix encoder's projection MLP when ``prefix_projection=True``, else its embedding;
      the prompt encoder's parameters for other prompt-learning methods.

    The task head (``modules_to_save``, a classifier) is never included.

    Raises:
        UnsupportedTunerError: when no such tensor requires grad, with what to do.
    """
    classes = _peft_classes()
    from .bottleneck import BottleneckAdapterLayer

    found: dict[int, tuple[str, nn.Parameter]] = {}

    def add(prefix: str, obj) -> None:
        if isinstance(obj, nn.Parameter):
            if obj.requires_grad:
                found.setdefault(id(obj), (prefix, obj))
        elif isinstance(obj, nn.Module):
            for name, param in obj.named_parameters():
                if param.requires_grad:
                    found.setdefault(id(param), (f"{prefix}.{name}", param))

    tuner_layer_types: tuple[type, ...] = (BottleneckAdapterLayer,)
    aux_types: tuple[type, ...] = ()
    if classes is not None:
        peft_model_cls, base_tuner_layer, aux_wrapper, prefix_encoder = classes
        tuner_layer_types += (base_tuner_layer,)
        aux_types = (aux_wrapper,)

    skip_prefixes: list[str] = []
    for mod_name, module in model.named_modules():
        if aux_types and isinstance(module, aux_types):
            skip_prefixes.append(mod_name + ".")  # modules_to_save / trainable tokens: never amplified
            continue
        if any(mod_name.startswith(p) for p in skip_prefixes):
            continue
        if isinstance(module, tuner_layer_types):
            for layer_name in module.adapter_layer_names:
                container = getattr(module, layer_name, None)
                if container is None:
                    continue
                for adapter in _active_adapters(module):
                    if adapter in container:
                        add(f"{mod_name}.{layer_name}.{adapter}", container[adapter])

    if classes is not None and isinstance(model, classes[0]) and model.active_peft_config.is_prompt_learning:
        adapter = model.active_adapter
        encoder = model.prompt_encoder[adapter]
        if isinstance(encoder, classes[3]) and getattr(encoder, "prefix_projection", False):
            add(f"prompt_encoder.{adapter}.transform", encoder.transform)
        else:
            add(f"prompt_encoder.{adapter}", encoder)

    if not found:
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        raise UnsupportedTunerError(
            f"Found no trainable PEFT tuner tensors in {type(model).__name__}"
            + (
                f" (trainable tensors: {', '.join(trainable[:5])}{', ...' if len(trainable) > 5 else ''})"
                if trainable
                else ""
            )
            + ". Wrap the model with `peft.get_peft_model(model, LoraConfig(...))` (LoRA, DoRA, IA3, prefix tuning, "
            "...) or `hf_obliviate.get_bottleneck_model(model, BottleneckConfig(...))`, or set `lambda_amp=0`."
        )
    return list(found.values())


def prepare_prefix_tuning(model: nn.Module) -> None:
    """Let peft hand a prefix-tuned model its prefix, or refuse the model before any training.

    peft injects the prefix through a ``past_key_values`` argument of the base model's forward, or of its backbone's
    (it reads the forward signatures, base first), and raises a bare "Model does not support past key values" at the
    first forward pass when neither names it. transformers 5.24 renamed the argument ``cache`` in BERT, RoBERTa, Llama
    and others, and peft 0.21.2 (the newest release on 2026-11-25) still looks for the old name. So where the first of
    those forwards that takes a cache calls it ``cache``, this gives that module (this instance only) a forward that
    takes ``past_key_values`` and passes it on as ``cache``: the prefix then reaches the attention layers as before.
    Nothing changes for other tuners, or where a forward takes ``past_key_values`` itself. Safe to call again.

    Raises:
        UnsupportedTunerError: for prefix tuning on a model whose forwards take no cache at all.
    """
    if describe_tuner(model) != "PREFIX_TUNING":
        return
    base = model.base_model
    backbone_name = getattr(model, "transformer_backbone_name", None)
    modules = [base, base.get_submodule(backbone_name)] if backbone_name else [base]  # peft's order of trying
    parameters = [inspect.signature(module.forward).parameters for module in modules]
    if any("past_key_values" in names for names in parameters):
        return
    renamed = next((module for module, names in zip(modules, parameters) if "cache" in names), None)
    if renamed is not None:
        _take_past_key_values(renamed)
        return
    import peft
    import transformers

    raise UnsupportedTunerError(
        f"Prefix tuning cannot run on {type(base).__name__} with transformers {transformers.__version__} and peft "
        f"{peft.__version__}: peft passes the prefix as `past_key_values`, which this model's forward does not take "
        "(nor a `cache`). Choose another tuner (LoRA, IA3, bottleneck adapters)."
    )


def _take_past_key_values(module: nn.Module) -> None:
    """Give ``module`` (this instance) a forward that takes ``past_key_values`` and passes it on as ``cache``. Its
    signature is the old forward's plus ``past_key_values``, so that what reads it (peft; the Trainer, to keep the
    dataset columns the model takes) sees the same arguments. The old forward is kept as a bound method and the new
    one is bound too, so a deep copy of the model rebinds both to the copy."""

    def forward(self: nn.Module, *args: Any, past_key_values: Any = None, **kwargs: Any) -> Any:
        if past_key_values is not None:
            kwargs["cache"] = past_key_values
        return self._obliviate_cache_forward(*args, **kwargs)

    old = inspect.signature(module.forward)
    parameters = [p for p in old.parameters.values() if p.kind != p.VAR_KEYWORD]
    parameters.append(inspect.Parameter("past_key_values", inspect.Parameter.KEYWORD_ONLY, default=None))
    parameters += [p for p in old.parameters.values() if p.kind == p.VAR_KEYWORD]
    self_parameter = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    forward.__signature__ = old.replace(parameters=[self_parameter, *parameters])
    module._obliviate_cache_forward = module.forward
    module.forward = types.MethodType(forward, module)


def describe_tuner(model: nn.Module) -> str:
    """A short name of the model's tuner: ``"LORA"``, ``"PREFIX_TUNING"``, ``"BOTTLENECK"``, ... or ``"none"``."""
    from .bottleneck import BottleneckAdapterModel

    if isinstance(model, BottleneckAdapterModel):
        return "BOTTLENECK"
    config = getattr(model, "active_peft_config", None)
    if config is not None:
        name = str(peft_type_of(config))
        return f"{name}+DORA" if getattr(config, "use_dora", False) else name
    return "none"


def peft_type_of(config: Any) -> str | None:
    """The ``peft_type`` of a peft config as a plain string (``"LORA"``, ``"PREFIX_TUNING"``, ...); ``None`` when
    ``config`` is ``None`` or has none."""
    peft_type = getattr(config, "peft_type", None)
    return None if peft_type is None else str(getattr(peft_type, "value", peft_type))
