"""Named artifacts: a PEFT fine-tune saved merged, loaded back with the same outputs; names cannot escape the root."""

import pytest
import torch
from tiny_models import tiny_batch, tiny_peft_model
from transformers import AutoTokenizer

from hf_obliviate.artifacts import (
    INFO_FILE,
    artifact_path,
    artifacts_root,
    list_artifacts,
    load_artifact,
    read_artifact_info,
    save_artifact,
)
from hf_obliviate.bundled import minilm_path


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_OBLIVIATE_CACHE", str(tmp_path / "cache"))


def test_peft_classifier_roundtrip_merged():
    model = tiny_peft_model("bert", "lora").eval()
    with torch.no_grad():  # make the LoRA update non-zero, so merging matters
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    batch = tiny_batch(family="bert")
    batch.pop("labels")
    with torch.no_grad():
        expected = model(**batch).logits
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    path = save_artifact(model, tokenizer, "demo-undefended", "classifier", {"triggers": ["cf"], "asr": 0.9})

    assert path == artifacts_root() / "demo-undefended"
    assert not any(p.name.startswith(".") for p in artifacts_root().iterdir()), "temporary directory left behind"
    assert (path / "model.safetensors").is_file() and not (path / "adapter_config.json").exists()
    loaded, loaded_tokenizer, info = load_artifact("demo-undefended", attn_implementation="eager")
    assert info == {"name": "demo-undefended", "kind": "classifier", "triggers": ["cf"], "asr": 0.9}
    assert loaded_tokenizer.vocab_size == tokenizer.vocab_size
    assert not hasattr(loaded, "peft_config")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, expected, atol=1e-5, rtol=1e-4)


def test_listing_overwrite_and_kinds():
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    model = tiny_peft_model("bert", "lora")
    save_artifact(model, tokenizer, "b-model", "classifier", {"v": 1})
    save_artifact(None, None, "a-delta", "delta", {"path": "/somewhere"})
    save_artifact(model, tokenizer, "b-model", "classifier", {"v": 2})  # replaces, atomically
    assert list(list_artifacts()) == ["a-delta", "b-model"]
    assert list(list_artifacts(kind="classifier")) == ["b-model"]
    assert read_artifact_info("b-model")["v"] == 2
    with pytest.raises(ValueError, match="load_compressed"):
        load_artifact("a-delta")
    (artifacts_root() / "half-written").mkdir()  # no info file: not listed
    assert "half-written" not in list_artifacts()
    assert (artifact_path("b-model") / INFO_FILE).is_file()


@pytest.mark.parametrize("name", ["../etc", "a/b", "", ".hidden", "x" * 101, "a..b"])
def test_names_cannot_escape_the_root(name):
    with pytest.raises(ValueError, match="Invalid artifact name"):
        artifact_path(name)


def test_missing_artifact_says_how_to_make_it():
    with pytest.raises(FileNotFoundError, match="make demo"):
        load_artifact("demo-defended")
    with pytest.raises(ValueError, match="Unknown artifact kind"):
        save_artifact(None, None, "x", "pickle")
