"""Task-agnostic backdoor attacks planted in a pretrained encoder (POR, NeuBA, BadPre, UOR), task-specific data
poisoning, and an adaptive POR that knows the Obliviate defense. For evaluation only: every attack is planted on
our own machines.

```python
>>> from hf_obliviate.attacks import plant_backdoor
>>> from hf_obliviate.bundled import minilm_path
>>> model, tokenizer = plant_backdoor("por", minilm_path(), num_steps=300)  # doctest: +SKIP
```
"""

from ._common import (
    ATTACK_INFO_FILE,
    BackdoorConfig,
    attack_cache_dir,
    balanced_sign_patterns,
    config_hash,
    load_attack_info,
    target_vectors,
)
from .api import ATTACKS, get_attack_config, plant_backdoor
from .badpre import BadPreConfig, plant_badpre
from .neuba import NeuBAConfig, plant_neuba
from .poison import poison_dataset
from .por import PORConfig, plant_por
from .uor import UORConfig, plant_uor, supervised_contrastive_loss

__all__ = [
    "ATTACKS",
    "ATTACK_INFO_FILE",
    "BackdoorConfig",
    "BadPreConfig",
    "NeuBAConfig",
    "PORConfig",
    "UORConfig",
    "attack_cache_dir",
    "balanced_sign_patterns",
    "config_hash",
    "get_attack_config",
    "load_attack_info",
    "plant_backdoor",
    "plant_badpre",
    "plant_neuba",
    "plant_por",
    "plant_uor",
    "poison_dataset",
    "supervised_contrastive_loss",
    "target_vectors",
]
