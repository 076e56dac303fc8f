"""hf_obliviate.models.load_classifier: one clear line instead of transformers' LOAD REPORT for a new head, a warning
for a checkpoint that lacks body tensors, and the full report when loading fails."""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

from hf_obliviate.bundled import minilm_path
from hf_obliviate.models import load_classifier


def _encoder_checkpoint(folder):
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64)  # fmt: skip
    BertForMaskedLM(config).save_pretrained(folder)  # an encoder with its pre-training (MLM) head
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(folder)
    return folder


def test_new_head_is_one_info_line(tmp_path, caplog, capfd):
    folder = _encoder_checkpoint(tmp_path / "enc")
    with caplog.at_level(logging.INFO, logger="hf_obliviate.models"):
        model, _ = load_classifier(folder, num_labels=3)
    assert model.config.num_labels == 3
    assert "LOAD REPORT" not in capfd.readouterr().err + caplog.text
    head = "bert.pooler.dense.bias, bert.pooler.dense.weight, classifier.bias, classifier.weight"
    assert f"new 3-label classification head ({head})" in caplog.text  # the MLM checkpoint has no pooler
    assert "checkpoint tensors the classifier does not use" in caplog.text  # the MLM head
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_missing_body_tensors_warn(tmp_path, caplog):
    folder = _encoder_checkpoint(tmp_path / "enc")
    weights = load_file(folder / "model.safetensors")
    dropped = [k for k in weights if "attention.self.query" in k]
    save_file({k: v for k, v in weights.items() if k not in dropped}, folder / "model.safetensors",
              metadata={"format": "pt"})  # fmt: skip
    with caplog.at_level(logging.INFO, logger="hf_obliviate.models"):
        load_classifier(folder)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and f"lacks {len(dropped)} tensors of the model body" in warnings[0]
    assert "attention.self.query.weight" in warnings[0] and "right checkpoint" in warnings[0]


def test_failed_load_shows_the_report(tmp_path, caplog, capfd):
    folder = _encoder_checkpoint(tmp_path / "enc")
    weights = load_file(folder / "model.safetensors")
    key = next(k for k in weights if k.endswith("attention.self.query.weight"))
    weights[key] = torch.zeros(16, 16)  # a size mismatch: transformers refuses after its report
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(RuntimeError):
        load_classifier(folder)
    assert "LOAD REPORT" in capfd.readouterr().err + caplog.text  # transformers' handler or propagated to pytest's


def test_trained_head_is_required_for_evaluation(tmp_path):
    from hf_obliviate.cli_attacks import load_for_eval

    folder = _encoder_checkpoint(tmp_path / "enc")
    with pytest.raises(ValueError, match="has no trained classification head .*classifier.weight"):
        load_for_eval(str(folder))
    model, _ = load_classifier(folder, num_labels=3)
    model.save_pretrained(tmp_path / "clf")
    AutoTokenizer.from_pretrained(folder).save_pretrained(tmp_path / "clf")
    loaded, _ = load_for_eval(str(tmp_path / "clf"))  # its own 3 labels, not the default 2
    assert loaded.config.num_labels == 3
    torch.testing.assert_close(loaded.classifier.weight, model.classifier.weight)


def test_another_threads_report_is_not_held(tmp_path, caplog):
    import threading

    from hf_obliviate.models import held_load_report

    target = logging.getLogger("transformers.modeling_utils")
    with caplog.at_level(logging.WARNING, logger="transformers.modeling_utils"), held_load_report() as held:
        target.warning("BertModel LOAD REPORT from: here")  # this thread: held back
        other = threading.Thread(target=target.warning, args=("BertModel LOAD REPORT from: elsewhere",))
        other.start()
        other.join()
    assert [r.getMessage() for r in held.held] == ["BertModel LOAD REPORT from: here"]
    assert "from: elsewhere" in caplog.text and "from: here" not in caplog.text
