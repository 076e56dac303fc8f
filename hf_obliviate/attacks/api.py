"""One entry point for every task-agnostic attack, with the planted-model cache."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import fields

from ._common import ATTACK_INFO_FILE, BackdoorConfig, attack_cache_dir, load_attack_info, resolve_device, save_planted
from .badpre import BadPreConfig, plant_badpre
from .neuba import NeuBAConfig, plant_neuba
from .por import PORConfig, plant_por
from .uor import UORConfig, plant_uor

__all__ = ["ATTACKS", "get_attack_config", "plant_backdoor"]

ATTACKS: dict[str, tuple[type[BackdoorConfig], callable]] = {
    "badpre": (BadPreConfig, plant_badpre),
    "neuba": (NeuBAConfig, plant_neuba),
    "por": (PORConfig, plant_por),
    "uor": (UORConfig, plant_uor),
}


def _attack(attack: str):
    key = attack.lower()
    if key not in ATTACKS:
        raise ValueError(f"Unknown attack {attack!r}: choose one of {', '.join(sorted(ATTACKS))}.")
    return key, ATTACKS[key]


def get_attack_config(attack: str, **kwargs) -> BackdoorConfig:
    """The config dataclass of ``attack`` built from ``kwargs`` (unknown names raise a `ValueError`)."""
    key, (config_cls, _) = _attack(attack)
    names = {f.name for f in fields(config_cls)}
    unknown = sorted(set(kwargs) - names)
    if unknown:
        raise ValueError(f"{config_cls.__name__} has no fields {unknown}; valid fields: {sorted(names)}.")
    return config_cls(**kwargs)


def plant_backdoor(
    attack: str,
    model_name_or_path,
    config: BackdoorConfig | None = None,
    output_dir: str | os.PathLike | None = None,
    corpus: Sequence[str] | None = None,
    use_cache: bool = True,
    cache_root: str | os.PathLike | None = None,
    show_progress: bool = True,
    log_history: list | None = None,
    **config_kwargs,
):
    """Plant ``attack`` (``"por"``, ``"neuba"``, ``"badpre"`` or ``"uor"``) into an encoder, with caching.

    With ``use_cache`` the planted checkpoint lives in `attack_cache_dir` (``~/.cache/hf_obliviate/attacks/
    <attack>-<config hash>/`` by default, ``$HF_OBLIVIATE_CACHE`` or ``cache_root`` to move it): if it already holds
    a complete checkpoint, it is loaded instead of planting again (``log_history`` then stays empty).

    Args:
        attack (`str`):
            Attack name.
        model_name_or_path (`str` or `os.PathLike`):
            Local checkpoint of the clean encoder.
        config ([`BackdoorConfig`], *optional*):
            The attack's config; if omitted it is built from ``config_kwargs`` (e.g. ``num_steps=300``).
        output_dir (`str` or `os.PathLike`, *optional*):
            Also save the planted checkpoint there.
        corpus, show_progress, log_history:
            As in [`plant_por`].
        use_cache (`bool`, *optional*, defaults to `True`), cache_root (`str`, *optional*):
            Cache control.

    Returns:
        `tuple`: ``(model, tokenizer)``; a cached model is reloaded with the class the attack saved (`AutoModel`
        for POR/UOR, `AutoModelForPreTraining` for NeuBA/BadPre).

    Example:
    ```python
    >>> from hf_obliviate.attacks import plant_backdoor
    >>> from hf_obliviate.bundled import minilm_path
    >>> model, tok = plant_backdoor("por", minilm_path(), num_steps=2, batch_size=2, use_cache=False,
    ...                             show_progress=False)
    >>> model.config.obliviate_attack["attack"]
    'por'
    ```
    """
    key, (config_cls, plant) = _attack(attack)
    if config is None:
        config = get_attack_config(key, **config_kwargs)
    elif config_kwargs:
        raise ValueError("Pass either `config` or config fields as keyword arguments, not both.")
    elif not isinstance(config, config_cls):
        raise ValueError(f"Attack {key!r} needs a {config_cls.__name__}, got {type(config).__name__}.")
    cache = attack_cache_dir(key, config, model_name_or_path, corpus, cache_root) if use_cache else None
    if cache is not None and (cache / ATTACK_INFO_FILE).is_file():
        from transformers import AutoModel, AutoModelForPreTraining, AutoTokenizer

        model_cls = AutoModel if key in ("por", "uor") else AutoModelForPreTraining
        model = model_cls.from_pretrained(cache).to(resolve_device(config.device)).eval()
        tokenizer = AutoTokenizer.from_pretrained(cache)
        info = load_attack_info(cache)
        model.config.obliviate_attack = {"attack": info["attack"], "triggers": info["triggers"]}
        if output_dir is not None:
            save_planted(model, tokenizer, output_dir, info)
        return model, tokenizer
    model, tokenizer = plant(
        model_name_or_path,
        config,
        output_dir=cache if cache is not None else output_dir,
        corpus=corpus,
        show_progress=show_progress,
        log_history=log_history,
    )
    if output_dir is not None and cache is not None:
        save_planted(model, tokenizer, output_dir, load_attack_info(cache))
    return model, tokenizer
