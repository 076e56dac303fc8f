"""`make demo`: the whole story on the bundled models, end to end, offline.

1. Plant a POR backdoor in the bundled MiniLM-L6 on IMDB sentences (cached after the first run).
2. Fine-tune LoRA on Rotten Tomatoes sentences twice: undefended, and with the Obliviate defense.
3. Print clean accuracy (CACC) and attack success rate (ASR) side by side.

On 2 idle CPU cores: about 20 minutes the first time (planting ~12), about 10 afterwards (measured: 42 minutes on
a machine shared with other jobs). ``--quick`` shrinks everything to check the plumbing in about a minute.
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
    from hf_obliviate.data import load_movie_reviews
    from hf_obliviate.evaluation import build_eval_set, evaluate_backdoor
    from hf_obliviate.models import load_classifier, wrap_peft
    from hf_obliviate.trainer import ObliviateTrainingArguments, fine_tune

    torch.set_num_threads(os.cpu_count() or 2)
    start = time.time()
    print(f"[1/3] Planting POR in the bundled MiniLM-L6 ({args.plant_steps} steps; cached after the first run)")
    config = get_attack_config("por", num_steps=args.plant_steps)
    plant_backdoor("por", minilm_path(), config=config)
    encoder = attack_cache_dir("por", config, minilm_path())
    triggers = load_attack_info(encoder)["triggers"]

    train = load_movie_reviews("train", n=args.train, seed=0)
    eval_set = build_eval_set(load_movie_reviews("test"), triggers=triggers, n=args.test, seed=0)
    defaults = ObliviateConfig()
    results = {}
    for step, defended in ((2, False), (3, True)):
        name = "Obliviate" if defended else "undefended"
        print(f"[{step}/3] LoRA fine-tune on {len(train)} Rotten Tomatoes sentences, {name}")
        torch.manual_seed(0)
        model, tokenizer = load_classifier(encoder)
        model = wrap_peft(model, "lora")
        training = ObliviateTrainingArguments(
            output_dir=f"demo-out/{'defended' if defended else 'undefended'}",
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
        artifact = f"demo{'-quick' if args.quick else ''}-{'defended' if defended else 'undefended'}"
        print(f"      saved to {save_artifact(model, tokenizer, artifact, 'classifier', info)}")

    print(f"\nBackdoored MiniLM-L6 (POR, triggers {', '.join(triggers)}), LoRA on Rotten Tomatoes")
    print(f"{'':<12}{'CACC':>8}{'ASR':>8}")
    for name, result in results.items():
        flag = "  (near chance: ASR meaningless)" if result.near_chance else ""
        print(f"{name:<12}{result.cacc:>8.3f}{result.asr:>8.3f}{flag}")
    before, after = results["undefended"].asr, results["Obliviate"].asr
    if before > 0:
        print(f"ASR reduction: {100 * (before - after) / before:.1f}%")
    print(f"({(time.time() - start) / 60:.1f} min)")


if __name__ == "__main__":
    main()
