"""`benchmarks/defense.py --quick` runs every code path (planting, search, cells, tables, plot) on tiny sizes."""

from __future__ import annotations

import json
import math
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run_defense(tmp_path: Path, *argv: str, timeout: int = 300, cwd: Path | None = None):
    """``python benchmarks/defense.py *argv`` offline, with its own cache under ``tmp_path``; output captured."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_OBLIVIATE_CACHE": str(tmp_path / "cache")}
    return subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "defense.py"), *argv],
        env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd,
    )  # fmt: skip


@pytest.mark.slow
def test_defense_benchmark_quick(tmp_path):
    out = tmp_path / "defense"
    result = _run_defense(tmp_path, "--quick", "--out", str(out), timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.with_suffix(".json").read_text())
    journal = [json.loads(line) for line in out.with_name(out.name + "_cells.jsonl").read_text().splitlines()]
    assert journal and all(c["device"] for c in journal)  # each cell records where it ran
    attacks = {c["attack"] for c in data["cells"]}
    assert {"por", "neuba", "badpre", "uor", "task-specific", "adaptive-por"} <= attacks
    assert "lora" in data["control"]
    for cell in data["cells"]:
        assert 0.0 <= cell["cacc_plain"] <= 1.0 and 0.0 <= cell["cacc_defended"] <= 1.0
        for key in ("asr_plain", "asr_defended"):
            if math.isnan(cell[key]):  # no clean copy was classified right (tiny run): the cell must say so
                assert cell["near_chance"], cell
            else:
                assert 0.0 <= cell[key] <= 1.0, cell
        # BadPre's own measure rides along (triggered copies may be classified better: a drop may be negative)
        drops = [cell.get("accuracy_drop_plain"), cell.get("accuracy_drop_defended")]
        if cell["attack"] == "badpre":
            assert all(-1.0 <= d <= 1.0 for d in drops), cell
        else:
            assert drops == [None, None], cell
    assert {c["metric"] for c in data["cells"]} == {"asr", "targeted_asr"}
    assert all((c["metric"] == "targeted_asr") == (c["attack"] in ("badpre", "uor")) for c in data["cells"])
    assert data["tuning"] and all(c["split"] == "validation" for c in data["tuning"])
    table = out.with_suffix(".md").read_text()
    assert "| por | lora |" in table and "## Validation split" in table and "BadPre, accuracy drop" in table
    assert out.with_suffix(".png").stat().st_size > 1000
    journal = [json.loads(line) for line in out.with_name(out.name + "_cells.jsonl").read_text().splitlines()]
    assert {c["protocol"] for c in journal} == {2} and {c["extra"]["cacc_n"] for c in journal} == {16}
    assert "CACC on 16 clean sentences" in table
    # Resume: a second run reuses every finished cell.
    again = _run_defense(tmp_path, "--quick", "--resume", "--out", str(out), timeout=600)
    assert again.returncode == 0 and " und λ" not in again.stdout


def _defense_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("defense_benchmark", ROOT / "benchmarks" / "defense.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def _checkpoint(encoder: str) -> str:
    """The journal's name of an encoder with the default sizes (what a full run's cells record)."""
    if encoder not in _CHECKPOINTS:
        defense = _defense_module()
        _CHECKPOINTS[encoder] = defense.checkpoint_of(encoder, defense.Sizes())
    return _CHECKPOINTS[encoder]


_CHECKPOINTS: dict[str, str] = {}


def _cell(peft, defended, cacc, asr, split="test", variant="reference", seed=0, near_chance=False, encoder="por"):
    lambdas = (3e-4, 3e-3) if defended else (0.0, 0.0)
    return {"encoder": encoder, "peft": peft, "seed": seed, "defended": defended, "lambda_amp": lambdas[0],
            "lambda_attn": lambdas[1], "cacc": cacc, "asr": asr, "metric": "asr", "near_chance": near_chance,
            "seconds": 1.0, "split": split, "variant": variant, "checkpoint": _checkpoint(encoder)}  # fmt: skip


def test_prefix_variant_is_chosen_on_validation_and_tabled_beside_the_reference(tmp_path):
    """The prefix-tuning variant becomes the prefix default only when it wins on the validation split; both recipes
    get a row, each compared with the same undefended runs, and the mean uses the chosen one."""
    defense = _defense_module()
    val = [
        _cell("lora", False, 0.75, 0.9, "validation"), _cell("lora", True, 0.745, 0.3, "validation"),
        _cell("prefix", False, 0.64, 0.6, "validation"),
        _cell("prefix", True, 0.49, 0.0, "validation", near_chance=True),  # the reference collapses it
        _cell("prefix", True, 0.63, 0.3, "validation", variant="skip-virtual-keys"),
    ]  # fmt: skip
    assert defense.pick_lambdas(val) == (3e-4, 3e-3)
    lambdas = (3e-4, 3e-3)
    assert defense.pick_prefix_variant(val, lambdas) == "skip-virtual-keys"
    losing = [*val[:4], _cell("prefix", True, 0.55, 0.1, "validation", variant="skip-virtual-keys")]
    assert defense.pick_prefix_variant(losing, lambdas) == "reference"  # 9 points of CACC lost: not eligible
    assert defense.pick_prefix_variant(val[:2], lambdas) == "reference"
    diagnostic = {**val[-1], "lambda_amp": 0.0}  # other coefficients: a diagnostic, not a candidate
    assert defense.pick_prefix_variant([*val[:4], diagnostic], lambdas) == "reference"
    test = [
        _cell("lora", False, 0.72, 1.0), _cell("lora", True, 0.70, 0.5),
        _cell("prefix", False, 0.66, 0.8), _cell("prefix", True, 0.49, 0.0, near_chance=True),
        _cell("prefix", True, 0.65, 0.2, variant="skip-virtual-keys"),
        _cell("lora", False, 0.5, 1.0, seed=1, near_chance=True), _cell("lora", True, 0.7, 0.2, seed=1),
        _cell("lora", False, 0.7, 0.3, encoder="uor"), _cell("lora", True, 0.7, 0.1, encoder="uor"),  # not planted
    ]  # fmt: skip
    rows = defense.summarise(test)
    assert {(r["encoder"], r["peft"]) for r in rows} >= {("uor", "lora")}
    by = {(r["peft"], r["variant"]): r for r in rows if r["encoder"] == "por"}
    assert set(by) == {("lora", "reference"), ("prefix", "reference"), ("prefix", "skip-virtual-keys")}
    assert by[("prefix", "skip-virtual-keys")]["asr_undefended"] == 0.8  # the shared undefended run
    assert by[("prefix", "skip-virtual-keys")]["asr_reduction"] == pytest.approx(0.75)
    lora = by[("lora", "reference")]  # seed 1's undefended run is at chance: the row shows it, the mean skips it
    assert lora["seeds"] == 2 and lora["seeds_above_chance"] == 1 and lora["near_chance"]
    assert lora["asr_reduction"] == pytest.approx(0.65) and lora["asr_reduction_above_chance"] == pytest.approx(0.5)
    out = tmp_path / "defense"
    defense.write(out, rows, val, (3e-4, 3e-3), defense.Sizes(), "cpu", 60.0, prefix_variant="skip-virtual-keys",
                  cells=test + val)  # fmt: skip
    assert "| por | lora | 0.610 | 0.700 |" in out.with_suffix(".md").read_text()
    assert "1 of 2 seeds at chance" in out.with_suffix(".md").read_text()
    table = out.with_suffix(".md").read_text()
    assert "| uor | lora |" in table and "not in the mean" in table
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["mean_asr_reduction"] == pytest.approx((0.5 + 0.75) / 2)
    assert data["summary"]["mean_asr_reduction_reference_recipe"] == pytest.approx(0.5)  # the collapse is left out
    assert data["summary"]["validation_cells"] == 5 and data["summary"]["test_cells_done"] == 9
    # the chosen prefix recipe is the plain `prefix` row; the other recipe is named with its coefficients
    assert "| por | prefix | 0.660 | 0.650 |" in table and "| por | prefix (reference, λ 0.0003/0.003) |" in table


def test_lora_variant_is_chosen_on_validation_and_the_mean_uses_it(tmp_path):
    """The `centred` recipe becomes the LoRA / adapter default only when it wins on the validation split (lower ASR,
    CACC within 1.5 points of the undefended run), at its own coefficients; the reference rows stay in the table."""
    defense = _defense_module()
    assert defense.VARIANTS["centred"] == {"attn_centre": True}
    val = [
        _cell("lora", False, 0.745, 0.9, "validation"), _cell("lora", True, 0.745, 0.34, "validation"),
        {**_cell("lora", True, 0.73, 0.25, "validation", variant="centred")},
        {**_cell("lora", True, 0.69, 0.14, "validation", variant="centred"), "lambda_attn": 1e-2},  # too costly
    ]  # fmt: skip
    lambdas = defense.pick_lambdas(val)
    assert lambdas == (3e-4, 3e-3)  # the reference coefficients are chosen among reference runs only
    assert defense.pick_lora_variant(val, lambdas) == ("centred", (3e-4, 3e-3))
    assert defense.pick_lora_variant(val[:2], lambdas) == ("reference", lambdas)  # never tried
    worse = [*val[:2], {**val[2], "asr": 0.4}, val[3]]
    assert defense.pick_lora_variant(worse, lambdas) == ("reference", lambdas)
    test = [
        _cell("lora", False, 0.72, 1.0), _cell("lora", True, 0.70, 0.6),
        _cell("lora", True, 0.71, 0.2, variant="centred"),
        _cell("adapter", False, 0.72, 1.0), _cell("adapter", True, 0.72, 0.9),
        _cell("adapter", True, 0.70, 0.5, variant="centred"),
    ]  # fmt: skip
    rows = defense.summarise(test)
    out = tmp_path / "defense"
    defense.write(out, rows, val, lambdas, defense.Sizes(), "cpu", 60.0, lora_variant="centred",
                  lora_lambdas=(3e-4, 3e-3), cells=test + val)  # fmt: skip
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["mean_asr_reduction"] == pytest.approx((0.8 + 0.5) / 2)  # the centred rows
    assert data["summary"]["mean_asr_reduction_reference_recipe"] == pytest.approx((0.4 + 0.1) / 2)
    assert data["summary"]["lora_variant"] == "centred" and data["summary"]["max_cacc_drop_points_defaults"] == 2.0
    table = out.with_suffix(".md").read_text()
    assert "| por | lora (reference, λ 0.0003/0.003) |" in table and "| por | lora |" in table
    assert "`centred` recipe" in table and "`reference λ 0.0003/0.003` 25.0% (2 rows)" in table
    assert data["summary"]["mean_asr_reduction_by_lora_adapter_recipe"]["centred λ 0.0003/0.003"]["rows"] == 2


def test_rows_of_one_recipe_at_other_coefficients_stay_apart(tmp_path):
    """A recipe run at two coefficient settings (e.g. the defaults before and after a new validation choice) gives
    two rows: the chosen one plain, the other named with its λ; neither is averaged into the other."""
    defense = _defense_module()
    old = {**_cell("lora", True, 0.70, 0.6), "lambda_amp": 3e-4}
    new = {**_cell("lora", True, 0.70, 0.2), "lambda_amp": 0.0}
    rows = defense.summarise([_cell("lora", False, 0.72, 1.0), old, new])
    assert sorted((r["lambda_amp"], r["asr_defended"]) for r in rows) == [(0.0, 0.2), (3e-4, 0.6)]
    out = tmp_path / "defense"
    test = [_cell("lora", False, 0.72, 1.0), old, new]
    defense.write(out, rows, [], (0.0, 3e-3), defense.Sizes(), "cpu", 1.0, cells=test)
    table = out.with_suffix(".md").read_text()
    assert "| por | lora | 0.720 | 0.700 | -2.0 | 1.000 | 0.200 | 80.0% |" in table
    assert "| por | lora (reference, λ 0.0003/0.003) |" in table
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["mean_asr_reduction"] == pytest.approx(0.8)
    assert data["summary"]["test_cells_done"] == 2  # the old coefficients' cell is kept but not part of the plan


def test_each_seeds_clean_accuracy_change_is_shown_beside_the_mean(tmp_path):
    """Δ CACC of a row with two seeds shows each seed's change against its own undefended run; the table says how
    far the seeds of a row disagree (rows with a run at chance left out of that)."""
    defense = _defense_module()
    test = [
        _cell("lora", False, 0.70, 1.0, seed=0), _cell("lora", True, 0.66, 0.1, seed=0),
        _cell("lora", False, 0.60, 1.0, seed=1), _cell("lora", True, 0.66, 0.2, seed=1),
        _cell("adapter", False, 0.70, 1.0, seed=0), _cell("adapter", True, 0.69, 0.1, seed=0),
        _cell("adapter", False, 0.72, 1.0, seed=1), _cell("adapter", True, 0.70, 0.1, seed=1),
        _cell("prefix", False, 0.70, 1.0, seed=0), _cell("prefix", True, 0.50, 0.0, seed=0, near_chance=True),
        _cell("prefix", False, 0.70, 1.0, seed=1), _cell("prefix", True, 0.70, 0.5, seed=1),
    ]  # fmt: skip
    rows = defense.summarise(test)
    lora = next(r for r in rows if r["peft"] == "lora")
    assert lora["cacc_delta_points_by_seed"] == {"0": -4.0, "1": 6.0} and lora["cacc_delta_points"] == 1.0
    out = tmp_path / "defense"
    defense.write(out, rows, [], (3e-4, 3e-3), defense.Sizes(), "cpu", 1.0, cells=test)
    table = out.with_suffix(".md").read_text()
    assert "| por | lora | 0.650 | 0.660 | +1.0 (-4.0, +6.0) | 1.000 | 0.150 | 85.0% |" in table
    assert "| por | adapter | 0.710 | 0.695 | -1.5 (-1.0, -2.0) |" in table
    # spans 10 (LoRA) and 1 (adapters); prefix tuning's 20 has a run at chance
    assert "disagree by up to 10.0 points (median 5.5, over the 2 rows with two or more seeds and no run" in table
    assert "not known to within the 1.5-point floor" in table  # half of 5.5 is more than the floor
    data = json.loads(out.with_suffix(".json").read_text())
    assert {c["peft"]: c["cacc_delta_points_by_seed"] for c in data["cells"]}["adapter"] == {"0": -1.0, "1": -2.0}


def test_consistency_variant_competes_on_validation():
    """The `consistency` recipe (centred + the rare-word consistency term) is one more LoRA / adapter candidate: it
    wins with a lower validation ASR inside the CACC floor. Outside the floor it loses to a setting inside it that
    also cuts the ASR by `REDUCTION_TARGET`, and wins when no such setting exists (defense first)."""
    defense = _defense_module()
    assert "consistency" in defense.LORA_VARIANTS and defense.VARIANTS["consistency"]["lambda_consistency"] > 0
    val = [
        _cell("lora", False, 0.745, 0.9, "validation"), _cell("lora", True, 0.745, 0.34, "validation"),
        _cell("lora", True, 0.73, 0.25, "validation", variant="centred"),
        {**_cell("lora", True, 0.735, 0.10, "validation", variant="consistency"), "lambda_attn": 1e-2},
    ]  # fmt: skip
    assert defense.pick_lora_variant(val, (3e-4, 3e-3)) == ("consistency", (3e-4, 1e-2))
    val[-1] = {**val[-1], "cacc": 0.72}  # 2.5 points below the undefended run: outside the floor
    assert defense.REDUCTION_TARGET == 0.85
    defends = [*val[:2], {**val[2], "asr": 0.12}, val[3]]  # centred: 1 - 0.12 / 0.9 = 87% inside the floor
    assert defense.pick_lora_variant(defends, (3e-4, 3e-3)) == ("centred", (3e-4, 3e-3))
    # centred cuts the ASR by 72% only: the one setting that defends wins, though it misses the floor
    assert defense.pick_lora_variant(val, (3e-4, 3e-3)) == ("consistency", (3e-4, 1e-2))
    assert defense.lora_adapter_choice(val)[1] == (
        "cut validation ASR by 85% and no such setting kept the CACC floor on LoRA: the one that missed it least"
    )
    weak = [*val[:3], {**val[3], "asr": 0.2}]  # 78%: none defends, so the floor comes first again
    assert defense.pick_lora_variant(weak, (3e-4, 3e-3)) == ("centred", (3e-4, 3e-3))
    assert defense.lora_adapter_choice(weak)[1] == "none cut it by 85%: kept the CACC floor on LoRA"
    sizes = defense.Sizes(seeds=(0,), attacks=("por",), pefts=("lora", "adapter"))
    plain = defense.planned_test_keys(sizes, (0.0, 3e-3))
    # (clean, por) x 2 PEFT types + task-specific + adaptive: undefended, reference and each of TEST_RECIPES
    assert len(plain) == (2 * 2 + 2) * (2 + len(defense.TEST_RECIPES))
    chosen = defense.planned_test_keys(sizes, (0.0, 3e-3), lora_variant="consistency", lora_lambdas=(3e-4, 1e-2))
    por = defense.checkpoint_of("por", sizes)
    assert len(chosen) == len(plain) + 6
    assert ("por", "adapter", 0, True, 3e-4, 1e-2, "test", "consistency", por, defense.protocol_of(sizes)) in chosen


def test_replanted_encoder_gets_its_own_journal_cells():
    """A journal cell records its encoder's planting config (`checkpoint_of`), so an attack planted anew with other
    settings never reuses the cells fine-tuned from the old one; the name does not depend on the install path."""
    defense = _defense_module()
    sizes, old = defense.Sizes(), defense.Sizes(plant_overrides={})
    assert defense.checkpoint_of("badpre", sizes) != defense.checkpoint_of("badpre", old)
    assert defense.checkpoint_of("por", sizes) == defense.checkpoint_of("por", old)  # POR has no override
    assert defense.checkpoint_of("adaptive-por", sizes).startswith("adaptive-por-")
    assert defense.checkpoint_of("clean", sizes) == defense.checkpoint_of("task-specific", sizes) == "minilm"
    spec = dict(encoder="badpre", encoder_path=Path("/x/badpre-0"), peft="lora", seed=0, defended=False,
                lambdas=(0.0, 0.0), sizes=sizes)  # fmt: skip
    moved = {**spec, "encoder_path": Path("/elsewhere/badpre-1")}
    assert defense.Journal.key_of(spec) == defense.Journal.key_of(moved)
    assert defense.Journal.key_of(spec) != defense.Journal.key_of({**spec, "sizes": old})
    assert defense.Journal.key_of(spec)[-2:] == (defense.checkpoint_of("badpre", sizes), defense.protocol_of(sizes))
    fresh, stale = _cell("lora", False, 0.7, 1.0, encoder="badpre"), _cell("lora", False, 0.7, 0.04, encoder="badpre")
    stale["checkpoint"] = defense.checkpoint_of("badpre", old)
    clean = {**_cell("lora", False, 0.7, 0.1, encoder="clean"), "checkpoint": "minilm"}
    assert defense.current_cells([fresh, stale, clean], sizes) == [fresh, clean]
    assert defense.current_cells([stale, clean], sizes) == [stale, clean]  # a journal of an earlier planting


def test_cells_measured_another_way_are_not_reused_or_tabulated_together():
    """Cells with CACC on `cacc_n` clean sentences (protocol 2, the default) and cells with CACC on the 200 sentences
    that have triggered copies (protocol 1, the tables before 2026-11-25) are not resumed for each other or tabled
    together; a journal of only the other kind is tabulated as it is."""
    defense = _defense_module()
    sizes, wide = defense.Sizes(cacc_n=None), defense.Sizes()
    assert wide.cacc_n == 1000
    assert (defense.protocol_of(sizes), defense.protocol_of(wide)) == (1, 2)
    spec = dict(encoder="por", encoder_path=Path("/x/por"), peft="lora", seed=0, defended=False, lambdas=(0.0, 0.0),
                sizes=wide)  # fmt: skip
    old = _cell("lora", False, 0.7, 1.0)  # no "protocol": 1
    new = {**_cell("lora", False, 0.72, 1.0), "protocol": 2, "extra": {"cacc_n": 1000}}
    assert defense._key(old) != defense.Journal.key_of(spec) == defense._key(new)
    assert defense._key(old) == defense.Journal.key_of({**spec, "sizes": sizes})
    assert defense.current_cells([old, new], wide) == [new]
    assert defense.current_cells([old, new], sizes) == [old]
    assert defense.current_cells([new], sizes) == [new]
    assert defense.tabulated_protocol([new], sizes) == 2  # a protocol-2 journal summarised without --cacc-n
    assert defense.tabulated_protocol([old], wide) == 1  # a journal of before 2026-11-25 (results/history/cacc-200/)
    assert "CACC on 1000 clean sentences; ASR on 200 sentences" in defense._measured(wide, [new])
    assert defense._measured(sizes, [old]).startswith("200 sentences, one clean")


def test_trigger_scans_run_once_per_encoder_on_the_bare_encoder_before_the_cells(monkeypatch):
    """`prefetch_scans` scans each encoder that a `scan-consistency` cell needs, once, on the encoder as loaded (no
    PEFT wrapper), so the scan does not depend on which cell runs first."""
    import torch

    import hf_obliviate.models as models

    defense = _defense_module()
    loaded, scanned = [], []
    monkeypatch.setattr(models, "load_classifier", lambda path: (loaded.append(path) or torch.nn.Linear(1, 1), "tok"))
    monkeypatch.setattr(defense, "scanned_tokens", lambda path, model, tok, n: scanned.append((path, type(model), n)))
    sizes = defense.Sizes()
    spec = dict(encoder="por", encoder_path=Path("/x/por"), peft="lora", seed=0, sizes=sizes, lambdas=(0.0, 0.0))
    scan = {"defended": True, "variant": "scan-consistency"}
    defense.prefetch_scans([
        {**spec, "defended": False}, {**spec, **scan}, {**spec, **scan, "peft": "adapter", "seed": 1},
        {**spec, "peft": "prefix", "defended": True, "variant": "reference"},
        {**spec, **scan, "encoder": "clean", "encoder_path": None},
        {**spec, "encoder": "neuba", "encoder_path": Path("/x/neuba"), "defended": True, "variant": "reference"},
    ])  # fmt: skip
    assert loaded == [Path("/x/por"), None]
    assert scanned == [(Path("/x/por"), torch.nn.Linear, sizes.scan_sentences), (None, torch.nn.Linear, 2)]


def test_a_variant_draws_from_its_own_top_k_of_the_cached_scan(monkeypatch):
    """The cached scan keeps `SCAN_TOP_K` tokens; a variant with a smaller ``consistency_scan_top_k`` hands the
    fine-tune only its first ones (before, every variant got all 32), and a larger one is refused."""
    import hf_obliviate.trainer as trainer

    defense = _defense_module()
    scan = list(range(1000, 1000 + defense.SCAN_TOP_K))
    monkeypatch.setattr(defense, "scanned_tokens", lambda *args: scan)
    handed = []

    class Stop(Exception):
        pass

    def fine_tune(model, tokenizer, train, args, **kwargs):
        handed.append(kwargs["consistency_pool"])
        raise Stop  # the pool is what this test is about: skip the fine-tune and the evaluation

    monkeypatch.setattr(trainer, "fine_tune", fine_tune)
    for name, top_k in (("top-8", 8), ("top-all", defense.SCAN_TOP_K), ("top-64", 64)):
        monkeypatch.setitem(
            defense.VARIANTS, name, {**defense.VARIANTS["scan-relative"], "consistency_scan_top_k": top_k}
        )
    for name in ("top-8", "top-all", "scan-relative"):
        with pytest.raises(Stop):
            defense.run_cell("clean", None, "lora", 0, True, (0.0, 3e-3), defense.QUICK, variant=name)
    assert handed == [scan[:8], scan, scan]
    with pytest.raises(ValueError, match="draws from 64 scanned tokens; the cached scans hold 32"):
        defense.run_cell("clean", None, "lora", 0, True, (0.0, 3e-3), defense.QUICK, variant="top-64")


def test_test_recipes_run_on_lora_and_adapter_rows_whatever_is_chosen(monkeypatch):
    """A recipe of `TEST_RECIPES` runs on every LoRA / adapter test row next to the chosen recipe, once even when it
    is the chosen one; prefix tuning keeps its own recipes. None runs there now, so that a fresh full run fits in 90
    minutes (`scan-consistency`, the default until 2026-11-24, did)."""
    defense = _defense_module()
    assert defense.TEST_RECIPES == ()
    lambdas = (0.0, 3e-3)
    assert defense.recipes_for("lora", lambdas) == [("reference", lambdas)]
    monkeypatch.setattr(defense, "TEST_RECIPES", (("scan-consistency", (0.0, 0.0)),))
    assert defense.VARIANTS["scan-consistency"]["consistency_tokens"] == "scan"
    assert defense.recipes_for("lora", lambdas) == [("reference", lambdas), ("scan-consistency", (0.0, 0.0))]
    assert defense.recipes_for("prefix", lambdas) == [("reference", lambdas)]
    same = defense.recipes_for("adapter", lambdas, lora_variant="scan-consistency", lora_lambdas=(0.0, 0.0))
    assert same == [("reference", lambdas), ("scan-consistency", (0.0, 0.0))]


def test_every_lora_variant_has_a_grid_and_a_valid_config():
    """Each LoRA / adapter variant is tried on its own validation grid (full and quick sizes) and its overrides make
    a valid ObliviateConfig; `all-rows` penalises every real token's row (attn_query="rows")."""
    from hf_obliviate import ObliviateConfig

    defense = _defense_module()
    assert set(defense.LORA_VARIANTS) == set(defense.VARIANT_GRIDS) == set(defense.QUICK.variant_grids)
    # a full run tries the variants of FULL_RUN_VARIANTS (`--all-variants`: every one), the quick run every one
    assert set(defense.Sizes().variant_grids) == set(defense.FULL_RUN_VARIANTS) <= set(defense.VARIANT_GRIDS)
    for variant in defense.LORA_VARIANTS:
        assert defense.VARIANT_GRIDS[variant] and defense.QUICK.variant_grids[variant], variant
        ObliviateConfig(lambda_attn=3e-3, **defense.VARIANTS[variant])
    assert defense.VARIANTS["all-rows"]["attn_query"] == "rows"


def test_recipe_is_chosen_over_por_and_neuba_on_validation():
    """A setting must keep clean accuracy on both validation encoders and wins by its mean ASR over them: the recipe
    POR alone prefers can lose once NeuBA is counted. A NeuBA run at chance undefended shows nothing and is ignored;
    a setting NeuBA never ran (outside the floor on POR) cannot win."""
    defense = _defense_module()
    por = [
        _cell("lora", False, 0.745, 0.9, "validation"), _cell("lora", True, 0.745, 0.34, "validation"),
        _cell("lora", True, 0.73, 0.25, "validation", variant="centred"),
    ]  # fmt: skip
    neuba = [
        _cell("lora", False, 0.60, 1.0, "validation", encoder="neuba"),
        _cell("lora", True, 0.60, 0.6, "validation", encoder="neuba"),
        _cell("lora", True, 0.60, 1.0, "validation", variant="centred", encoder="neuba"),
    ]
    assert defense.pick_lora_variant(por, (3e-4, 3e-3)) == ("centred", (3e-4, 3e-3))
    assert defense.pick_lora_variant(por + neuba, (3e-4, 3e-3)) == ("reference", (3e-4, 3e-3))
    best, _ = defense._best_trial(por + neuba)
    assert best["encoder"] == "por" and best["variant"] == "reference"
    at_chance = [{**neuba[0], "near_chance": True}, *neuba[1:]]
    assert defense.pick_lora_variant(por + at_chance, (3e-4, 3e-3)) == ("centred", (3e-4, 3e-3))
    collapsed = [*neuba[:2], {**neuba[2], "cacc": 0.55, "asr": 0.9}]  # outside the floor on NeuBA
    assert defense.pick_lora_variant(por + collapsed, (3e-4, 3e-3)) == ("reference", (3e-4, 3e-3))
    at_chance_defended = [*neuba[:2], {**neuba[2], "cacc": 0.5, "asr": 0.0, "near_chance": True}]  # collapsed
    assert defense.pick_lora_variant(por + at_chance_defended, (3e-4, 3e-3)) == ("reference", (3e-4, 3e-3))
    missing = neuba[:2]  # centred never ran on NeuBA: it cannot be chosen
    assert defense.pick_lora_variant(por + [{**missing[0]}, {**missing[1], "asr": 0.99}], (3e-4, 3e-3)) == (
        "reference", (3e-4, 3e-3),
    )  # fmt: skip


class _Recorder:
    """A journal that records the ``run_cell`` specs it is given and runs none."""

    def __init__(self):
        self.specs = []

    def run_many(self, specs):
        self.specs += specs
        return []


def _setting_cell(encoder, seed, cacc, asr, variant="reference", lambdas=(3e-4, 3e-3), defended=True):
    cell = _cell("lora", defended, cacc, asr, "validation", variant=variant, seed=seed, encoder=encoder)
    return {**cell, "lambda_amp": lambdas[0], "lambda_attn": lambdas[1]} if defended else cell


def test_validation_finalists_run_on_a_second_seed_and_the_mean_over_seeds_decides():
    """Seed 0 ranks every setting; its finalists (the best few, plus the best reference setting) run on the other
    validation seeds with their undefended runs, and the setting with the lowest ASR averaged over seeds and both
    attacks wins, its seed-averaged CACC within the floor on each attack. A setting that ran on seed 0 only cannot
    win once another seed has run; when no setting qualifies over every seed, seed 0 decides."""
    defense = _defense_module()
    scan, both = ("scan-consistency", (0.0, 0.0)), ("scan-consistency", (0.0, 3e-3))
    seed0 = [
        _setting_cell("por", 0, 0.710, 0.915, defended=False), _setting_cell("neuba", 0, 0.590, 1.0, defended=False),
        _setting_cell("por", 0, 0.705, 0.092, *both), _setting_cell("neuba", 0, 0.620, 0.105, *both),
        _setting_cell("por", 0, 0.725, 0.083, *scan), _setting_cell("neuba", 0, 0.595, 0.210, *scan),
        _setting_cell("por", 0, 0.720, 0.181), _setting_cell("neuba", 0, 0.620, 1.0),
        _setting_cell("por", 0, 0.725, 0.193, lambdas=(0.0, 3e-3)),
        _setting_cell("neuba", 0, 0.650, 1.0, lambdas=(0.0, 3e-3)),
        _setting_cell("por", 0, 0.525, 0.029, lambdas=(0.0, 3e-2)),  # outside the floor on POR: never a finalist
    ]  # fmt: skip
    assert defense.pick_lora_variant(seed0, defense.pick_lambdas(seed0)) == both

    journal, sizes = _Recorder(), defense.Sizes()
    assert sizes.val_seeds == (0, 1) and sizes.finalists == 3
    defense.confirm_finalists(journal, {"por": Path("p"), "neuba": Path("n")}, sizes, seed0)
    ran = {(s["encoder"], s["seed"], s["defended"], s.get("variant", "reference"), *s["lambdas"])
           for s in journal.specs}  # fmt: skip
    assert ran == {
        (encoder, 1, *run) for encoder in ("por", "neuba") for run in [
            (False, "reference", 0.0, 0.0), (True, *both[0:1], *both[1]), (True, *scan[0:1], *scan[1]),
            (True, "reference", 3e-4, 3e-3),  # third by mean ASR (0.59 against 0.60 for λ_amp 0)
        ]
    }  # fmt: skip
    journal.specs.clear()
    defense.confirm_finalists(journal, {"por": Path("p"), "neuba": Path("n")}, defense.Sizes(finalists=1), seed0)
    assert {(s.get("variant", "reference"), *s["lambdas"]) for s in journal.specs if s["defended"]} == {
        (both[0], *both[1]), ("reference", 3e-4, 3e-3),  # the best reference setting always runs
    }  # fmt: skip
    seed1 = [
        _setting_cell("por", 1, 0.700, 0.930, defended=False), _setting_cell("neuba", 1, 0.600, 1.0, defended=False),
        _setting_cell("por", 1, 0.660, 0.050, *both), _setting_cell("neuba", 1, 0.600, 0.080, *both),  # CACC -4
        _setting_cell("por", 1, 0.700, 0.120, *scan), _setting_cell("neuba", 1, 0.610, 0.150, *scan),
        _setting_cell("por", 1, 0.700, 0.300), _setting_cell("neuba", 1, 0.600, 0.950),
    ]  # fmt: skip
    tuning = seed0 + seed1
    # both attacks' POR CACC averaged over the seeds: 0.6825 against 0.705 undefended, outside the floor
    assert defense.pick_lora_variant(tuning, defense.pick_lambdas(tuning)) == scan
    assert defense.pick_lambdas(tuning) == (3e-4, 3e-3)  # (0, 3e-3) ran on seed 0 only
    ranked = defense._ranked([c for c in tuning if c["defended"] is False or c["variant"] == "scan-consistency"])
    assert ranked[0][2] == (scan[0], *scan[1]) and ranked[0][0] == pytest.approx(
        ((0.083 + 0.120) / 2 + (0.210 + 0.150) / 2) / 2
    )
    # every finalist at chance on seed 1: no setting qualifies over both seeds, and seed 0's choice stands
    bad = [c if not c["defended"] else {**c, "cacc": 0.5, "near_chance": True} for c in seed1]
    assert defense.pick_lora_variant(seed0 + bad, defense.pick_lambdas(seed0 + bad)) == both
    # every finalist 5 points down on seed 1: none keeps the floor over both seeds, and of those that cut the ASR by
    # 85% the one that misses it least wins (scan: -2.25 points at worst, against -4.75 with the attention term)
    costly = [c if not c["defended"] else {**c, "cacc": c["cacc"] - 0.05} for c in seed1]
    assert defense.pick_lora_variant(seed0 + costly, defense.pick_lambdas(seed0 + costly)) == scan
    # NeuBA at chance undefended on seed 1: that seed counts on POR only. Then scan cuts the ASR by 84% only (NeuBA,
    # seed 0: 0.210), and the attention term on top, 91% at 2.25 points below on POR, wins: defense first
    chance = [{**c, "near_chance": True} if c["encoder"] == "neuba" and not c["defended"] else c for c in seed1]
    assert defense.pick_lora_variant(seed0 + chance, defense.pick_lambdas(seed0 + chance)) == both
    neuba_weaker = [{**c, "asr": 0.3} if c["encoder"] == "neuba" and c["lambda_attn"] == 3e-3 else c for c in seed0]
    assert defense.pick_lora_variant(neuba_weaker + chance, (3e-4, 3e-3)) == scan  # none defends: the floor first


def test_the_setting_that_defends_runs_on_every_validation_stage():
    """The setting the defense-first rule would choose (cuts the ASR by `REDUCTION_TARGET`, misses the CACC floor
    least) joins the finalists on the second seed and on adapters even when the floor-first ranking leaves it out."""
    defense = _defense_module()
    relative = ("scan-relative", (0.0, 0.0))
    seed0 = [
        _setting_cell("por", 0, 0.72, 0.92, defended=False), _setting_cell("neuba", 0, 0.62, 1.0, defended=False),
        _setting_cell("por", 0, 0.72, 0.18), _setting_cell("neuba", 0, 0.63, 1.0),  # keeps the floor, no defense
        _setting_cell("por", 0, 0.72, 0.09, *relative), _setting_cell("neuba", 0, 0.59, 0.10, *relative),  # -3 pts
    ]  # fmt: skip

    paths = {"por": Path("p"), "neuba": Path("n")}
    for confirm, peft, seeds in ((defense.confirm_finalists, "lora", {1}),
                                 (defense.confirm_on_adapters, "adapter", {0, 1})):  # fmt: skip
        journal = _Recorder()
        confirm(journal, paths, defense.Sizes(finalists=1, adapter_finalists=1), seed0)
        ran = {(s["peft"], s["seed"], s.get("variant", "reference"), *s["lambdas"]) for s in journal.specs
               if s["defended"]}  # fmt: skip
        assert ran == {(peft, seed, *setting) for seed in seeds
                       for setting in [("reference", 3e-4, 3e-3), (relative[0], *relative[1])]}  # fmt: skip
    assert defense.pick_lora_variant(seed0, (3e-4, 3e-3)) == relative


def test_the_lora_recipe_must_also_keep_the_floor_on_adapters():
    """The LoRA / adapter recipe serves both PEFT types: the best LoRA settings over the seeds also run as adapter
    fine-tunes (every validation seed and encoder, with undefended runs), and a setting that collapses an adapter
    loses to one that keeps the floor on every (attack, PEFT) pair. Without adapter runs LoRA decides alone."""
    defense = _defense_module()
    scan, both = ("scan-consistency", (0.0, 0.0)), ("scan-consistency", (0.0, 3e-3))

    def cells(peft, seed, base, runs):
        out = []
        for encoder, (cacc, asr) in base.items():
            out.append({**_setting_cell(encoder, seed, cacc, asr, defended=False), "peft": peft})
        for (variant, lam), by_encoder in runs.items():
            out += [{**_setting_cell(e, seed, c, a, variant, lam), "peft": peft} for e, (c, a) in by_encoder.items()]
        return out

    base = {"por": (0.71, 0.92), "neuba": (0.60, 1.0)}
    lora = [cell for seed in (0, 1) for cell in cells("lora", seed, base, {
        both: {"por": (0.71, 0.09), "neuba": (0.61, 0.10)},
        scan: {"por": (0.72, 0.12), "neuba": (0.60, 0.20)},
        ("reference", (3e-4, 3e-3)): {"por": (0.72, 0.18), "neuba": (0.62, 1.0)},
    })]  # fmt: skip
    lambdas = defense.pick_lambdas(lora)
    assert defense.pick_lora_variant(lora, lambdas) == both

    journal = _Recorder()
    defense.confirm_on_adapters(journal, {"por": Path("p"), "neuba": Path("n")}, defense.Sizes(), lora)
    assert {(s["peft"], s["encoder"], s["seed"], s["defended"], s.get("variant", "reference"), *s["lambdas"])
            for s in journal.specs} == {
        ("adapter", e, seed, *run) for e in ("por", "neuba") for seed in (0, 1)
        for run in [(False, "reference", 0.0, 0.0), (True, both[0], *both[1]), (True, scan[0], *scan[1])]
    }  # fmt: skip
    adapter = [cell for seed in (0, 1) for cell in cells("adapter", seed, {"por": (0.70, 1.0), "neuba": (0.65, 1.0)}, {
        both: {"por": (0.67, 0.14), "neuba": (0.51, 0.03)},  # NeuBA + adapter collapses: CACC -14 points
        scan: {"por": (0.69, 0.10), "neuba": (0.64, 0.07)},
    })]  # fmt: skip
    assert defense.pick_lora_variant(lora + adapter, lambdas) == scan
    assert defense.pick_lambdas(lora + adapter) == lambdas  # the reference coefficients stay LoRA's
    assert defense.lora_adapter_choice(lora + adapter)[1] == (
        "cut validation ASR by 85% and kept the CACC floor on every attack and PEFT pair"
    )
    # no setting keeps the floor on adapters: the one that kept it on LoRA and misses it least there
    costly = [{**c, "cacc": c["cacc"] - 0.05} if c["defended"] and c["variant"] == "scan-consistency" and
              c["lambda_attn"] == 0 and c["encoder"] == "neuba" else c for c in adapter]  # fmt: skip
    costly = [{**c, "near_chance": True} if c["defended"] and c["lambda_attn"] > 0 and c["seed"] == 1 and
              c["encoder"] == "neuba" else c for c in costly]  # fmt: skip
    setting, rule = defense.lora_adapter_choice(lora + costly)
    assert setting == (scan[0], *scan[1]) and "missed it least on adapters" in rule
    # an adapter stage where every setting collapses an adapter leaves the LoRA choice
    broken = [c if not c["defended"] else {**c, "cacc": 0.5, "near_chance": True} for c in adapter]
    assert defense.pick_lora_variant(lora + broken, lambdas) == both
    assert defense.lora_adapter_choice(lora + broken)[1] == "LoRA alone"


def test_length_bucketed_batches_have_similar_lengths_in_random_order():
    """Training batches of similar lengths (less padding), the batches in a seeded random order, every example
    once."""
    import random

    defense = _defense_module()
    rng = random.Random(0)
    lengths = [rng.randint(3, 64) for _ in range(200)]
    examples = [{"i": i} for i in range(200)]
    order = defense.length_bucketed(examples, lengths, batch=16, group=4, seed=1)
    assert sorted(e["i"] for e in order) == list(range(200))
    assert order == defense.length_bucketed(examples, lengths, batch=16, group=4, seed=1)
    assert order != defense.length_bucketed(examples, lengths, batch=16, group=4, seed=2)
    batches = [[lengths[e["i"]] for e in order[k : k + 16]] for k in range(0, 200, 16)]
    padded = sum(16 * max(b) for b in batches)
    shuffled = list(range(200))
    random.Random(1).shuffle(shuffled)
    padded_random = sum(16 * max(lengths[i] for i in shuffled[k : k + 16]) for k in range(0, 200, 16))
    assert padded < 0.85 * padded_random
    firsts = [max(b) for b in batches]
    assert firsts != sorted(firsts) and firsts != sorted(firsts, reverse=True)  # not a longest-first curriculum


def test_a_journal_of_another_sampler_is_not_resumed(tmp_path):
    """Cells of random batches must not pair with bucketed ones: --resume refuses a journal of another sampler;
    --summarise-only states the journal's own."""
    journal = tmp_path / "cells.jsonl"
    journal.write_text(json.dumps(_cell("lora", False, 0.7, 0.9)) + "\n")  # an old cell: no "sampling" (random)
    command = ("--journal", str(journal), "--out", str(tmp_path / "defense"))
    result = _run_defense(tmp_path, *command, "--resume")
    assert result.returncode == 2 and 'sampling "random" (this run: "bucketed"; --sampling)' in result.stderr
    result = _run_defense(tmp_path, *command, "--summarise-only")
    assert result.returncode == 2 and "no defended LoRA cells of the validation split" in result.stderr
    result = _run_defense(tmp_path, *command, "--summarise-only", "--lambdas", "0", "0.003")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "(random sampling)" in (tmp_path / "defense.md").read_text()


def test_a_journal_of_other_fine_tuning_settings_is_not_resumed_or_tabulated_together(tmp_path):
    """Each cell records its fine-tuning settings (`finetune_of`), which its journal key leaves out: --resume refuses
    a journal of another learning rate (naming the flag), --summarise-only states the journal's own, and the tables
    leave out cells of other settings."""
    defense = _defense_module()
    sizes, faster = defense.Sizes(), defense.Sizes(learning_rates=dict.fromkeys(defense.PEFTS, 2e-3))
    cell = {**_cell("lora", False, 0.7, 0.9), "sampling": "bucketed", "protocol": 2,
            "finetune": defense.finetune_of(faster)}  # fmt: skip
    own = {**cell, "finetune": defense.finetune_of(sizes)}
    assert defense.recipe_conflicts([own], sizes) == []
    assert defense.recipe_conflicts([cell], sizes) == [
        'learning_rates {"adapter": 0.002, "lora": 0.002, "prefix": 0.002} '
        '(this run: {"adapter": 0.001, "lora": 0.001, "prefix": 0.001}; --lr)'
    ]
    assert defense.current_cells([cell, own], sizes) == [own]
    assert defense.journal_finetune([cell]) == defense.finetune_of(faster)
    assert defense.journal_finetune([cell, own]) is None
    journal = tmp_path / "cells.jsonl"
    journal.write_text(json.dumps(cell) + "\n")
    command = ("--journal", str(journal), "--out", str(tmp_path / "defense"))
    result = _run_defense(tmp_path, *command, "--resume")
    assert result.returncode == 2 and "learning_rates" in result.stderr and "--lr)" in result.stderr
    result = _run_defense(tmp_path, *command, "--summarise-only", "--lambdas", "0", "0.003")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "lr lora 0.002, prefix 0.002, adapter 0.002" in (tmp_path / "defense.md").read_text()


def test_a_cell_fine_tunes_at_its_sizes_learning_rate(monkeypatch):
    """The learning rate travels in `Sizes` (with the cell's arguments to a spawned worker, which imports the module
    afresh): `--lr` as a module global reached the parent process only, and every worker fine-tuned at 1e-3."""
    import hf_obliviate.trainer as trainer

    defense = _defense_module()
    seen = {}

    class Stop(Exception):
        pass

    def fine_tune(model, tokenizer, train, args, **kwargs):
        seen["lr"] = args.learning_rate
        raise Stop

    monkeypatch.setattr(trainer, "fine_tune", fine_tune)
    sizes = defense.Sizes(train=16, learning_rates={**defense.LEARNING_RATES, "lora": 7e-4})
    with pytest.raises(Stop):
        defense.run_cell("clean", None, "lora", 0, False, (0.0, 0.0), sizes)
    assert seen == {"lr": 7e-4}
    assert pickle.loads(pickle.dumps(sizes)).learning_rates["lora"] == 7e-4


def test_the_committed_journal_records_the_default_fine_tuning_settings():
    """Every cell of the committed journal records the fine-tuning settings of the default sizes, which the committed
    tables state."""
    defense = _defense_module()
    cells = [json.loads(line) for line in (ROOT / "benchmarks" / "results" / "defense_cells.jsonl").open()]
    assert cells and all(c["finetune"] == defense.finetune_of(defense.Sizes()) for c in cells)


def test_summarise_only_replays_the_validation_stage_of_the_journal(tmp_path):
    """`--summarise-only` replays the run's validation stage from the journal, so it shows the choices and validation
    cells of the committed tables, not every validation cell the journal has gathered over earlier runs."""
    committed = json.loads((ROOT / "benchmarks" / "results" / "defense.json").read_text())
    journal = tmp_path / "cells.jsonl"
    journal.write_text((ROOT / "benchmarks" / "results" / "defense_cells.jsonl").read_text())
    gathered = [json.loads(line) for line in journal.read_text().splitlines()]
    assert len([c for c in gathered if c["split"] == "validation"]) > len(committed["tuning"])  # 49 against 43
    result = _run_defense(tmp_path, "--summarise-only", "--journal", str(journal), "--out", str(tmp_path / "defense"))
    assert result.returncode == 0, result.stderr[-2000:]
    replayed = json.loads((tmp_path / "defense.json").read_text())
    assert {k: v for k, v in replayed.items() if k != "meta"} == {k: v for k, v in committed.items() if k != "meta"}
    assert "cannot be replayed" not in result.stdout


def test_classifier_defaults_are_the_recipe_the_committed_benchmark_chose():
    """`ObliviateTrainingArguments`' defense defaults (`CLASSIFIER_DEFAULTS`) are the LoRA / adapter recipe that the
    committed `benchmarks/results/defense.json` chose on its validation split, at its coefficients."""
    from hf_obliviate import ObliviateConfig, ObliviateTrainingArguments

    defense = _defense_module()
    summary = json.loads((ROOT / "benchmarks" / "results" / "defense.json").read_text())["summary"]
    amp, attn = summary["lora_variant_lambdas"]
    chosen = {**defense.RECIPE_BASE, **defense.VARIANTS[summary["lora_variant"]], "lambda_amp": amp,
              "lambda_attn": attn}  # fmt: skip
    args = ObliviateTrainingArguments(output_dir="unused", report_to="none")
    assert args.obliviate_config() == ObliviateConfig(**chosen)
    # ObliviateConfig (the core, the SFT trainer): METHOD.md's terms at the coefficients chosen for the reference
    reference = summary["chosen_lambdas"]
    assert ObliviateConfig().lambda_consistency == 0
    assert (ObliviateConfig().lambda_amp, ObliviateConfig().lambda_attn) == (reference["lambda_amp"],
                                                                             reference["lambda_attn"])  # fmt: skip


def test_given_coefficients_and_variant_rebuild_the_committed_test_rows(tmp_path):
    """`--lambdas` with `--variant` names the choice the validation split would make (for runs that skip it, e.g. at
    other sizes on a GPU): on the committed journal it gives the committed test rows and mean."""
    committed = json.loads((ROOT / "benchmarks" / "results" / "defense.json").read_text())
    journal = tmp_path / "cells.jsonl"
    journal.write_text((ROOT / "benchmarks" / "results" / "defense_cells.jsonl").read_text())
    summary = committed["summary"]
    amp, attn = summary["lora_variant_lambdas"]
    reference = summary["chosen_lambdas"]
    result = _run_defense(
        tmp_path, "--summarise-only", "--journal", str(journal), "--out", str(tmp_path / "defense"),
        "--lambdas", str(reference["lambda_amp"]), str(reference["lambda_attn"]),
        "--variant", summary["lora_variant"], str(amp), str(attn),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    given = json.loads((tmp_path / "defense.json").read_text())
    for key in ("cells", "control", "mean_asr_reduction"):
        assert given[key] == committed[key], key
    assert given["summary"]["lora_variant"] == summary["lora_variant"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--variant", "scan-relative"], "--variant needs --lambdas"),
        (["--lambdas", "3e-4", "3e-3", "--variant", "nope"], "choose one of"),
        (["--lambdas", "3e-4", "3e-3", "--variant", "scan-relative", "0"], "optionally λ_amp λ_attn"),
        (["--lambdas", "3e-4", "3e-3", "--variant", "scan-relative", "0", "x"], "must be numbers"),
    ],
)
def test_a_bad_variant_is_a_usage_error_before_any_work(argv, message, tmp_path):
    result = _run_defense(tmp_path, "--out", str(tmp_path / "defense"), *argv, timeout=120)
    assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]
    assert not list(tmp_path.glob("defense*"))


def test_the_default_journal_is_guarded_against_every_size_a_cell_records():
    """A run of other sizes must not start the committed journal afresh: every recorded fine-tuning setting that a
    flag can change, and the planting steps, name their flag (before: a list of its own, without --plant-steps)."""
    defense = _defense_module()
    flagged = set(defense.SIZE_FLAGS) - {"plant_steps"}
    settable = {"train", "epochs", "learning_rates", "batch", "sampling", "eval_n", "cacc_n"}
    assert flagged == settable and flagged <= set(defense.FINETUNE_FIELDS)
    assert defense.changed_flags(defense.Sizes()) == []
    sizes = defense.Sizes(train=3200, plant_steps=640, eval_n=1000)
    sizes.learning_rates = dict.fromkeys(sizes.learning_rates, 2e-3)
    assert defense.changed_flags(sizes) == ["--train", "--lr", "--eval-n", "--plant-steps"]
    assert defense.changed_flags(defense.Sizes(cacc_n=None)) == ["--cacc-n"]


def test_a_run_of_other_sizes_on_the_default_journal_is_a_usage_error(tmp_path, monkeypatch, capsys):
    defense = _defense_module()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(defense, "ROOT", tmp_path)  # the default --out, so a missed guard writes nothing of the repo's
    monkeypatch.setenv("HF_OBLIVIATE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(sys, "argv", ["defense.py", "--plant-steps", "640", "--encoders", "por"])
    with pytest.raises(SystemExit) as exit_info:
        defense.main()
    assert exit_info.value.code == 2
    assert "--plant-steps change the cells: give them their own --journal" in capsys.readouterr().err
    assert not (tmp_path / "results").exists()


def test_summarise_only_rebuilds_the_committed_gpu_table(tmp_path):
    """The GPU run's journal (`defense_gpu_cells.jsonl`, made on an H100 with given coefficients) rebuilds the
    committed `defense_gpu.json`, and its tables name the device the cells ran on and say that nothing was chosen."""
    results = ROOT / "benchmarks" / "results"
    committed = json.loads((results / "defense_gpu.json").read_text())
    command = committed["meta"]["command"].split()[2:]  # after "python benchmarks/defense.py"
    out = command.index("--out")
    command[out + 1] = str(tmp_path / "defense_gpu")
    result = _run_defense(tmp_path, *command, cwd=ROOT)  # the command's paths are the repo's
    assert result.returncode == 0, result.stderr[-2000:]
    rebuilt = json.loads((tmp_path / "defense_gpu.json").read_text())
    assert {k: v for k, v in rebuilt.items() if k != "meta"} == {k: v for k, v in committed.items() if k != "meta"}
    md = (tmp_path / "defense_gpu.md").read_text()
    assert "Device: NVIDIA H100 80GB HBM3" in md and "No validation stage" in md
    assert "given (--lambdas / --variant)" in md and "chosen on the validation split" not in md
    assert rebuilt["summary"]["lora_variant_rule"] == "given (--lambdas / --variant)"


def test_tables_name_the_device_the_cells_recorded():
    defense = _defense_module()
    assert defense.cells_device([{}, {"device": None}], "CPU (2 cores)") == "CPU (2 cores)"
    assert defense.cells_device([{"device": "GPU A"}, {"device": "GPU A"}], "CPU (2 cores)") == "GPU A"
    assert defense.cells_device([{"device": "GPU A"}, {}], "CPU (2 cores)") == (
        "GPU A (and cells with no device recorded, taken as CPU (2 cores))"
    )
