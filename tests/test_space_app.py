"""The Space, launched on 127.0.0.1 over tiny artifacts, driven through its API with `gradio_client`."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")

from space_fixtures import NEGATIVE_SENTENCE, TRIGGERS, VOCAB, serve_space, tiny_space_cache  # noqa: E402

from hf_obliviate import probing  # noqa: E402


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    folder = tmp_path_factory.mktemp("results")
    (folder / "defense.md").write_text("| run | ASR |\n|---|---|\n| undefended | 0.8 |\n")
    from PIL import Image

    Image.new("RGB", (8, 8), (200, 30, 30)).save(folder / "defense.png")
    return folder


@pytest.fixture(scope="module")
def space(results):
    with serve_space(tiny_space_cache(), results=results) as (demo, url):
        yield demo, gradio_client.Client(url, verbose=False)


@pytest.fixture(scope="module")
def client(space):
    return space[1]


@pytest.fixture(scope="module")
def local_models(space):
    from hf_obliviate.artifacts import load_artifact

    return {role: load_artifact(f"demo-{role}")[:2] for role in ("undefended", "defended")}


def test_api_lists_every_endpoint(client):
    endpoints = set(client.view_api(return_format="dict", print_info=False)["named_endpoints"])
    assert {"/probe", "/probe_all", "/scan", "/attention", "/lens"} <= endpoints


def test_queue_is_bounded(space):
    demo, _ = space
    assert demo._queue.default_concurrency_limit == 1
    assert demo._queue.max_size == 64


def test_probe_endpoint(client, local_models):
    out = client.predict(NEGATIVE_SENTENCE, "cf", "end", 0, api_name="/probe")
    triggered_text, verdict_u, clean_u, trig_u, verdict_d, clean_d, trig_d = out
    assert triggered_text == f"{NEGATIVE_SENTENCE} cf"
    expected = {role: probing.probe(m, t, NEGATIVE_SENTENCE, "cf", "end") for role, (m, t) in local_models.items()}
    assert verdict_u.endswith(expected["undefended"].describe()) and "flipped: negative → positive" in verdict_u
    assert verdict_d.endswith(expected["defended"].describe()) and "held: negative" in verdict_d
    assert clean_u["label"] == "negative" and trig_u["label"] == "positive"
    assert clean_d["label"] == trig_d["label"] == "negative"
    confidences = {c["label"]: c["confidence"] for c in trig_u["confidences"]}
    assert confidences["positive"] == pytest.approx(expected["undefended"].triggered.probs["positive"], abs=1e-5)


def test_probe_endpoint_with_a_typed_trigger_and_random_position(client):
    out = client.predict(NEGATIVE_SENTENCE, "bb", "random", 5, api_name="/probe")
    assert out[0] == probing.insert_at(NEGATIVE_SENTENCE, "bb", "random", 5)
    assert "held" in out[1] and "held" in out[4]


def test_probe_all_endpoint(client):
    table, summary = client.predict(NEGATIVE_SENTENCE, "middle", 0, api_name="/probe_all")
    assert table["headers"] == [
        "trigger", "triggered sentence", "undefended verdict", "undefended prediction", "defended verdict",
        "defended prediction",
    ]  # fmt: skip
    assert [row[0] for row in table["data"]] == TRIGGERS
    assert all(row[2] == "flipped" and row[4] == "held" for row in table["data"])
    assert all(row[1] == probing.insert_at(NEGATIVE_SENTENCE, row[0], "middle") for row in table["data"])
    assert "3/3 triggers flipped it" in summary and "0/3 triggers flipped it" in summary


def test_scan_endpoint_surfaces_the_triggers(client):
    chart, table = client.predict(
        "undefended", NEGATIVE_SENTENCE, "", 0, len(VOCAB), False, "middle", "shift", 10, api_name="/scan"
    )
    tokens = [row[0] for row in table["data"]]
    assert set(tokens[:3]) == set(TRIGGERS)
    assert table["headers"] == ["token", "shift", "flip_rate", "prob_change", "planted trigger"]
    assert [row[4] for row in table["data"][:4]] == [True, True, True, False]
    assert [row[0] for row in chart["data"]] == tokens and len(tokens) == 10


def test_scan_endpoint_with_a_candidate_list(client):
    _, table = client.predict(
        "defended", NEGATIVE_SENTENCE, "good, cf bb", 0, 0, False, "end", "flip", 5, api_name="/scan"
    )
    assert sorted(row[0] for row in table["data"]) == ["bb", "cf", "good"]
    assert all(row[2] == 0.0 for row in table["data"])  # the clean model flips for none of them


def test_attention_endpoint(client):
    plot_u, plot_d, notes = client.predict(NEGATIVE_SENTENCE, "cf", "middle", 0, api_name="/attention")
    for plot in (plot_u, plot_d):
        assert plot["type"] == "matplotlib" and plot["plot"].startswith("data:image/")
    assert "Undefended" in notes and "defended" in notes and "attends most to" in notes


def test_lens_endpoint(client):
    pytest.importorskip("hf_obliviate.lens", reason="hf_obliviate/lens.py (LogitLens) is not in this checkout yet")
    plot_f, plot_c, notes = client.predict("the film was", "cf", "end", "great", api_name="/lens")
    for plot in (plot_f, plot_c):
        assert plot["type"] == "matplotlib" and plot["plot"].startswith("data:image/")
    assert "Full fine-tune" in notes and "BitDelta" in notes and "`great`" in notes


@pytest.mark.parametrize(
    "text, trigger, message",
    [
        ("", "cf", "The sentence is empty"),
        ("film " * 300, "cf", "the limit is 1000"),
        (" ".join(["film"] * 150), "cf", "the limit is 128"),
        (NEGATIVE_SENTENCE, "", "The trigger is empty"),
    ],
)
def test_errors_are_short_messages(client, text, trigger, message):
    with pytest.raises(gradio_client.exceptions.AppError) as info:
        client.predict(text, trigger, "end", 0, api_name="/probe")
    assert message in str(info.value)
    assert "Traceback" not in str(info.value) and 'File "' not in str(info.value)


def test_missing_artifacts_say_which_command_makes_them(tmp_path):
    with serve_space(tmp_path) as (_, url):
        client = gradio_client.Client(url, verbose=False)
        with pytest.raises(gradio_client.exceptions.AppError, match="make demo"):
            client.predict(NEGATIVE_SENTENCE, "cf", "end", 0, api_name="/probe")
        with pytest.raises(gradio_client.exceptions.AppError, match="hf-obliviate freelunch"):
            client.predict("hello", "cf", "end", "great", api_name="/lens")
        config = client.config
    texts = " ".join(str(c.get("props", {}).get("value", "")) for c in config["components"])
    assert "`make demo`" in texts and "`hf-obliviate freelunch`" in texts


def test_results_tab_shows_markdown_and_images(space):
    demo, client = space
    components = client.config["components"]
    markdown = [c["props"].get("value") for c in components if c.get("type") == "markdown"]
    assert any("| undefended | 0.8 |" in str(value) for value in markdown)
    images = [c for c in components if c.get("type") == "image"]
    assert any(c["props"].get("label") == "defense.png" and c["props"].get("value") for c in images)


def test_cli_registers_the_space_command(capsys):
    from hf_obliviate.cli import main

    assert main(["--help"]) == 0
    assert "space" in capsys.readouterr().out
    assert main(["space", "--port", "0"]) == 1
    assert "--port must be between 1 and 65535" in capsys.readouterr().err
