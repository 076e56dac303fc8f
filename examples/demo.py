"""`make demo`: the whole story on the bundled models, end to end, offline.

1. Plant a POR backdoor in the bundled MiniLM-L6 on IMDB sentences (cached after the first run).
2. Fine-tune LoRA on Rotten Tomatoes sentences twice: undefended, and with the Obliviate defense.
3. Print clean accuracy (CACC) and attack success rate (ASR) side by side; save both fine-tunes as artifacts for the
   Space (``demo-undefended``, ``demo-defended``).
4. Push the defended fine-tune's BitDelta delta through a local Hub endpoint and pull it back (base verified).

On 2 idle CPU cores: about 20 minutes the first time (planting ~12), about 10 afterwards (measured: 42 and 66 minutes
on a machine shared with other jobs). ``--quick`` shrinks everything to check the plumbing (4 minutes, loaded).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="Tiny sizes (plumbing check, numbers meaningless).")
    parser.add_argument("--train", type=int, default=2000, help="Fine-tuning sentences.")
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--test", type=int, default=1000, help="Test sentences (each also gets triggered copies).")
    parser.add_argument("--plant-steps", type=int, default=300, help="POR planting steps (cached per setting).")
    args = parser.parse_args()
    if args.quick:
        args.train, args.epochs, args.test, args.plant_steps = 64, 1.0, 64, 4

    import torch

    from hf_obliviate import ObliviateConfig
    from hf_obliviate.artifacts import save_artifact
    from hf_obliviate.attacks import get_attack_config, load_attack_info, plant_backdoor
    from hf_obliviate.attacks._common import attack_cache_dir
    from hf_obliviate.bundled import minilm_path
    from hf_obliviate.data import SENTIMENT_LABELS, load_movie_reviews
    from hf_obliviate.evaluation import build_eval_set, evaluate_backdoor
    from hf_obliviate.models import load_classifier, wrap_peft
    from hf_obliviate.trainer import ObliviateTrainingArguments, fine_tune

    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(os.cpu_count() or 2)
    start = time.time()
    print(f"[1/4] Planting POR in the bundled MiniLM-L6 ({args.plant_steps} steps; cached after the first run)")
    config = get_attack_config("por", num_steps=args.plant_steps)
    plant_backdoor("por", minilm_path(), config=config)
    encoder = attack_cache_dir("por", config, minilm_path())
    triggers = load_attack_info(encoder)["triggers"]

    train = load_movie_reviews("train", n=args.train, seed=0)
    eval_set = build_eval_set(load_movie_reviews("test"), triggers=triggers, n=args.test, seed=0)
    defaults = ObliviateConfig()
    results, saved = {}, {}
    for step, defended in ((2, False), (3, True)):
        name = "Obliviate" if defended else "undefended"
        role = "defended" if defended else "undefended"
        print(f"[{step}/4] LoRA fine-tune on {len(train)} Rotten Tomatoes sentences, {name}")
        torch.manual_seed(0)
        model, tokenizer = load_classifier(encoder)
        model.config.id2label = dict(enumerate(SENTIMENT_LABELS))
        model.config.label2id = {label: i for i, label in enumerate(SENTIMENT_LABELS)}
        model = wrap_peft(model, "lora")
        training = ObliviateTrainingArguments(
            output_dir=f"demo-out/{role}",
            obliviate=defended,
            lambda_amp=defaults.lambda_amp if defended else 0.0,
            lambda_attn=defaults.lambda_attn if defended else 0.0,
            learning_rate=5e-4,
            num_train_epochs=args.epochs,
            per_device_train_batch_size=16,
            warmup_steps=0.05,  # a float in [0, 1) is a ratio of the total steps
            logging_steps=25,
            save_strategy="no",
            report_to="none",
            seed=0,
        )
        fine_tune(model, tokenizer, train, training)
        results[name] = evaluate_backdoor(model, tokenizer, eval_set)
        # The Space probes these two models (a --quick run saves under other names, never over the real ones).
        info = {
            "attack": "por", "encoder": str(encoder), "triggers": list(triggers), "defended": defended,
            "lambda_amp": training.lambda_amp, "lambda_attn": training.lambda_attn,
            "cacc": results[name].cacc, "asr": results[name].asr,
        }  # fmt: skip
        artifact = f"demo{'-quick' if args.quick else ''}-{role}"
        saved[role] = save_artifact(model, tokenizer, artifact, "classifier", info)
        print(f"      saved to {saved[role]}")

    print(f"\nBackdoored MiniLM-L6 (POR, triggers {', '.join(triggers)}), LoRA on Rotten Tomatoes")
    print(f"{'':<12}{'CACC':>8}{'ASR':>8}")
    for name, result in results.items():
        flag = "  (near chance: ASR meaningless)" if result.near_chance else ""
        print(f"{name:<12}{result.cacc:>8.3f}{result.asr:>8.3f}{flag}")
    before, after = results["undefended"].asr, results["Obliviate"].asr
    if before > 0:
        print(f"ASR reduction: {100 * (before - after) / before:.1f}%")
    push_and_pull(saved["defended"], encoder)
    print(f"({(time.time() - start) / 60:.1f} min)")


def push_and_pull(model_dir, base_dir) -> None:
    """Push the defended model's BitDelta delta through a local Hub endpoint and pull it back, as a user would with
    the Hub (``hf-obliviate push`` / ``pull`` in subprocesses: huggingface_hub reads ``HF_ENDPOINT`` at import)."""
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    import torch
    from transformers import AutoModelForSequenceClassification

    from hf_obliviate.hub.local import LocalHub

    print("[4/4] Pushing the defended fine-tune as a 1-bit delta through a local Hub endpoint, and pulling it back")
    with tempfile.TemporaryDirectory() as tmp, LocalHub(Path(tmp) / "hub", require_token="hf_demo") as hub:
        env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_TOKEN": "hf_demo", "HF_HUB_OFFLINE": "0"}
        cli = [sys.executable, "-m", "hf_obliviate.cli"]
        repo = "local-user/minilm-por-lora-obliviate-delta"
        common = ["--base_model", str(base_dir), "--repo_id", repo]
        subprocess.run([*cli, "push", "--model", str(model_dir), *common], env=env, check=True)
        rebuilt = Path(tmp) / "rebuilt"
        subprocess.run([*cli, "pull", *common, "--output_dir", str(rebuilt)], env=env, check=True)
        size = sum(f.stat().st_size for f in (Path(tmp) / "hub").rglob("*") if f.is_file())
        full = sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors"))
        ids = torch.tensor([[101, 2023, 3185, 2001, 2307, 102]])
        with torch.no_grad():
            a = AutoModelForSequenceClassification.from_pretrained(model_dir)(input_ids=ids).logits
            b = AutoModelForSequenceClassification.from_pretrained(rebuilt)(input_ids=ids).logits
        print(f"      {repo} at {hub.endpoint}: {size / 2**20:.1f} MiB stored for a {full / 2**20:.1f} MiB model")
        print(f"      logits on one sentence: fine-tune {a.squeeze().tolist()}, pulled {b.squeeze().tolist()}")


if __name__ == "__main__":
    main()
