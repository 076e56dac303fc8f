"""The command line: parsing, clear errors, and real train → eval → attack runs on the bundled MiniLM."""

from __future__ import annotations

import json

import pytest

from hf_obliviate.cli import TrainConfig, load_examples, main


def test_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("train", "attack", "eval", "compress", "push", "pull"):
        assert f"  {name}" in out


def test_unknown_command_and_bad_arguments_are_clear(capsys, tmp_path):
    assert main(["frobnicate"]) == 2
    assert "unknown command" in capsys.readouterr().err
    assert main(["attack"]) == 1
    assert "Name the attack first" in capsys.readouterr().err
    assert main(["eval"]) == 1
    assert "--model is required" in capsys.readouterr().err
    with pytest.raises(ValueError, match="Unknown --peft"):
        TrainConfig(peft="bitfit")
    with pytest.raises(ValueError, match="does not exist"):
        TrainConfig(train_file=str(tmp_path / "missing.csv"))


def test_load_examples_reads_csv_and_jsonl(tmp_path):
    (tmp_path / "d.csv").write_text("sentence,y\ngreat film,1\nawful,0\n")
    assert load_examples(str(tmp_path / "d.csv"), "sentence", "y") == [
        {"text": "great film", "label": 1},
        {"text": "awful", "label": 0},
    ]
    (tmp_path / "d.jsonl").write_text('{"text": "fine", "label": 1}\n\n{"text": "bad", "label": 0}\n')
    assert [e["label"] for e in load_examples(str(tmp_path / "d.jsonl"))] == [1, 0]
    with pytest.raises(ValueError, match="lacks the column"):
        load_examples(str(tmp_path / "d.csv"))
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(ValueError, match="Cannot read"):
        load_examples(str(tmp_path / "d.txt"))


@pytest.mark.slow
def test_train_eval_and_attack_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_OBLIVIATE_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "train.jsonl"
    rows = [
        {"text": f"{'a wonderful' if i % 2 else 'a dreadful'} movie number {i}", "label": i % 2} for i in range(32)
    ]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "adapter"
    argv = ["train", "--train_file", str(data), "--peft", "lora", "--max_steps", "2", "--output_dir", str(out),
            "--per_device_train_batch_size", "8", "--lambda_attn", "1e-2"]  # fmt: skip
    assert main(argv) == 0
    assert (out / "adapter_model.safetensors").is_file() and (out / "obliviate_run.json").is_file()
    # the defaults' consistency term scanned the vocabulary first and said what it found
    assert "Trigger scan, most suspicious first: " in capsys.readouterr().out
    assert main(argv) == 0  # cached by settings hash
    assert "nothing to do" in capsys.readouterr().out
    report = tmp_path / "eval.json"
    assert main(["eval", "--model", str(out), "--n", "12", "--triggers", "cf", "mn", "--json", str(report)]) == 0
    result = json.loads(report.read_text())
    assert result["n"] == 12 and 0.0 <= result["cacc"] <= 1.0 and set(result["per_trigger_asr"]) == {"cf", "mn"}
    planted = tmp_path / "por"
    argv = ["attack", "por", "--num_steps", "1", "--batch_size", "2", "--output_dir", str(planted)]
    assert main(argv) == 0
    assert (planted / "obliviate_attack.json").is_file()
