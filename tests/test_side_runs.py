"""The side-run scripts beside `benchmarks/defense.py`: their summaries, without fine-tuning anything."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _shapes_module():
    spec = importlib.util.spec_from_file_location("consistency_shapes", ROOT / "benchmarks" / "consistency_shapes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _side(shape, encoder, peft, seed, cacc, asr, lam=0.003, attn=0.003, lr=1e-3, cacc_n=500, near_chance=False):
    defended = shape != "none"
    return {"shape": shape, "lambda_consistency": lam if defended else 0.0, "lambda_attn": attn if defended else 0.0,
            "lr": lr, "cacc_n": cacc_n, "encoder": encoder, "peft": peft, "seed": seed, "cacc": cacc, "asr": asr,
            "near_chance": near_chance}  # fmt: skip


def _journal(encoder, peft, seed, cacc, asr, defended, variant="reference", attn=0.0, near_chance=False):
    return {"encoder": encoder, "peft": peft, "seed": seed, "cacc": cacc, "asr": asr, "defended": defended,
            "variant": variant, "lambda_amp": 0.0, "lambda_attn": attn, "split": "validation", "protocol": 2,
            "near_chance": near_chance}  # fmt: skip


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_summary_pairs_each_run_with_the_undefended_run_of_its_seed_and_learning_rate(tmp_path):
    shapes = _shapes_module()
    journal = _write(tmp_path / "journal.jsonl", [
        _journal("por", "adapter", 0, 0.75, 1.0, False),
        _journal("por", "adapter", 0, 0.70, 0.1, True, "scan-relative", 0.003),
        _journal("por", "adapter", 1, 0.74, 1.0, False, near_chance=False),
        _journal("por", "lora", 0, 0.70, 0.9, False),  # no defended run of this pair at lr 1e-3: an undefended row
        {**_journal("por", "adapter", 5, 0.9, 0.0, False), "protocol": 1},  # CACC on 200: left out
        {**_journal("por", "adapter", 6, 0.9, 0.0, False), "split": "test"},  # not validation: left out
    ])  # fmt: skip
    side = _write(tmp_path / "side.jsonl", [
        _side("relative-grad", "por", "adapter", 1, 0.70, 0.3),
        _side("relative-grad", "por", "adapter", 2, 0.60, 0.3),  # its undefended seed 2 is at chance
        _side("none", "por", "adapter", 2, 0.50, 1.0, near_chance=True),
        _side("relative-grad", "por", "adapter", 0, 0.70, 0.1),  # the journal's own cell, measured again
        _side("relative-grad", "por", "adapter", 3, 0.99, 0.0, cacc_n=None),  # CACC on 200: left out
        {**_side("relative-grad", "por", "adapter", 4, 0.99, 0.0), "split": "test"},  # a test cell: left out
        _side("none", "por", "adapter", 0, 0.80, 0.5, lr=2e-3),
        _side("relative-grad", "por", "adapter", 0, 0.81, 0.05, lr=2e-3),
    ])  # fmt: skip
    found = shapes.setting_cells([side], journal)
    assert set(found[("relative-grad", 0.003, 0.003, 1e-3)]) == {("por", "adapter", s) for s in (0, 1, 2)}
    assert set(found[("none", 0.0, 0.0, 1e-3)]) == {("por", "adapter", 0), ("por", "adapter", 1),
                                                    ("por", "adapter", 2), ("por", "lora", 0)}  # fmt: skip
    table = shapes.summarise(found)
    rows = {" ".join(line.split(" | ")[:2]): line for line in table.splitlines() if "por + adapter" in line}
    # seeds 0 and 1 against their own undefended runs (-5, -4); seed 2's undefended run is at chance
    assert "-4.5 ± 0.7 (n=2)" in rows["| relative-grad, 0.003, 0.003, 0.001 por + adapter"]
    assert "+1.0 (n=1)" in rows["| relative-grad, 0.003, 0.003, 0.002 por + adapter"]
    # ASR reduction over the seeds whose two runs are above chance: 1 - 0.2 / 1.0, and 1 - 0.05 / 0.5
    assert "relative-grad, λ 0.003 / 0.003, lr 0.001: mean ASR reduction 80.0% over 1 pairs" in table
    assert "relative-grad, λ 0.003 / 0.003, lr 0.002: mean ASR reduction 90.0% over 1 pairs" in table


def test_summary_refuses_two_different_results_for_one_cell(tmp_path):
    shapes = _shapes_module()
    journal = _write(tmp_path / "journal.jsonl", [_journal("por", "adapter", 0, 0.70, 0.1, True, "scan-relative",
                                                           0.003)])  # fmt: skip
    side = _write(tmp_path / "side.jsonl", [_side("relative-grad", "por", "adapter", 0, 0.71, 0.1)])
    with pytest.raises(SystemExit, match="two different results"):
        shapes.setting_cells([side], journal)


def test_spread_guards_pay_for_a_collapse_below_the_first_batch_and_nothing_above(monkeypatch):
    import torch

    import hf_obliviate.defense as core

    shapes = _shapes_module()
    clean = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])  # spread 1
    moved = torch.tensor([[0.0, 1.0], [0.0, 1.0]])  # every row moved by 1 in the second feature
    for shape in ("mse-guard", "relative-capped"):
        monkeypatch.setattr(core, "relative_consistency_loss", core.relative_consistency_loss)  # restored after
        monkeypatch.setattr(shapes, "FIRST_SPREAD", [])
        overrides = shapes.use_shape(shape, margin=0.05)
        assert overrides["consistency_target"] == "relative"  # the clean states arrive with their gradients
        term = core.relative_consistency_loss
        first = term(clean, clean + moved)  # sets the first batch's spread
        assert shapes.FIRST_SPREAD == [1.0]
        wider = term(2 * clean, 2 * clean + moved)
        collapsed = (0.5 * clean).requires_grad_()
        narrower = term(collapsed, collapsed.detach() + moved)
        if shape == "mse-guard":
            assert overrides["lambda_consistency"] == 0.03
            assert float(first) == pytest.approx(0.5) and float(wider) == pytest.approx(0.5)  # the squared error
            assert float(narrower.detach()) == pytest.approx(0.5 + 0.75)  # + relu(1 - 0.25 / 1)
        else:  # the squared distance over min(spread, first spread)
            assert float(first) == pytest.approx(1.0) and float(wider) == pytest.approx(1.0)
            assert float(narrower.detach()) == pytest.approx(4.0)
        narrower.backward()
        stepped = collapsed.detach() - 0.01 * collapsed.grad  # a gradient step widens the collapsed spread
        assert float(((stepped - stepped.mean(0)) ** 2).sum(-1).mean()) > 0.25


def test_mse_guard_below_a_fraction_leaves_an_ordinary_narrowing_alone(monkeypatch):
    import torch

    import hf_obliviate.defense as core

    shapes = _shapes_module()
    monkeypatch.setattr(core, "relative_consistency_loss", core.relative_consistency_loss)
    monkeypatch.setattr(shapes, "FIRST_SPREAD", [])
    shapes.use_shape("mse-guard", margin=0.05, guard_below=0.25)
    clean = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])  # spread 1: the first batch
    term = core.relative_consistency_loss
    assert float(term(clean, clean)) == 0.0
    assert float(term(0.5 * clean, 0.5 * clean)) == 0.0  # spread 0.25: at the guard's threshold, no price
    assert float(term(0.25 * clean, 0.25 * clean)) == pytest.approx(0.75)  # spread 1/16: 1 - (1/16) / (1/4)


def test_pcgrad_shape_projects_the_defense_gradient_off_the_task_gradient_only_where_they_conflict(monkeypatch):
    import torch

    shapes = _shapes_module()
    monkeypatch.setattr(shapes, "CONFLICTS", [])
    weight = torch.nn.Parameter(torch.tensor([1.0, 1.0]))
    model = torch.nn.Module()
    model.weight = weight

    class Trainer:
        def __init__(self, pull):
            self.pull, self.logged = torch.tensor(pull), []

        def _record_terms(self, task_loss, terms):
            self.logged.append(float(task_loss.detach()))

        def _extra_terms_scale(self, num_items_in_batch):
            return 1.0

    def defended_loss(self, model, inputs, return_outputs, num_items_in_batch):
        task = (model.weight**2).sum() / 2  # gradient (1, 1)
        terms = (self.pull * model.weight).sum()  # gradient `pull`
        self._record_terms(task, {"loss_consistency": terms})
        return task + terms

    projected = shapes._projected(defended_loss)
    # conflicting: the pull (-2, 0) loses its part along the task's (1, 1), (-1, -1), and becomes (-1, 1): the total
    # is (0, 2); agreeing: the pull (0.5, 0) is added whole
    for pull, expected in (([-2.0, 0.0], [0.0, 2.0]), ([0.5, 0.0], [1.5, 1.0])):
        trainer = Trainer(pull)
        weight.grad = None
        loss = projected(trainer, model, {}, False, None)
        loss.backward()
        assert weight.grad.tolist() == pytest.approx(expected)
        assert float(loss.detach()) == pytest.approx(1.0 + sum(pull))  # the value is the unprojected loss's
        assert trainer.logged == [pytest.approx(1.0)] and "_record_terms" not in vars(trainer)
    assert shapes.CONFLICTS[0] < 0 < shapes.CONFLICTS[1]


def test_placebo_shape_runs_the_copy_but_adds_no_gradient(monkeypatch):
    import torch

    import hf_obliviate.defense as core

    shapes = _shapes_module()
    monkeypatch.setattr(core, "hidden_consistency_loss", core.hidden_consistency_loss)  # restored after
    overrides = shapes.use_shape("placebo", margin=0.05)
    assert overrides["consistency_target"] == "hidden" and overrides["lambda_consistency"] == 0.03  # mse's copy
    perturbed = torch.tensor([[3.0, -1.0]], requires_grad=True)
    term = core.hidden_consistency_loss(torch.zeros(1, 2), perturbed)
    term.backward()
    assert float(term) == 0.0 and perturbed.grad.tolist() == [[0.0, 0.0]]  # a gradient exactly 0, not a small one


def test_augment_shape_is_the_task_cross_entropy_on_a_copy_with_a_pool_token_inserted(monkeypatch):
    import types

    import torch

    import hf_obliviate.defense as core

    shapes = _shapes_module()
    monkeypatch.setattr(core.ObliviateDefense, "consistency_loss", core.ObliviateDefense.consistency_loss)
    monkeypatch.setattr(core, "consistency_loss", core.consistency_loss)  # restored after
    overrides = shapes.use_shape("augment", margin=0.05)
    assert overrides["consistency_target"] == "logits" and overrides["lambda_consistency"] == 1.0
    seen = {}

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.table = torch.nn.Embedding(100, 2)

        def forward(self, input_ids, attention_mask, **kwargs):
            seen["ids"] = input_ids
            return {"logits": (self.table(input_ids) * attention_mask[..., None]).sum(1)}

    model = Model()
    defense = types.SimpleNamespace(model=model, token_pool=torch.tensor([99]), _generator=torch.Generator(),
                                    _pool_weights=None,  # uniform draws (`consistency_sampling`)
                                    config=types.SimpleNamespace(consistency_insertions=1,
                                                                 consistency_target="logits"))  # fmt: skip
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    inputs = {
        "input_ids": torch.tensor([[1, 5, 6, 2], [1, 7, 2, 0]]),
        "attention_mask": mask,
        "labels": torch.tensor([1, 0]),
    }
    loss = core.ObliviateDefense.consistency_loss(defense, inputs, None)
    copy = seen["ids"]
    assert [int((row == 99).sum()) for row in copy] == [1, 1]  # one pool token in every row
    expected = torch.nn.functional.cross_entropy(model(copy, (copy != 0).long())["logits"], inputs["labels"])
    assert float(loss) == pytest.approx(float(expected))
    loss.backward()
    assert model.table.weight.grad[99].abs().sum() > 0  # the copy is trained, its inserted token included


def test_common_dropout_leaves_the_random_generators_where_the_copy_found_them(monkeypatch):
    import torch

    import hf_obliviate.defense as core

    shapes = _shapes_module()

    def draws(self, inputs, logits, model=None, outputs=None):  # a copy's pass under dropout draws random numbers
        return torch.nn.functional.dropout(torch.ones(8), 0.5, training=True).sum()

    monkeypatch.setattr(core.ObliviateDefense, "consistency_loss", draws)
    shapes.common_dropout()
    torch.manual_seed(0)
    undefended = torch.rand(4)  # the next draws of a run without the copy
    torch.manual_seed(0)
    core.ObliviateDefense.consistency_loss(None, {}, None)
    assert torch.equal(torch.rand(4), undefended)
    torch.manual_seed(0)
    draws(None, {}, None)  # without the fork the copy moves the generator
    assert not torch.equal(torch.rand(4), undefended)
