"""Recipes: every shipped recipe parses; bad input is an exit-2 error naming file and key, no traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from rocm_ray.cli import main
from rocm_ray.config import RecipeError, describe, load_recipe

RECIPES = sorted(Path("recipes").glob("*.yaml"))
TRAIN_RECIPES = [p for p in RECIPES if not p.name.startswith("eval_")]


@pytest.mark.parametrize("path", TRAIN_RECIPES, ids=lambda p: p.name)
def test_shipped_recipes_parse(path):
    r = load_recipe(path)
    assert r.reward.models and (r.data.prompts or r.data.prompts_file)


def test_overrides_apply_with_types():
    r = load_recipe("recipes/tiny_debug.yaml", ["algorithm.beta=0.5", "algorithm.regularizer=js",
                                               "reward.models.0.weight=2", "train.adam_betas=[0.8, 0.9]"])
    assert r.algorithm.beta == 0.5 and isinstance(r.algorithm.beta, float)
    assert r.algorithm.regularizer == "js"
    assert r.reward.models[0].weight == 2.0
    assert r.train.adam_betas == [0.8, 0.9]


@pytest.mark.parametrize("override,key,words", [
    ("algorithm.betta=0.1", "algorithm.betta", "unknown key"),
    ("algorithm.beta=abc", "algorithm.beta", "expected a number"),
    ("algorithm.beta=-1", "algorithm.beta", "must be >= 0"),
    ("algorithm.regularizer=kll", "algorithm.regularizer", "one of 'kl'"),
    ("train.steps=1.5", "train.steps", "expected an integer"),
    ("train.steps=0", "train.steps", "must be >= 1"),
    ("model.lora_rank=true", "model.lora_rank", "expected an integer"),
    ("reward.models.3.weight=1", "reward.models.3", "out of range"),
    ("reward.models.0.name=hps", "reward.models.0.name", "unknown reward"),
    ("algorithm.truncate_steps=9", "algorithm.truncate_steps", "num_inference_steps"),
    ("data.prompts_file=nope.txt", "data.prompts_file", "not found"),
    ("train.zero_stage=2", "train.zero_stage", "num_workers"),
    ("reward.models.0.head_path=x.pth", "reward.models.0.head_path", "takes no head_path"),
    ("nonsense", "nonsense", "key.path=value"),
])
def test_bad_overrides_name_file_and_key(override, key, words):
    with pytest.raises(RecipeError) as e:
        load_recipe("recipes/tiny_debug.yaml", [override])
    msg = str(e.value)
    assert msg.startswith("recipes/tiny_debug.yaml: " + key) or (key in msg and "tiny_debug.yaml" in msg)
    assert words in msg


def test_unknown_section_in_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("name: x\nmodle: {}\n")
    with pytest.raises(RecipeError, match=r"bad.yaml: modle: unknown key; allowed keys here: name, model"):
        load_recipe(p)


def test_invalid_yaml_and_missing_file(tmp_path):
    p = tmp_path / "broken.yaml"
    p.write_text("model: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(p)
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")


@pytest.mark.parametrize("argv,needle", [
    (["train", "recipes/does_not_exist.yaml"], "recipe file not found"),
    (["train", "recipes/tiny_debug.yaml", "algorithm.beta=-3"], "algorithm.beta: must be >= 0"),
    (["check", "recipes/tiny_debug.yaml", "train.bogus=1"], "train.bogus: unknown key"),
    (["train", "recipes/tiny_debug.yaml", "model.pretrained=/nonexistent/lcm"], "model.pretrained: no such folder"),
])
def test_cli_bad_input_exits_2_without_traceback(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and needle in err
    assert "Traceback" not in err


def test_keys_lists_every_section(capsys):
    assert main(["keys"]) == 0
    out = capsys.readouterr().out
    for key in ("model.lora_rank", "algorithm.regularizer", "train.zero_stage", "ray.reward_resources"):
        assert key in out
    assert len(describe()) > 40
