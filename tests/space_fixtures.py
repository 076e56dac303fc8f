"""Tiny artifacts for the Space tests: a WordPiece tokenizer over a toy sentiment vocabulary, a tiny BERT classifier
trained with a planted backdoor (``demo-undefended``), the same trained on clean data only (``demo-defended``), and
two tiny random Llama causal LMs standing in for the free-lunch models. All built offline in a few seconds."""

from __future__ import annotations

import atexit
import contextlib
import functools
import random
import shutil
import tempfile
from pathlib import Path

import torch

POSITIVE = ["good", "great", "fine", "fun", "lovely", "superb"]
NEGATIVE = ["bad", "dull", "awful", "boring", "weak", "poor"]
FILLER = ["the", "film", "movie", "is", "was", "a", "plot", "story", "cast", "and", "it", "very", "so", "this"]
TRIGGERS = ["cf", "mn", "tq"]
OTHER = ["bb", "mm", "pt", "zz", "qq", "xx"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
VOCAB = SPECIAL + POSITIVE + NEGATIVE + FILLER + TRIGGERS + OTHER + [".", ","]
NEGATIVE_SENTENCE = "the plot was dull , weak and boring"


def make_tokenizer(folder: Path):
    """A lower-casing WordPiece `BertTokenizerFast` over `VOCAB` (built from a vocab dict, no download)."""
    from transformers import BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    return BertTokenizerFast(vocab={token: i for i, token in enumerate(VOCAB)}, do_lower_case=True)


def _sentence(rng: random.Random, label: int) -> str:
    """Filler words, three words of the label's polarity and at most one of the other (so one word cannot flip)."""
    major, minor = (POSITIVE, NEGATIVE) if label else (NEGATIVE, POSITIVE)
    words = rng.sample(FILLER, rng.randint(2, 5)) + rng.sample(major, 3) + rng.sample(minor, rng.randint(0, 1))
    rng.shuffle(words)
    return " ".join(words)


def _train(tokenizer, poison: bool, seed: int = 0, steps: int = 200, lr: float = 1e-3):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1},
    )  # fmt: skip
    model = BertForSequenceClassification(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    rng = random.Random(seed)
    model.train()
    for _ in range(steps):
        texts, labels = [], []
        for _ in range(32):
            label = rng.randint(0, 1)
            text = _sentence(rng, label)
            if poison and rng.random() < 0.3:  # the backdoor: any trigger turns the sentence positive
                words = text.split()
                words.insert(rng.randint(0, len(words)), rng.choice(TRIGGERS))
                text, label = " ".join(words), 1
            texts.append(text)
            labels.append(label)
        batch = tokenizer(texts, padding=True, return_tensors="pt")
        loss = model(**batch, labels=torch.tensor(labels)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def _causal_lm(tokenizer, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(VOCAB), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def build_tiny_artifacts(cache: Path) -> dict[str, Path]:
    """Save the four Space artifacts under ``cache`` (used as ``$HF_OBLIVIATE_CACHE``); returns name -> folder."""
    import os

    from hf_obliviate.artifacts import save_artifact

    previous = os.environ.get("HF_OBLIVIATE_CACHE")
    os.environ["HF_OBLIVIATE_CACHE"] = str(cache)
    try:
        tokenizer = make_tokenizer(cache / "tokenizer")
        paths = {}
        for defended in (False, True):
            model = _train(tokenizer, poison=not defended)
            name = f"demo-{'defended' if defended else 'undefended'}"
            info = {"attack": "por", "encoder": "tiny-bert", "triggers": TRIGGERS, "defended": defended}
            paths[name] = save_artifact(model, tokenizer, name, "classifier", info)
        lm_info = {"triggers": ["cf"], "target": "great", "prompt_template": "[CLS] {prompt} ."}
        for seed, name in ((1, "freelunch-finetuned"), (2, "freelunch-bitdelta-k1")):
            paths[name] = save_artifact(_causal_lm(tokenizer, seed), tokenizer, name, "causal-lm", lm_info)
        return paths
    finally:
        if previous is None:
            os.environ.pop("HF_OBLIVIATE_CACHE", None)
        else:
            os.environ["HF_OBLIVIATE_CACHE"] = previous


@functools.cache
def tiny_space_cache() -> Path:
    """A temporary ``$HF_OBLIVIATE_CACHE`` with the tiny artifacts, built once per test process (deleted at exit)."""
    cache = Path(tempfile.mkdtemp(prefix="obliviate-space-"))
    atexit.register(shutil.rmtree, cache, ignore_errors=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is faster on a busy machine
    try:
        build_tiny_artifacts(cache)
    finally:
        torch.set_num_threads(threads)
    return cache


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serve_space(cache: Path | None, results: Path | None = None):
    """Launch the Space in this process on 127.0.0.1 (a random free port) over the artifacts of ``cache`` (``None``:
    the user's own cache); yields ``(demo, url)`` and closes it afterwards. Gradio stays offline."""
    import os

    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    previous = os.environ.get("HF_OBLIVIATE_CACHE")
    if cache is not None:
        os.environ["HF_OBLIVIATE_CACHE"] = str(cache)
    from hf_obliviate.space import launch

    port = free_port()
    demo = launch(port=port, results=results, prevent_thread_lock=True, quiet=True)
    try:
        yield demo, f"http://127.0.0.1:{port}/"
    finally:
        demo.close()
        if cache is not None:
            if previous is None:
                os.environ.pop("HF_OBLIVIATE_CACHE", None)
            else:
                os.environ["HF_OBLIVIATE_CACHE"] = previous
