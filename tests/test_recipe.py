"""Recipes: validation that names the field, YAML round trip with line numbers, overrides, structural refusal."""

import pytest

import fermigates as fg
from fermigates.recipe import Recipe, RecipeError, is_structural, list_recipes, load_recipe

GOOD = """\
description: test
convert:
  granularity: channel
  target_sparsity: 0.5
train:
  steps: 3
"""


def test_every_bundled_recipe_loads_and_round_trips():
    names = list_recipes()
    assert {"timm_cnn", "timm_vit", "bert_encoder", "llama_decoder"} <= set(names)
    for name in names:
        recipe = load_recipe(name)
        assert recipe.description, name
        again = Recipe.from_yaml(recipe.to_yaml())
        assert again == recipe, name


def test_overrides_replace_dotted_keys_as_yaml_values():
    r = load_recipe("timm_cnn", overrides=["train.steps=7", "model.kwargs={num_classes: 10}",
                                            "anneal.temperature=[2.0, 0.1]"])
    assert r.train.steps == 7 and r.model.kwargs == {"num_classes": 10} and r.anneal.temperature == [2.0, 0.1]
    assert load_recipe(r, {"convert.target_sparsity": 0.25}).convert["target_sparsity"] == 0.25
    assert load_recipe("timm_cnn").train.steps == 300  # the bundled file is unchanged


@pytest.mark.parametrize("text, line, words", [
    ("description: ok\ntrain:\n  steps: 3\n    lr: 1\n", 4, ["malformed YAML", "column"]),
    ("description: x\nfoo: 1\n", 2, ["unknown key 'foo'", "allowed"]),
    ("train:\n  steps: 3\n  stepz: 4\n", 3, ["train.stepz", "steps"]),
    ("train:\n  steps: ten\n", 2, ["train.steps", "int >= 0", "'ten'"]),
    ("anneal:\n  schedule: fast\n", 2, ["anneal.schedule", "exponential"]),
    ("convert:\n  granularity: row\n", 2, ["convert.granularity", "channel"]),
    ("convert:\n  granularity: channel\n  target_sparsity: 2\n", 3, ["target_sparsity", "[0, 1)"]),
    ("export: [tflite]\n", 1, ["export", "onnx"]),
])
def test_bad_recipes_name_the_field_and_line(text, line, words):
    with pytest.raises(RecipeError) as info:
        Recipe.from_yaml(text, source="r.yaml")
    msg = str(info.value)
    assert msg.startswith("r.yaml") and (f"line {line}" in msg), msg
    for w in words:
        assert w in msg, msg


def test_bad_overrides_are_refused():
    with pytest.raises(RecipeError, match="key=value"):
        load_recipe("timm_cnn", ["train.steps"])
    with pytest.raises(RecipeError, match="train.nope"):
        load_recipe("timm_cnn", ["train.nope=1"])
    with pytest.raises(RecipeError, match="train.lr"):
        load_recipe("timm_cnn", ["train.lr=fast"])
    with pytest.raises(RecipeError, match="bundled"):
        load_recipe("no_such_recipe")


def test_one_shot_needs_structured_gates():
    with pytest.raises(RecipeError, match="train.steps"):
        Recipe.from_yaml("convert:\n  granularity: weight\ntrain:\n  steps: 0\n")


def test_structural_split():
    assert is_structural("convert.target_sparsity") and is_structural("convert.granularity")
    assert is_structural("shrink") and is_structural("model.source")
    assert not is_structural("convert.temperature") and not is_structural("train.lr")
    assert not is_structural("anneal.temperature") and not is_structural("calibration.ridge")


def test_a_checkpoint_recipe_refuses_structural_overrides(tmp_path):
    (tmp_path / "recipe.yaml").write_text(GOOD)
    r = load_recipe(tmp_path, ["train.steps=9", "calibration.ridge=0.1"])  # runtime: fine
    assert r.train.steps == 9 and r.applied_to == str(tmp_path)
    with pytest.raises(RecipeError, match="structural.*fixed the shapes"):
        load_recipe(tmp_path, ["convert.target_sparsity=0.7"])
    with pytest.raises(RecipeError, match="structural"):
        r.with_overrides({"shrink": False})
    assert load_recipe(tmp_path / "recipe.yaml", ["convert.target_sparsity=0.7"]).convert["target_sparsity"] == 0.7


def test_top_level_exports():
    assert fg.load_recipe is load_recipe and fg.Recipe is Recipe
    assert callable(fg.gates_open) and callable(fg.write_report)
    assert "gates_open" in fg.__all__ and "list_recipes" in fg.__all__
    for name in fg.__all__:
        assert getattr(fg, name) is not None, name


def test_one_shot_needs_calibration_samples():
    with pytest.raises(RecipeError, match="calibration.samples"):
        Recipe.from_yaml("convert:\n  granularity: channel\ntrain:\n  steps: 0\ncalibration:\n  samples: 0\n")


def test_empty_sections_take_their_defaults():
    assert Recipe.from_yaml("shrink:\nexport:\nmodel:\ntrain:\n", deep=False) == Recipe()


def test_anneal_init_and_early_bake_are_validated():
    r = Recipe.from_yaml("convert:\n  granularity: channel\ntrain:\n  steps: 8\nanneal:\n  init: obs\n"
                         "  bake_when_decided: true\n")
    assert r.anneal.init == "obs" and r.anneal.bake_when_decided is True
    with pytest.raises(RecipeError, match="anneal.init"):
        Recipe.from_yaml("train:\n  steps: 8\nanneal:\n  init: taylor\n")
    with pytest.raises(RecipeError, match="calibration.samples"):
        Recipe.from_yaml("convert:\n  granularity: channel\ntrain:\n  steps: 8\nanneal:\n  init: obs\n"
                         "calibration:\n  samples: 0\n")
    with pytest.raises(RecipeError, match="anneal.init"):
        Recipe.from_yaml("convert:\n  granularity: weight\ntrain:\n  steps: 8\nanneal:\n  init: obs\n")
    # the default start needs no calibration samples (it falls back to training batches) and suits any gates
    assert Recipe.from_yaml("train:\n  steps: 8\n").anneal.init == "auto"
    Recipe.from_yaml("convert:\n  granularity: weight\ntrain:\n  steps: 8\ncalibration:\n  samples: 0\n")


def test_calibration_mode_is_validated():
    r = Recipe.from_yaml("convert:\n  granularity: channel\ntrain:\n  steps: 0\ncalibration:\n  mode: one-pass\n")
    assert r.calibration.mode == "one-pass" and Recipe().calibration.mode == "sequential"
    with pytest.raises(RecipeError, match="calibration.mode"):
        Recipe.from_yaml("convert:\n  granularity: channel\ntrain:\n  steps: 0\ncalibration:\n  mode: twice\n")
    with pytest.raises(RecipeError, match="calibration.mode"):  # it fits from the one-shot selection pass
        Recipe.from_yaml("convert:\n  granularity: channel\ntrain:\n  steps: 8\ncalibration:\n  mode: one-pass\n")
    with pytest.raises(RecipeError, match="calibration.layers 'pruned'"):
        Recipe.from_yaml("convert:\n  granularity: channel\ntrain:\n  steps: 0\ncalibration:\n  mode: one-pass\n"
                         "  layers: all\n")


@pytest.mark.parametrize("text", ["1e-3", "1E-3", "1e3", "2.5e-4", "1.0e-3", "+3e+2"])
def test_exponent_floats_are_numbers_in_files_and_overrides(text):
    value = float(text)
    r = Recipe.from_yaml(f"train:\n  steps: 3\n  lr: {text}\n")
    assert isinstance(r.train.lr, float) and r.train.lr == value
    assert load_recipe("timm_cnn", [f"train.lr={text}"]).train.lr == value
    assert load_recipe("timm_cnn", [f"calibration.ridge={text}"]).calibration.ridge == value
    with pytest.raises(RecipeError, match="train.steps must be an int"):
        load_recipe("timm_cnn", ["train.steps=1e3"])  # 1e3 is a float: steps needs an int


@pytest.mark.parametrize("override, key", [
    ("calibration.ridge=.nan", "calibration.ridge"), ("calibration.ridge=.inf", "calibration.ridge"),
    ("calibration.ridge=-1", "calibration.ridge"), ("anneal.sparsity_weight=.inf", "anneal.sparsity_weight"),
    ("anneal.sparsity_weight=.nan", "anneal.sparsity_weight"), ("train.lr=.nan", "train.lr"),
    ("train.lr=0", "train.lr"), ("train.lr=-1e-3", "train.lr"), ("train.weight_decay=.inf", "train.weight_decay"),
    ("anneal.temperature=[.inf, 0.01]", "anneal.temperature"), ("anneal.ramp=.nan", "anneal.ramp"),
    ("convert.target_sparsity=.nan", "convert.target_sparsity"), ("eval.fraction=.nan", "eval.fraction"),
])
def test_non_finite_and_non_positive_values_are_refused_naming_the_key(override, key):
    with pytest.raises(RecipeError) as info:
        load_recipe("timm_cnn", [override])
    assert key in str(info.value) and info.value.key == key


def test_a_run_recipe_file_refuses_structural_changes_wherever_it_is_read_from(tmp_path):
    from fermigates.recipe import RECIPE_HEADER

    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.yaml").write_text(f"{RECIPE_HEADER}\n{GOOD}model:\n  source: timm:resnet18\n")
    (run / "fermigates.json").write_text("{}")
    for where in (run, run / "recipe.yaml"):
        with pytest.raises(RecipeError, match="convert.target_sparsity is a structural parameter"):
            load_recipe(where, ["convert.target_sparsity=0.3"])
        with pytest.raises(RecipeError, match="--model: model.source is a structural parameter"):
            load_recipe(where, {"model.source": "timm:resnet50"})
        same = load_recipe(where, {"model.source": "timm:resnet18", "convert.target_sparsity": 0.5,
                                   "train.steps": 4})  # the values it already has, and a runtime key
        assert same.train.steps == 4 and same.applied_to == str(run)
    # a copy elsewhere still carries its first line
    copy = tmp_path / "copy.yaml"
    copy.write_text((run / "recipe.yaml").read_text())
    with pytest.raises(RecipeError, match="structural"):
        load_recipe(copy, ["shrink=false"])
    # a recipe.yaml of the user's own, with no checkpoint beside it, takes any override
    own = tmp_path / "own"
    own.mkdir()
    (own / "recipe.yaml").write_text(GOOD)
    assert load_recipe(own / "recipe.yaml", ["convert.target_sparsity=0.3"]).convert["target_sparsity"] == 0.3
