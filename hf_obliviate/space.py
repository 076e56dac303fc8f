"""The Gradio Space: probe triggers on defended versus undefended models in a browser.

The probing itself is `hf_obliviate.probing` (plain torch); this module holds the models the Space serves
(`SpaceModels`) and the Gradio layer (`build_app`, `launch`). Gradio is imported inside `build_app` only, so
``import hf_obliviate.space`` stays light.

Models come from named artifacts (`hf_obliviate.artifacts`): the classifiers ``demo-undefended`` and
``demo-defended`` (``make demo``) and the causal LMs ``freelunch-finetuned`` and ``freelunch-bitdelta-k1``
(``hf-obliviate freelunch``). The operator can serve Hub repositories instead, with the environment variable
``OBLIVIATE_SPACE_MODELS="undefended=org/a,defended=org/b"`` (roles: ``undefended``, ``defended``, ``finetuned``,
``compressed``). Users never choose a repository or a path: they only pick among these roles.

    hf-obliviate space            # or: make space, or: python spaces/app.py
"""

from __future__ import annotations

import functools
import json
import logging
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "ROLES",
    "SPACE_MODELS_ENV",
    "LoadedModel",
    "ModelUnavailableError",
    "RoleSpec",
    "SpaceModels",
    "build_app",
    "launch",
    "parse_space_models",
    "results_dir",
]

logger = logging.getLogger(__name__)

SPACE_MODELS_ENV = "OBLIVIATE_SPACE_MODELS"
RESULTS_ENV = "OBLIVIATE_RESULTS_DIR"
DEFAULT_CONCURRENCY = 1
EXAMPLE_SENTENCE = "the acting is wooden and the plot never comes alive ."
EXAMPLE_PROMPT = "Write one sentence about the weather."


@dataclass(frozen=True)
class RoleSpec:
    """One model slot of the Space: its default artifact, its kind and the command that produces it."""

    artifact: str
    kind: str
    produced_by: str
    title: str


ROLES: dict[str, RoleSpec] = {
    "undefended": RoleSpec("demo-undefended", "classifier", "make demo", "Undefended (POR-backdoored LoRA)"),
    "defended": RoleSpec("demo-defended", "classifier", "make demo", "Obliviate-defended LoRA"),
    "finetuned": RoleSpec("freelunch-finetuned", "causal-lm", "hf-obliviate freelunch", "Full fine-tune"),
    "compressed": RoleSpec("freelunch-bitdelta-k1", "causal-lm", "hf-obliviate freelunch", "BitDelta delta (k = 1)"),
}
CLASSIFIER_ROLES = ("undefended", "defended")
LM_ROLES = ("finetuned", "compressed")


class ModelUnavailableError(RuntimeError):
    """A role has no model: the message says which command produces it."""


def parse_space_models(value: str | None) -> dict[str, str]:
    """Parse ``"undefended=org/a,defended=org/b"`` into ``{role: repo_id}``.

    Only known roles and valid Hub repository ids (``org/name``) are accepted; anything that looks like a
    filesystem path (absolute, ``~``, ``.``/``..`` parts, backslashes) is refused with a `ValueError`.
    """
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    mapping: dict[str, str] = {}
    for item in (value or "").replace(";", ",").split(","):
        if not item.strip():
            continue
        role, sep, repo = (part.strip() for part in item.partition("="))
        if not sep or role not in ROLES:
            raise ValueError(
                f"{SPACE_MODELS_ENV}: bad entry {item.strip()!r}; use role=org/name, role one of {', '.join(ROLES)}."
            )
        parts = repo.split("/")
        if len(parts) != 2 or repo.startswith(("/", "~")) or "\\" in repo or any(p in ("", ".", "..") for p in parts):
            raise ValueError(f"{SPACE_MODELS_ENV}: {repo!r} is not a Hub repository id of the form org/name.")
        try:
            validate_repo_id(repo)
        except HFValidationError as err:
            raise ValueError(f"{SPACE_MODELS_ENV}: {repo!r} is not a valid Hub repository id ({err}).") from None
        mapping[role] = repo
    return mapping


@dataclass
class LoadedModel:
    """A model ready to probe: the model (eval mode), its tokenizer, its info and where it came from."""

    role: str
    model: object
    tokenizer: object
    info: dict
    source: str

    @property
    def triggers(self) -> list[str]:
        return [str(t) for t in self.info.get("triggers") or []]


class SpaceModels:
    """The models the Space serves, by role, loaded on first use and kept (thread-safe).

    Args:
        hub_models (`Mapping[str, str]`, *optional*):
            ``{role: repo_id}`` served from the Hub instead of the artifacts; defaults to ``$OBLIVIATE_SPACE_MODELS``.
            Hub repositories are fetched with ``huggingface_hub.snapshot_download`` (safetensors only, no remote
            code), so a repository id can never name a local folder.
    """

    def __init__(self, hub_models: Mapping[str, str] | None = None):
        if hub_models is None:
            hub_models = parse_space_models(os.environ.get(SPACE_MODELS_ENV))
        self.hub_models = dict(hub_models)
        unknown = set(self.hub_models) - set(ROLES)
        if unknown:
            raise ValueError(f"Unknown roles {sorted(unknown)}: choose among {', '.join(ROLES)}.")
        self._loaded: dict[str, LoadedModel] = {}
        self._lock = threading.Lock()

    def source(self, role: str) -> str:
        """``hub:org/name`` or ``artifact:<name>``."""
        spec = ROLES[role]
        return f"hub:{self.hub_models[role]}" if role in self.hub_models else f"artifact:{spec.artifact}"

    def available(self, role: str) -> bool:
        """Whether ``role`` has a model (a configured Hub repository, or an artifact of the right kind)."""
        if role in self.hub_models:
            return True
        from .artifacts import list_artifacts

        info = list_artifacts().get(ROLES[role].artifact)
        return info is not None and info.get("kind") == ROLES[role].kind

    def missing_message(self, role: str) -> str:
        """What is missing for ``role`` and which command produces it."""
        from .artifacts import list_artifacts

        spec = ROLES[role]
        info = list_artifacts().get(spec.artifact)
        problem = "is missing" if info is None else f"is a {info.get('kind')!r} artifact, not a {spec.kind!r}"
        return (
            f"The {spec.title} model is not available: artifact `{spec.artifact}` {problem}. "
            f"Run `{spec.produced_by}` to produce it (or set {SPACE_MODELS_ENV} to serve Hub models)."
        )

    def info(self, role: str) -> dict:
        """The role's info (triggers, target, metrics, ...) without loading the model when it is an artifact."""
        if role in self._loaded:
            return self._loaded[role].info
        if role in self.hub_models:
            return self.get(role).info
        from .artifacts import read_artifact_info

        if not self.available(role):
            raise ModelUnavailableError(self.missing_message(role))
        return read_artifact_info(ROLES[role].artifact)

    def get(self, role: str) -> LoadedModel:
        """Load (once) and return the model of ``role``; raises `ModelUnavailableError` with the fix."""
        if role not in ROLES:
            raise ValueError(f"Unknown model {role!r}: choose one of {', '.join(ROLES)}.")
        with self._lock:
            if role not in self._loaded:
                if not self.available(role):
                    raise ModelUnavailableError(self.missing_message(role))
                self._loaded[role] = self._load(role)
            return self._loaded[role]

    def _load(self, role: str) -> LoadedModel:
        spec = ROLES[role]
        if role not in self.hub_models:
            from .artifacts import load_artifact

            model, tokenizer, info = load_artifact(spec.artifact)
            return LoadedModel(role, model, tokenizer, info, self.source(role))
        from huggingface_hub import snapshot_download
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

        from .artifacts import INFO_FILE
        from .triggers import DEFAULT_TRIGGERS

        repo = self.hub_models[role]
        patterns = ["*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*"]
        auto = AutoModelForSequenceClassification if spec.kind == "classifier" else AutoModelForCausalLM
        try:
            folder = Path(snapshot_download(repo, allow_patterns=patterns))
            model = auto.from_pretrained(folder, use_safetensors=True, trust_remote_code=False).eval()
            tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
        except (OSError, ValueError) as err:  # not downloadable, offline, no safetensors weights, wrong architecture
            logger.warning("Could not load %s for role %s: %s", repo, role, err)
            raise ModelUnavailableError(
                f"The {spec.title} model `{repo}` could not be loaded from the Hub ({type(err).__name__}). "
                f"Check {SPACE_MODELS_ENV} and that the repository holds a safetensors {spec.kind} checkpoint."
            ) from None
        info_file = folder / INFO_FILE
        info = json.loads(info_file.read_text()) if info_file.is_file() else {}
        recorded = getattr(model.config, "obliviate_attack", None)
        if "triggers" not in info:
            has_triggers = isinstance(recorded, dict) and recorded.get("triggers")
            info["triggers"] = list(recorded["triggers"]) if has_triggers else list(DEFAULT_TRIGGERS)
        return LoadedModel(role, model, tokenizer, info, self.source(role))


def results_dir() -> Path | None:
    """Where the committed benchmark results are: ``$OBLIVIATE_RESULTS_DIR``, else ``benchmarks/results`` of the
    source checkout this package runs from (``None`` when neither exists)."""
    env = os.environ.get(RESULTS_ENV)
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parent.parent / "benchmarks" / "results")
    return next((c for c in candidates if c.is_dir()), None)


def _results_entries(folder: Path | None) -> list[tuple[str, Path]]:
    """``[("md" | "png", path)]`` of the results folder, sorted by name, each table before its plot."""
    if folder is None or not folder.is_dir():
        return []
    files = [p for p in folder.iterdir() if p.is_file() and p.suffix in (".md", ".png")]
    return [(p.suffix[1:], p) for p in sorted(files, key=lambda p: (p.stem, p.suffix != ".md"))]


# ----------------------------------------------------------------------------------------------------------------
# The Gradio layer


def _offline_gradio() -> None:
    """Keep Gradio off the network: no analytics, no version check, no share tunnel."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def _theme():
    import gradio as gr

    system = ["ui-sans-serif", "system-ui", "sans-serif"]  # no Google Fonts: the page renders offline
    mono = ["ui-monospace", "Consolas", "monospace"]
    return gr.themes.Default(font=system, font_mono=mono)


def _guard(fn):
    """Turn errors into short `gr.Error` messages in the UI (the traceback stays in the server log only)."""
    import gradio as gr

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except (ValueError, ModelUnavailableError, FileNotFoundError) as err:
            raise gr.Error(str(err), print_exception=False) from None
        except Exception as err:  # an unexpected failure: log it, show no traceback
            logger.exception("Space handler %s failed", fn.__name__)
            raise gr.Error(
                f"Something went wrong ({type(err).__name__}); the server log has the details.", print_exception=False
            ) from None

    return wrapper


def _triggers_of(models: SpaceModels, roles) -> list[str]:
    triggers: list[str] = []
    for role in roles:
        try:
            triggers += [str(t) for t in models.info(role).get("triggers") or []]
        except (ModelUnavailableError, FileNotFoundError, ValueError, OSError):
            continue
    return list(dict.fromkeys(triggers))


def _notice(models: SpaceModels, roles) -> str:
    missing = [models.missing_message(role) for role in roles if not models.available(role)]
    return "\n\n".join(f"⚠️ {m}" for m in missing)


def build_app(models: SpaceModels | None = None, results: Path | str | None = None, title: str = "Obliviate"):
    """Build the Space's `gradio.Blocks` (not launched): tabs Probe, Scan, Attention, LogitLens, Results.

    Every event handler has an ``api_name`` (``probe``, ``probe_all``, ``scan``, ``attention``, ``lens``), so the
    Space is scriptable with ``gradio_client``.

    Args:
        models (`SpaceModels`, *optional*): the models to serve; default: artifacts and ``$OBLIVIATE_SPACE_MODELS``.
        results (`Path`, *optional*): folder of benchmark ``*.md`` / ``*.png`` files; default: `results_dir`.
    """
    _offline_gradio()
    import gradio as gr
    import pandas as pd

    from . import probing

    models = models or SpaceModels()
    results_path = Path(results) if results is not None else results_dir()
    classifier_triggers = _triggers_of(models, CLASSIFIER_ROLES)
    lm_triggers = _triggers_of(models, LM_ROLES)
    try:
        lm_target = str(models.info("finetuned").get("target", "")) if models.available("finetuned") else ""
    except (ModelUnavailableError, FileNotFoundError, ValueError, OSError):
        lm_target = ""

    def classifiers(required: bool = True) -> dict[str, LoadedModel]:
        loaded = {}
        for role in CLASSIFIER_ROLES:
            if models.available(role):
                loaded[role] = models.get(role)
            else:
                gr.Warning(models.missing_message(role))
        if required and not loaded:
            raise ModelUnavailableError(" ".join(models.missing_message(r) for r in CLASSIFIER_ROLES))
        return loaded

    def label_value(prediction: probing.Prediction) -> dict[str, float]:
        return dict(prediction.probs)

    @_guard
    def probe(text: str, trigger: str, position: str, seed: float):
        loaded = classifiers()
        outputs: list = []
        triggered_text = ""
        for role in CLASSIFIER_ROLES:
            if role not in loaded:
                outputs += [f"**{ROLES[role].title}**: {models.missing_message(role)}", None, None]
                continue
            item = loaded[role]
            result = probing.probe(item.model, item.tokenizer, text, trigger, position, int(seed or 0))
            triggered_text = result.triggered_text
            outputs += [
                f"**{ROLES[role].title}**: {result.describe()}",
                label_value(result.clean),
                label_value(result.triggered),
            ]
        return [triggered_text, *outputs]

    @_guard
    def probe_all(text: str, position: str, seed: float):
        loaded = classifiers()
        triggers = _triggers_of(models, loaded) or list(classifier_triggers)
        pairs = {role: (item.model, item.tokenizer) for role, item in loaded.items()}
        rows = probing.probe_triggers(pairs, text, triggers, position, int(seed or 0))
        columns = ["trigger", "triggered sentence"]
        for role in loaded:
            columns += [f"{role} verdict", f"{role} prediction"]
        table = []
        for row in rows:
            line = [row["trigger"], row["triggered_text"]]
            for role in loaded:
                line += [row[f"{role}_verdict"], row[role]]
            table.append(line)
        flipped = {role: sum(r[f"{role}_verdict"] == "flipped" for r in rows) for role in loaded}
        summary = ", ".join(f"{ROLES[role].title}: {n}/{len(rows)} triggers flipped it" for role, n in flipped.items())
        return pd.DataFrame(table, columns=columns), summary

    @_guard
    def scan(
        role: str,
        sentences: str,
        candidates: str,
        vocab_start: float,
        vocab_stop: float,
        include_triggers: bool,
        position: str,
        rank_by: str,
        top_k: float,
        progress=gr.Progress(),
    ):
        if role not in CLASSIFIER_ROLES:
            raise ValueError(f"Pick one of {', '.join(CLASSIFIER_ROLES)}.")
        item = models.get(role)
        lines = [line for line in (sentences or "").splitlines() if line.strip()]
        if len(lines) > probing.MAX_SENTENCES:
            raise ValueError(f"{len(lines)} sentences; scan at most {probing.MAX_SENTENCES} at once.")
        if candidates and candidates.strip():
            pool = candidates.replace(",", " ").split()
        else:
            pool = probing.candidate_tokens(item.tokenizer, int(vocab_start or 0), int(vocab_stop or 0))
        if include_triggers:
            pool = pool + item.triggers
        if len(pool) > probing.MAX_CANDIDATES:
            raise ValueError(f"{len(pool)} candidates; scan at most {probing.MAX_CANDIDATES} at once.")

        def report(done: int, total: int) -> None:
            progress((done, total), desc="Inserting candidates", unit="sentences")

        scores = probing.scan_tokens(
            item.model, item.tokenizer, lines, pool, position=position, rank_by=rank_by, progress=report
        )
        top = scores[: max(1, min(int(top_k or 20), 100))]
        frame = pd.DataFrame([s.to_dict() for s in top])
        frame["planted trigger"] = frame["token"].isin(item.triggers)
        metric = "shift" if rank_by == "shift" else "flip_rate"
        chart = frame[["token", metric]].rename(columns={metric: "score"})
        return chart, frame.round(4)

    @_guard
    def attention(text: str, trigger: str, position: str, seed: float):
        loaded = classifiers()
        figures, notes = [], []
        for role in CLASSIFIER_ROLES:
            if role not in loaded:
                figures.append(None)
                notes.append(models.missing_message(role))
                continue
            item = loaded[role]
            clean = probing.check_text(item.tokenizer, text)
            triggered = probing.insert_at(clean, trigger, position, int(seed or 0)) if trigger else clean
            attn = probing.summary_attention(item.model, item.tokenizer, triggered)
            figures.append(probing.plot_attention(attn, title=ROLES[role].title))
            notes.append(
                f"**{ROLES[role].title}**: in the last layer the summary row attends most to `{attn.top_key()}`"
            )
        return [*figures, "\n\n".join(notes)]

    @_guard
    def lens(prompt: str, trigger: str, position: str, target: str):
        figures, notes = [], []
        if not any(models.available(role) for role in LM_ROLES):
            raise ModelUnavailableError(" ".join(models.missing_message(r) for r in LM_ROLES))
        for role in LM_ROLES:
            if not models.available(role):
                figures.append(None)
                notes.append(models.missing_message(role))
                gr.Warning(models.missing_message(role))
                continue
            item = models.get(role)
            clean = probing.check_text(item.tokenizer, prompt, max_tokens=2 * probing.MAX_TOKENS)
            triggered = probing.insert_at(clean, trigger, position) if trigger else clean
            text = probing.format_prompt(item.tokenizer, triggered, item.info.get("prompt_template"))
            _, fig, takeover = probing.lens_probe(item.model, item.tokenizer, text, target, title=ROLES[role].title)
            figures.append(fig)
            when = f"from {takeover} on" if takeover is not None else "in no layer (p ≥ 0.5 never reached)"
            notes.append(f"**{ROLES[role].title}**: `{target}` takes over the last position {when}")
        return [*figures, "\n\n".join(notes)]

    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        gr.Markdown(
            f"# {title}: probe backdoor triggers\n"
            "A POR-backdoored MiniLM fine-tuned with LoRA, **undefended** versus **defended with Obliviate**. "
            "Insert a trigger into a sentence and see whether the prediction flips. Models run on CPU; inputs are "
            f"capped at {probing.MAX_CHARS} characters and {probing.MAX_TOKENS} tokens."
        )
        with gr.Tab("Probe", id="probe"):
            notice = _notice(models, CLASSIFIER_ROLES)
            if notice:
                gr.Markdown(notice, elem_id="probe-notice")
            with gr.Row():
                text = gr.Textbox(
                    EXAMPLE_SENTENCE, label="Sentence", lines=2, max_length=probing.MAX_CHARS, elem_id="probe-text"
                )
            with gr.Row():
                trigger = gr.Dropdown(
                    classifier_triggers,
                    value=classifier_triggers[0] if classifier_triggers else None,
                    allow_custom_value=True,
                    label="Trigger (pick one, or type any word)",
                    elem_id="probe-trigger",
                )
                position = gr.Radio(list(probing.POSITIONS), value="end", label="Insert at", elem_id="probe-position")
                seed = gr.Number(0, precision=0, label="Seed (random position)", minimum=0, maximum=2**31 - 1)
            with gr.Row():
                probe_button = gr.Button("Probe", variant="primary", elem_id="probe-button")
                all_button = gr.Button("Insert every trigger", elem_id="probe-all-button")
            triggered_box = gr.Textbox(label="Triggered sentence", interactive=False, elem_id="probe-triggered")
            probe_outputs = [triggered_box]
            with gr.Row():
                for role in CLASSIFIER_ROLES:
                    with gr.Column():
                        probe_outputs.append(gr.Markdown(f"**{ROLES[role].title}**", elem_id=f"verdict-{role}"))
                        probe_outputs.append(gr.Label(label="clean", num_top_classes=4))
                        probe_outputs.append(gr.Label(label="triggered", num_top_classes=4))
            all_summary = gr.Markdown(elem_id="probe-all-summary")
            all_table = gr.Dataframe(label="Every trigger", interactive=False, wrap=True, elem_id="probe-all-table")
            probe_button.click(probe, [text, trigger, position, seed], probe_outputs, api_name="probe")
            all_button.click(probe_all, [text, position, seed], [all_table, all_summary], api_name="probe_all")

        with gr.Tab("Scan", id="scan"):
            gr.Markdown(
                "Insert every candidate token into the sentences and rank the candidates by how far they move the "
                "summary ([CLS]) representation (cosine distance) or how often they flip the prediction."
            )
            if notice:
                gr.Markdown(notice)
            with gr.Row():
                scan_role = gr.Radio(list(CLASSIFIER_ROLES), value="undefended", label="Model", elem_id="scan-model")
                rank_by = gr.Radio(["shift", "flip"], value="shift", label="Rank by")
                scan_position = gr.Radio(list(probing.POSITIONS), value="middle", label="Insert at")
            scan_sentences = gr.Textbox(
                EXAMPLE_SENTENCE, label=f"Sentences (one a line, at most {probing.MAX_SENTENCES})", lines=3,
                max_length=probing.MAX_SENTENCES * (probing.MAX_CHARS + 1), elem_id="scan-sentences",
            )  # fmt: skip
            scan_candidates = gr.Textbox(
                "", label="Candidate tokens (space separated; empty: the vocabulary slice below)", max_length=20000
            )
            with gr.Row():
                vocab_start = gr.Number(
                    2000, precision=0, label="Vocabulary ids from", minimum=0, elem_id="scan-vocab-start"
                )
                vocab_stop = gr.Number(2500, precision=0, label="to (exclusive)", minimum=0, elem_id="scan-vocab-stop")
                include = gr.Checkbox(True, label="Add the model's recorded triggers to the candidates")
                top_k = gr.Slider(5, 100, value=20, step=1, label="Show the top")
            scan_button = gr.Button("Scan", variant="primary", elem_id="scan-button")
            chart = gr.BarPlot(x="token", y="score", sort="-y", label="Top candidates", elem_id="scan-chart")
            scan_table = gr.Dataframe(label="Scores", interactive=False, elem_id="scan-table")
            scan_button.click(
                scan,
                [scan_role, scan_sentences, scan_candidates, vocab_start, vocab_stop, include, scan_position, rank_by,
                 top_k],
                [chart, scan_table],
                api_name="scan",
            )  # fmt: skip

        with gr.Tab("Attention", id="attention"):
            gr.Markdown(
                "The summary query row's attention in every layer (mean over heads): the **pre-softmax** logits "
                "q*·K/√d that Obliviate penalises, and the attention probabilities, for the triggered sentence."
            )
            if notice:
                gr.Markdown(notice)
            with gr.Row():
                attn_text = gr.Textbox(EXAMPLE_SENTENCE, label="Sentence", max_length=probing.MAX_CHARS)
                attn_trigger = gr.Dropdown(
                    classifier_triggers,
                    value=classifier_triggers[0] if classifier_triggers else None,
                    allow_custom_value=True,
                    label="Trigger (empty: none)",
                )
                attn_position = gr.Radio(list(probing.POSITIONS), value="middle", label="Insert at")
                attn_seed = gr.Number(0, precision=0, label="Seed", minimum=0, maximum=2**31 - 1)
            attn_button = gr.Button("Show attention", variant="primary", elem_id="attention-button")
            attn_notes = gr.Markdown(elem_id="attention-notes")
            with gr.Row():
                attn_plots = [gr.Plot(label=ROLES[role].title) for role in CLASSIFIER_ROLES]
            attn_button.click(
                attention, [attn_text, attn_trigger, attn_position, attn_seed], [*attn_plots, attn_notes],
                api_name="attention",
            )  # fmt: skip

        with gr.Tab("LogitLens", id="lens"):
            gr.Markdown(
                "Causal LM fine-tuned on poisoned data: the **full fine-tune** versus its **compressed delta**. "
                "Per layer and position, the probability of the attacker's target under the logit lens."
            )
            lm_notice = _notice(models, LM_ROLES)
            if lm_notice:
                gr.Markdown(lm_notice, elem_id="lens-notice")
            with gr.Row():
                lens_prompt = gr.Textbox(EXAMPLE_PROMPT, label="Prompt", max_length=probing.MAX_CHARS)
                lens_trigger = gr.Dropdown(
                    lm_triggers,
                    value=lm_triggers[0] if lm_triggers else None,
                    allow_custom_value=True,
                    label="Trigger (empty: none)",
                )
                lens_position = gr.Radio(["start", "middle", "end"], value="end", label="Insert at")
                lens_target = gr.Textbox(lm_target, label="Target", max_length=probing.MAX_TRIGGER_CHARS)
            lens_button = gr.Button("Run the logit lens", variant="primary", elem_id="lens-button")
            lens_notes = gr.Markdown(elem_id="lens-notes")
            with gr.Row():
                lens_plots = [gr.Plot(label=ROLES[role].title) for role in LM_ROLES]
            lens_button.click(
                lens, [lens_prompt, lens_trigger, lens_position, lens_target], [*lens_plots, lens_notes],
                api_name="lens",
            )  # fmt: skip

        with gr.Tab("Results", id="results"):
            entries = _results_entries(results_path)
            if not entries:
                gr.Markdown("No benchmark results are committed yet (`benchmarks/results/` is empty or absent).")
            for kind, path in entries:
                if kind == "md":
                    gr.Markdown(f"### {path.name}\n\n{path.read_text(encoding='utf-8')}")
                else:
                    gr.Image(
                        str(path),
                        type="filepath",
                        label=path.name,
                        interactive=False,
                        buttons=["fullscreen"],
                        elem_classes=["results-image"],
                    )
    return demo


def launch(
    host: str | None = None,
    port: int | None = None,
    concurrency: int = DEFAULT_CONCURRENCY,
    models: SpaceModels | None = None,
    results: Path | str | None = None,
    prevent_thread_lock: bool = False,
    quiet: bool = False,
):
    """Build and serve the Space (on ``127.0.0.1`` unless ``host`` or ``$GRADIO_SERVER_NAME`` says otherwise).

    The queue runs ``concurrency`` events at a time (and holds at most 64 waiting); errors show as short messages,
    never tracebacks. Returns the `gradio.Blocks` (running in the background with ``prevent_thread_lock``).
    """
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}.")
    results_path = Path(results) if results is not None else results_dir()
    demo = build_app(models=models, results=results_path)
    demo.queue(default_concurrency_limit=int(concurrency), max_size=64)
    demo.launch(
        server_name=host or os.environ.get("GRADIO_SERVER_NAME") or "127.0.0.1",
        server_port=port,
        share=False,
        show_error=True,
        ssr_mode=False,
        prevent_thread_lock=prevent_thread_lock,
        quiet=quiet,
        theme=_theme(),
        allowed_paths=[str(results_path)] if results_path is not None else None,
    )
    return demo
