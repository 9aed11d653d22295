"""One validated config per concept: defaults are the reference's and defined once, bounds and rules
refuse bad values with one line in the Python API, the bundled recipes, the engine and the ComfyUI nodes."""
from __future__ import annotations

import json
from dataclasses import fields

import pytest

from solrl_core.bundled import Recipe, training_graph
from solrl_core.ops.registry import all_ops
from solrl_core.run import main
from solrl_core.runtime.settings import SettingError
from solrl_core.train.settings import (
    ExploreSettings,
    RegenerateSettings,
    SelectSettings,
    SessionConfig,
    UpdateSettings,
)


def test_defaults_are_the_references():
    # algorithm.md section 1 (P, N, K, D, F) and section 3 (LoRA, AdamW, clip, NFT beta, KL).
    e, k, f = ExploreSettings(), SelectSettings(), RegenerateSettings()
    assert (e.prompts_per_iteration, e.candidates, k.keep, e.steps, f.steps) == (48, 96, 24, 6, 10)
    assert k.mode == "best_worst"
    run = SessionConfig()
    assert (run.lora_rank, run.lora_alpha) == (32, 64.0)
    u = UpdateSettings()
    assert u.optimizer() == {"lr": 3e-4, "weight_decay": 1e-4, "betas": [0.9, 0.999], "eps": 1e-8}
    assert (u.beta, u.kl_coef, u.grad_clip, u.train_fraction) == (1.0, 1e-4, 1.0, 0.6)


def test_node_inputs_and_recipe_take_their_defaults_and_bounds_from_the_settings():
    checked = 0
    for spec in all_ops().values():
        if spec.settings is None:
            continue
        declared = {f.name: f for f in fields(spec.settings)}
        for inp in spec.inputs:
            if inp.name in declared:
                assert inp.default == declared[inp.name].default, (spec.id, inp.name)
                bounds = declared[inp.name].metadata["solrl_setting"]
                assert (inp.min, inp.max, inp.choices) == (bounds.min, bounds.max, bounds.choices), (spec.id, inp.name)
                checked += 1
    assert checked >= 25  # every settings-backed widget of Training Run, Requantize, the stages, NFT Update
    # A default recipe builds the nodes with the settings' own defaults.
    graph = training_graph(Recipe())
    update = next(e["inputs"] for e in graph.values() if e["class_type"] == "SolRLNFTUpdate")
    assert {k: update[k] for k in ("lr", "beta", "kl_coef", "micro_batch")} == \
        {"lr": 3e-4, "beta": 1.0, "kl_coef": 1e-4, "micro_batch": 8}


@pytest.mark.parametrize("build, message", [
    (lambda: UpdateSettings(beta=0), "UpdateSettings.beta: 0 is below the minimum 0.001"),
    (lambda: UpdateSettings(lr=-1e-3), "UpdateSettings.lr: -0.001 is below the minimum 0"),
    (lambda: UpdateSettings(micro_batch=2.5), "UpdateSettings.micro_batch: expected an integer, got 2.5"),
    (lambda: SessionConfig(full_finetune="yes"), "SessionConfig.full_finetune: expected true or false, got 'yes'"),
    (lambda: SelectSettings(keep=3), "SelectSettings.keep: best_worst keeps K/2 best and K/2 worst, so K must be even"),
    (lambda: ExploreSettings(precision="fp8"), "ExploreSettings.precision: 'fp8' is not one of ['low', 'full']"),
    (lambda: Recipe(beta=0.0), "UpdateSettings.beta: 0 is below the minimum 0.001"),
    (lambda: Recipe(candidates=6, keep=8), "SelectSettings.keep: cannot keep K=8 of a pool of N=6"),
])
def test_bad_settings_are_refused_with_one_line_naming_the_field(build, message):
    with pytest.raises(SettingError) as err:
        build()
    assert str(err.value).startswith(message) and "\n" not in str(err.value), str(err.value)


def test_engine_refuses_beta_zero_before_compute(tmp_path, capsys):
    # Small, so that a build that let beta = 0 through would fail fast rather than train for long.
    graph = training_graph(Recipe(iterations=1, prompts_per_iteration=1, candidates=2, keep=2, draft_steps=1,
                                  full_steps=1, lora_rank=1, micro_batch=2))
    (node,) = [nid for nid, e in graph.items() if e["class_type"] == "SolRLNFTUpdate"]
    wf = tmp_path / "wf.json"
    wf.write_text(json.dumps(graph))
    run_dir = tmp_path / "run"
    assert main([str(wf), "--run-dir", str(run_dir), "--set", f"{node}.beta=0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("(SolRLNFTUpdate): input 'beta': 0 is below the minimum 0.001"), err
    assert len(err.splitlines()) == 1 and not run_dir.exists()
