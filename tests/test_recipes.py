"""Methods as recipes of stages: the registry, recipe files (validated like the command line), the
overrides each stage owns, and that a recipe file computes exactly what its registered twin does."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_llama

from duquant.methods import RECIPES, Recipe, RecipeError, get_method, load_recipe, recipe_from_dict
from duquant.models import adapter_for
from duquant.pipeline import QuantConfig, quantize_model
from duquant.stages import (
    GPTQ,
    STAGES,
    GreedyRotation,
    Hadamard,
    NormTweak,
    Smooth,
    StageError,
    stage_from_dict,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_registered_recipe_round_trips_through_its_file_form(name):
    """A registered recipe written as a dict (its YAML form) reads back as the same recipe."""
    recipe = RECIPES[name]
    if not recipe.quantize:
        return  # fp has no file form: it is the absence of quantization
    data = {k: v for k, v in recipe.to_dict().items() if k in ("name", "fold", "stages")}
    assert recipe_from_dict(data, "x.yaml") == recipe


@pytest.mark.parametrize("kind", sorted(STAGES))
def test_every_stage_kind_is_registered_under_its_own_name(kind):
    """STAGES maps each kind to the class whose KIND it is; defaults are valid options."""
    cls = STAGES[kind]
    assert cls.KIND == kind
    stage = cls()
    assert stage_from_dict(stage.to_dict(), "x") == stage


def test_overrides_reach_the_stage_that_owns_them():
    """--alpha goes to smoothing, --block-size to the rotation, --norm-epochs adds or removes
    norm tweaking; an override no stage owns leaves the recipe as it was."""
    r = get_method("duquant++", alpha=0.3, block_size=16, max_steps=5)
    assert r.get(Smooth).alpha == 0.3
    assert (r.get(GreedyRotation).block_size, r.get(GreedyRotation).max_steps) == (16, 5)
    assert get_method("rtn", alpha=0.3) == RECIPES["rtn"]
    assert get_method("rtn", norm_epochs=3).get(NormTweak) == NormTweak(epochs=3)
    assert get_method("duquant++nt", norm_epochs=0).get(NormTweak) is None
    assert get_method("duquant++nt", norm_lr=0.5).get(NormTweak).lr == 0.5


def test_stage_options_are_validated():
    """Out-of-range options are one-line StageErrors naming the option."""
    with pytest.raises(StageError, match="power of two"):
        Hadamard(block_size=24)
    with pytest.raises(StageError, match="alpha"):
        Smooth(alpha=1.5)
    with pytest.raises(StageError, match="objective"):
        GreedyRotation(objective="best")
    with pytest.raises(StageError, match="target_damp"):
        GPTQ(target_damp=-1)
    with pytest.raises(StageError, match="epochs"):
        NormTweak(epochs=-1)


@pytest.mark.parametrize(
    "data, needle",
    [
        ([], "a recipe is a mapping"),
        ({"stages": [], "colour": 1}, "unknown key colour"),
        ({"name": "x"}, "'stages' must be a list"),
        ({"stages": [{"alpha": 0.5}]}, "'stage' key"),
        ({"stages": [{"stage": "magic"}]}, "unknown stage 'magic'"),
        ({"stages": [{"stage": "smooth", "beta": 1}]}, "no option beta"),
        ({"stages": [{"stage": "smooth", "alpha": "high"}]}, "alpha"),
        ({"stages": [{"stage": "hadamard", "block_size": 3}]}, "power of two"),
        ({"stages": [], "fold": "yes"}, "fold"),
    ],
)
def test_malformed_recipes_are_one_line_errors(data, needle):
    """Every fault names the file (and stage) and what to fix."""
    with pytest.raises(RecipeError, match=needle) as info:
        recipe_from_dict(data, "my.yaml")
    assert str(info.value).startswith("my.yaml") and "\n" not in str(info.value)


def test_recipe_files_in_the_repository_load():
    """The shipped example recipes are valid; recipes/best.yaml is `--method best`."""
    best = load_recipe(ROOT / "recipes" / "best.yaml")
    assert best.stages == RECIPES["best"].stages and best.name == "best"
    other = load_recipe(ROOT / "recipes" / "smooth-hadamard-gptq.yaml")
    assert other.gptq == GPTQ(scale_search="hessian")


def test_unreadable_or_invalid_yaml_is_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages: [smooth\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)
    with pytest.raises(RecipeError, match="cannot read"):
        load_recipe(tmp_path / "missing.yaml")


def test_a_recipe_file_computes_what_the_registered_method_does(tmp_path):
    """recipes/best.yaml through the pipeline equals --method best bit for bit (tiny model)."""
    base = make_tiny_llama(2)
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(3))
    outs = []
    for recipe in (get_method("best"), load_recipe(ROOT / "recipes" / "best.yaml")):
        m = copy.deepcopy(base)
        torch.manual_seed(0)
        quantize_model(m, adapter_for(m), recipe, QuantConfig(), ids, seed=0)
        with torch.no_grad():
            outs.append(m(ids).logits)
    assert torch.equal(outs[0], outs[1])


def test_a_recipe_built_in_python_is_a_method():
    """Stages compose in Python too: a Recipe is all a method is."""
    r = Recipe("mine", (Smooth(alpha=0.4), Hadamard(random=True)))
    assert r.needs_calibration and r.whole_model_step is None and r.gptq is None
    assert RECIPES["quarot"].whole_model_step and not RECIPES["duquant++e2e"].whole_model_step
    assert RECIPES["best"].whole_model_step is None  # norm tweaking goes block by block


def test_a_recipe_gptq_stage_fixes_its_options(tmp_path):
    """Every option a recipe's GPTQ stage sets is used; the command line may not contradict it."""
    from duquant import api
    from duquant.config import ConfigError, RunConfig

    f = tmp_path / "r.yaml"
    f.write_text("stages:\n  - stage: gptq\n    hessian: fp\n    target_damp: 2.0\n")
    plan = api.check(RunConfig(recipe=str(f)))
    assert plan.quant.weights == "gptq"
    assert (plan.quant.gptq.hessian, plan.quant.gptq.target_damp) == ("fp", 2.0)
    with pytest.raises(ConfigError, match="--gptq-target-damp 3.0: method r uses 2.0"):
        api.check(RunConfig(recipe=str(f), gptq_target_damp=3.0))
    with pytest.raises(ConfigError, match="--weights rtn"):
        api.check(RunConfig(recipe=str(f), weights="rtn"))


def test_bad_recipe_file_on_the_command_line_is_one_line(tmp_path, capsys):
    """`duquant run --recipe FILE` with a fault: exit 2, one line naming the file, no traceback."""
    from duquant.cli import main

    f = tmp_path / "bad.yaml"
    f.write_text("stages:\n  - stage: smooth\n    alpha: 7\n")
    assert main(["run", "--recipe", str(f), "--output", str(tmp_path / "o.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(f) in err and "alpha" in err and "Traceback" not in err
    assert not (tmp_path / "o.json").exists()


def test_end_to_end_after_quarot_is_refused_before_the_model_changes():
    """EndToEnd plans with a pass of the recipe less itself over the model as it is: after
    QuaRot's in-place rotation that pass would rotate the model twice, so the pair is refused
    before any stage runs and the model is untouched."""
    from duquant.stages import EndToEnd, QuaRot

    model = make_tiny_llama(3)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    before = copy.deepcopy(model.state_dict())
    recipe = Recipe("quarot+e2e", (QuaRot(), EndToEnd(epochs=1)))
    mx = QuantConfig()
    with pytest.raises(ValueError, match="end-to-end training after QuaRot"):
        quantize_model(model, adapter_for(model), recipe, mx, ids)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
