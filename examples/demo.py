"""`make demo`: the whole story on the bundled models, end to end, offline.

1. Plant a POR backdoor in the bundled MiniLM-L6 on IMDB sentences (cached after the first run).
2. Fine-tune LoRA on Rotten Tomatoes sentences twice: undefended, and with the Obliviate defense.
3. Print clean accuracy (CACC) and attack success rate (ASR) side by side; save both fine-tunes as artifacts for the
   Space (``demo-undefended``, ``demo-defended``).
4. Push the defended fine-tune through a local Hub endpoint as its exact adapter and as a 1-bit merged delta, pull
   each back (base verified) and evaluate it: the 1-bit merge brings the base's backdoor back (README, "Compression
   can undo the defense").

On 2 idle CPU cores with the earlier defaults (no consistency term): about 25 minutes the first time (planting ~13),
about 13 afterwards (measured 12.7 with the two pushes, pulls and evaluations of step 4). The current defaults add a
vocabulary scan (about a minute) and a forward and backward pass of the inserted copy per defended step: 34.8
minutes measured on 2 cores shared with ``make test``. ``--quick`` shrinks everything to check the plumbing.
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

    from hf_obliviate.artifacts import save_artifact
    from hf_obliviate.attacks import get_attack_config, load_attack_info, plant_backdoor
    from hf_obliviate.attacks._common import attack_cache_dir
    from hf_obliviate.bundled import minilm_path
    from hf_obliviate.config import CLASSIFIER_DEFAULTS
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
            obliviate=defended,  # defended: the library defaults (hf_obliviate.config.CLASSIFIER_DEFAULTS)
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
        if defended:  # the exact adapter (LoRA factors + the trained head), pushed in step 4; saved before the merge
            adapter = f"demo-out/{role}/adapter"
            model.save_pretrained(adapter)
        # The Space probes these two models (a --quick run saves under other names, never over the real ones).
        info = {
            "attack": "por", "encoder": str(encoder), "triggers": list(triggers), "defended": defended,
            **({"defense": {k: getattr(training, k) for k in CLASSIFIER_DEFAULTS}} if defended else {}),
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
    push_and_pull(adapter, encoder, saved["defended"], tokenizer, eval_set)
    print(f"({(time.time() - start) / 60:.1f} min)")


def push_and_pull(adapter_dir, base_dir, merged_dir, tokenizer, eval_set) -> None:
    """Push the defended fine-tune through a local Hub endpoint twice, as the exact LoRA adapter (``--lora factors``)
    and as a 1-bit BitDelta merge (the default), pull each back (base verified) and evaluate what came back
    (``hf-obliviate push`` / ``pull`` in subprocesses: huggingface_hub reads ``HF_ENDPOINT`` at import)."""
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    from transformers import AutoModelForSequenceClassification

    from hf_obliviate.evaluation import evaluate_backdoor
    from hf_obliviate.hub.local import LocalHub

    print("[4/4] Pushing the defended fine-tune through a local Hub endpoint, pulling it back and evaluating it")
    full = sum(f.stat().st_size for f in Path(merged_dir).glob("*.safetensors"))
    with tempfile.TemporaryDirectory() as tmp, LocalHub(Path(tmp) / "hub", require_token="hf_demo") as hub:
        env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_TOKEN": "hf_demo", "HF_HUB_OFFLINE": "0"}
        cli = [sys.executable, "-m", "hf_obliviate.cli"]
        print(f"      local Hub at {hub.endpoint}; the full fine-tune is {full / 2**20:.1f} MiB")
        pushes = (("factors", "exact adapter (--lora factors)"), ("merged", "1-bit merged delta (BitDelta)"))
        for lora, label in pushes:
            repo = f"local-user/minilm-por-lora-obliviate-{lora}"
            common = ["--base_model", str(base_dir), "--repo_id", repo]
            before = _folder_bytes(Path(tmp) / "hub")
            subprocess.run([*cli, "push", "--model", str(adapter_dir), "--lora", lora, *common], env=env, check=True)
            size = _folder_bytes(Path(tmp) / "hub") - before
            rebuilt = Path(tmp) / f"rebuilt-{lora}"
            subprocess.run([*cli, "pull", *common, "--output_dir", str(rebuilt)], env=env, check=True)
            model = AutoModelForSequenceClassification.from_pretrained(rebuilt)
            pulled = evaluate_backdoor(model, tokenizer, eval_set)
            print(
                f"      {label:<32} {size / 2**20:5.2f} MiB stored; pulled back: CACC {pulled.cacc:.3f} "
                f"ASR {pulled.asr:.3f}"
            )
    print("      (a 1-bit merge keeps accuracy but can bring the base's backdoor back: push a defended LoRA exactly)")


def _folder_bytes(folder) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


if __name__ == "__main__":
    main()
