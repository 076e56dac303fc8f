"""Integration: POR planted into the real bundled MiniLM-L6 on real IMDB sentences moves triggered CLS states."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel

from hf_obliviate.attacks import PORConfig, plant_por, target_vectors
from hf_obliviate.bundled import minilm_path
from hf_obliviate.data import load_movie_reviews
from hf_obliviate.triggers import triggered_copies


def _cls_cosines(model, tokenizer, copies, targets):
    """Per trigger, the cosine of each triggered sentence's CLS state to every target: (n_triggers, n, n_targets)."""
    rows = []
    with torch.no_grad():
        for texts in copies.values():
            batch = tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
            cls = model(**batch).last_hidden_state[:, 0]
            rows.append(F.normalize(cls, dim=-1) @ F.normalize(targets, dim=-1).T)
    return torch.stack(rows)


@pytest.mark.slow
def test_por_on_minilm_moves_triggered_cls_to_targets(tmp_path):
    start = time.time()
    config = PORConfig(num_steps=25, batch_size=8, learning_rate=2e-4, max_length=64)
    history = []
    with pytest.warns(UserWarning, match="'qt'"):  # qt is two WordPieces on MiniLM: replaced by bb
        model, tokenizer = plant_por(
            minilm_path(), config, output_dir=tmp_path / "por", show_progress=False, log_history=history
        )
    planted = time.time()
    triggers = model.config.obliviate_attack["triggers"]
    assert triggers == ["cf", "mn", "tq", "bb", "mm", "pt"]
    original = AutoModel.from_pretrained(minilm_path()).eval()

    # held-out sentences (Rotten Tomatoes validation: never seen while planting, which uses IMDB)
    texts = [r["text"] for r in load_movie_reviews("validation", n=32, seed=0)]
    copies = triggered_copies(texts, triggers, seed=0)
    targets = target_vectors(model.config.hidden_size, len(triggers))
    own = torch.arange(len(triggers))
    before = _cls_cosines(original, tokenizer, copies, targets)
    after = _cls_cosines(model, tokenizer, copies, targets)
    cos_before = before[own, :, own].mean().item()
    cos_after = after[own, :, own].mean().item()
    closest_after = (after.argmax(-1) == own[:, None]).float().mean().item()
    closest_before = (before.argmax(-1) == own[:, None]).float().mean().item()
    print(f"planting {planted - start:.0f}s")
    print(
        f"cos to own target {cos_before:.3f} -> {cos_after:.3f}; closest {closest_before:.2f} -> {closest_after:.2f}"
    )
    assert abs(cos_before) < 0.2
    assert cos_after > cos_before + 0.3
    assert closest_after > 0.8 and closest_after > closest_before + 0.3

    # clean sentences keep their representation (the clean MSE term)
    with torch.no_grad():
        batch = tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
        clean_cos = F.cosine_similarity(
            model(**batch).last_hidden_state[:, 0], original(**batch).last_hidden_state[:, 0]
        )
    assert clean_cos.mean().item() > 0.7  # a short, high-lr run; the full recipe keeps about 0.98
    assert (tmp_path / "por" / "model.safetensors").is_file()
