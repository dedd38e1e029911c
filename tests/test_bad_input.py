"""The bad-input battery: malformed recipes and CLI calls, each refused with exit code 2 and one paragraph.

Every case runs the real ``rocm-ray`` entry point (``rocm_ray.cli.main``) in a fresh working folder with
``train.output_dir`` pointing into it, and checks: exit code 2; stderr is one ``error:`` paragraph that
names the file and the key (or the CLI argument) and says what to do; no traceback; and nothing in the
working folder (no output folder, no recipe.json, no checkpoint) that could be taken for a result.
No case starts Ray or loads model weights: the checks run before either.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from rocm_ray.cli import main
from rocm_ray.config import as_number, load_recipe, yaml_load

REPO = Path(__file__).resolve().parents[1]
DEBUG = str(REPO / "recipes/tiny_debug.yaml")
RAY = str(REPO / "recipes/tiny_ray.yaml")
TINY_LCM = REPO / "rocm_ray/assets/tiny/lcm"


def _configs_only_copy(dst: Path, edit_unet: dict | None = None) -> Path:
    """The tiny LCM pipeline's JSON configs (no weights: the checks read configs only), optionally edited."""
    for rel in ("model_index.json", "scheduler/scheduler_config.json", "unet/config.json"):
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(TINY_LCM / rel, dst / rel)
    if edit_unet:
        cfg = json.loads((dst / "unet/config.json").read_text())
        cfg.update(edit_unet)
        (dst / "unet/config.json").write_text(json.dumps(cfg))
    return dst


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """Malformed files and folders, built once, outside every case's working folder."""
    d = tmp_path_factory.mktemp("bad_inputs")
    files = {
        "empty_prompts": ("prompts_empty.txt", b"\n# only a comment\n   \n"),
        "latin1_prompts": ("prompts_latin1.txt", "une chienne \u00e0 la plage\n".encode("latin-1")),
        "not_yaml": ("not_yaml.yaml", b"name: x\nmodel: {pretrained: [unclosed\n"),
        "binary": ("binary.yaml", bytes(range(256))),
        "yaml_list": ("list.yaml", b"- name: x\n- model: {}\n"),
        "wrong_type_file": ("wrong_type.yaml", (REPO / "recipes/tiny_debug.yaml").read_bytes()
                            .replace(b"steps: 8", b"steps: eight")),
    }
    out = {}
    for key, (name, data) in files.items():
        (d / name).write_bytes(data)
        out[key] = d / name
    out["empty_dir"] = d / "empty_dir"
    out["empty_dir"].mkdir()
    sd = d / "sd_pipeline"  # a Stable Diffusion pipeline folder: not an LCM
    (sd / "scheduler").mkdir(parents=True)
    index = json.loads((TINY_LCM / "model_index.json").read_text())
    index.update(_class_name="StableDiffusionPipeline", scheduler=["diffusers", "PNDMScheduler"])
    (sd / "model_index.json").write_text(json.dumps(index))
    (sd / "scheduler/scheduler_config.json").write_text(json.dumps({"_class_name": "PNDMScheduler"}))
    out["sd_pipeline"] = sd
    out["no_guidance"] = _configs_only_copy(d / "lcm_no_guidance", {"time_cond_proj_dim": None})
    run = d / "run_without_weights"  # what an interrupted run leaves: recipe.json, no weights/
    run.mkdir()
    (run / "recipe.json").write_text(json.dumps(load_recipe(DEBUG).to_dict()))
    out["run_without_weights"] = run
    return out


# (case id, argv builder, words that must appear in the message). {out}: this case's output folder;
# {x}: the path of inputs[x].
CASES = [
    ("unknown_key", ["train", DEBUG, "train.bogus=1"], ["tiny_debug.yaml", "train.bogus", "unknown key"]),
    ("unknown_section", ["train", DEBUG, "modle.lora_rank=4"], ["modle", "unknown key", "allowed keys"]),
    ("wrong_type_override", ["train", DEBUG, "train.steps=abc"], ["train.steps", "expected an integer"]),
    ("wrong_type_in_file", ["train", "{wrong_type_file}"], ["wrong_type.yaml", "train.steps", "integer"]),
    ("batch_size_zero", ["train", DEBUG, "train.batch_size=0"], ["train.batch_size", "must be >= 1"]),
    ("steps_negative", ["train", DEBUG, "train.steps=-3"], ["train.steps", "must be >= 1"]),
    ("lr_zero", ["train", DEBUG, "train.lr=0"], ["train.lr", "must be > 0"]),
    ("lr_negative_exponent_form", ["train", DEBUG, "train.lr=-1e-3"], ["train.lr", "must be > 0"]),
    ("beta_negative", ["train", DEBUG, "algorithm.beta=-0.5"], ["algorithm.beta", "must be >= 0"]),
    ("unknown_regularizer", ["train", DEBUG, "algorithm.regularizer=kll"], ["algorithm.regularizer", "'kl'"]),
    ("unknown_reward", ["train", DEBUG, "reward.models.0.name=hps"], ["reward.models.0.name", "unknown reward"]),
    ("reward_weights_all_zero", ["train", DEBUG, "reward.models.0.weight=0"],
     ["reward.models.0.weight", "every reward weight is 0"]),
    ("non_differentiable_reward", ["train", DEBUG, "reward.models.0.name=jpeg_compressibility"],
     ["reward.models.0.name", "not differentiable", "toy_brightness"]),
    ("missing_model_folder", ["train", DEBUG, "model.pretrained=/nonexistent/lcm_model"],
     ["model.pretrained", "no such folder", "/nonexistent/lcm_model"]),
    ("hub_id_not_cached_offline", ["train", DEBUG, "model.pretrained=nobody-here/not-a-model"],
     ["model.pretrained", "not in the Hugging Face cache", "huggingface-cli download"]),
    ("folder_without_model_index", ["train", DEBUG, "model.pretrained={empty_dir}"],
     ["model.pretrained", "no model_index.json"]),
    ("not_an_lcm_pipeline", ["train", DEBUG, "model.pretrained={sd_pipeline}"],
     ["model.pretrained", "not a latent consistency model", "PNDMScheduler"]),
    ("unet_without_guidance_embedding", ["train", DEBUG, "model.pretrained={no_guidance}"],
     ["model.pretrained", "no guidance embedding", "time_cond_proj_dim"]),
    ("empty_prompt_file", ["train", DEBUG, "data.prompts_file={empty_prompts}"],
     ["data.prompts_file", "holds no prompt"]),
    ("non_utf8_prompt_file", ["train", DEBUG, "data.prompts_file={latin1_prompts}"],
     ["data.prompts_file", "not UTF-8"]),
    ("missing_prompt_file", ["train", DEBUG, "data.prompts_file=/nonexistent/prompts.txt"],
     ["data.prompts_file", "file not found"]),
    ("recipe_not_yaml", ["train", "{not_yaml}"], ["not_yaml.yaml", "not valid YAML at line"]),
    ("recipe_binary", ["train", "{binary}"], ["binary.yaml", "not a UTF-8 text file"]),
    ("recipe_is_a_yaml_list", ["train", "{yaml_list}"], ["list.yaml", "YAML mapping"]),
    ("recipe_missing", ["train", "/nonexistent/recipe.yaml"], ["recipe.yaml", "recipe file not found"]),
    ("recipe_is_a_folder", ["train", "{empty_dir}"], ["empty_dir", "is a folder"]),
    ("batch_not_divisible_by_workers", ["train", RAY, "train.num_workers=3"],
     ["tiny_ray.yaml", "train.batch_size", "divisible by train.num_workers (3)"]),
    ("truncate_longer_than_trajectory", ["train", DEBUG, "algorithm.truncate_steps=9"],
     ["algorithm.truncate_steps", "num_inference_steps"]),
    ("zero_without_workers", ["train", DEBUG, "train.zero_stage=2"], ["train.zero_stage", "num_workers >= 1"]),
    ("max_nonfinite_steps_zero", ["train", DEBUG, "train.max_nonfinite_steps=0"],
     ["train.max_nonfinite_steps", "must be >= 1"]),
    ("override_without_equals", ["train", DEBUG, "train.lr"], ["train.lr", "key.path=value"]),
    ("resume_inprocess", ["train", DEBUG, "--resume"], ["tiny_debug.yaml", "--resume", "no complete checkpoint",
                                                         "without --resume"]),
    ("resume_without_checkpoint", ["train", RAY, "--resume"],
     ["tiny_ray.yaml", "--resume", "no complete checkpoint", "without --resume"]),
    ("export_run_without_weights", ["export", "{run_without_weights}", "--out", "{out}/export"],
     ["run_without_weights", "has no weights"]),
    ("sample_missing_model", ["sample", "/nonexistent/run", "--prompt", "a digit 1", "--out", "{out}/samples"],
     ["/nonexistent/run", "no such run or model folder"]),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_cleanly(case, inputs, tmp_path, monkeypatch, capsys):
    name, argv, words = case
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = work / "out"
    fmt = {"out": str(out), **{k: str(v) for k, v in inputs.items()}}
    argv = [a.format(**fmt) for a in argv]
    if argv[0] == "train" and not any(a.startswith("train.output_dir=") for a in argv):
        argv.insert(2, f"train.output_dir={out}")
    import ray

    ray_before = ray.is_initialized()
    code = main(argv)
    captured = capsys.readouterr()
    err = captured.err
    assert code == 2, f"{name}: exit {code}\n{err}\n{captured.out}"
    assert ray.is_initialized() == ray_before, "a bad input started Ray"
    assert "Traceback" not in err + captured.out
    assert err.startswith("error: "), err
    lines = err.rstrip("\n").split("\n")
    assert "" not in lines, f"not one paragraph:\n{err}"
    assert all(not ln.startswith("error: ") for ln in lines[1:]), err
    for w in words:
        assert w in err, f"{name}: {w!r} not in: {err}"
    assert len(err) < 1200, err
    left = sorted(str(p.relative_to(work)) for p in work.rglob("*"))
    assert left == [], f"{name}: wrote {left}"


def test_at_least_twenty_cases():
    assert len(CASES) >= 20


def test_unknown_command_exits_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["trian", DEBUG])
    assert e.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


# ------------------------------------------------------------------------------ numbers as the user meant


@pytest.mark.parametrize("text,value", [("3e-3", 0.003), ("1E-4", 1e-4), ("-2e+1", -20.0), ("1.5e3", 1500.0),
                                        ("0.1", 0.1), ("7", 7)])
def test_yaml_exponent_floats_are_numbers(text, value):
    got = yaml_load(f"x: {text}")["x"]
    assert got == value and not isinstance(got, str)
    assert yaml_load("x: 1e-4abc")["x"] == "1e-4abc"  # not a number: stays a string
    assert yaml_load("x: '3e-3'")["x"] == "3e-3"  # quoted: a string


def test_exponent_numbers_in_recipe_overrides_and_files(tmp_path):
    r = load_recipe(DEBUG, ["train.lr=3e-3", "algorithm.beta=1e-2", "reward.models.0.weight=2E0"])
    assert r.train.lr == 3e-3 and isinstance(r.train.lr, float)
    assert r.algorithm.beta == 0.01 and r.reward.models[0].weight == 2.0
    text = (REPO / "recipes/tiny_debug.yaml").read_text().replace("lr: 0.05", "lr: 1e-4")
    assert "lr: 1e-4" in text
    p = tmp_path / "exp.yaml"
    p.write_text(text)
    assert load_recipe(p).train.lr == 1e-4
    q = tmp_path / "quoted.yaml"  # a quoted number where a number belongs: the number meant
    q.write_text(text.replace("lr: 1e-4", "lr: '2e-4'"))
    assert load_recipe(q).train.lr == 2e-4
    assert as_number("name") == "name" and as_number("1e-3") == 1e-3


def test_exponent_numbers_in_tune_search_space(tmp_path):
    from rocm_ray.tune import parse_search_space

    r = load_recipe(REPO / "recipes/tune_tiny_debug.yaml",
                    ["tune.search_space={train.lr: [1e-3, 3e-3], algorithm.beta: {loguniform: [1e-3, 1e-1]}}"])
    keys = {k.key: k for k in parse_search_space(r)}
    assert keys["train.lr"].values == (1e-3, 3e-3) and keys["train.lr"].numeric
    assert keys["algorithm.beta"].values == (1e-3, 1e-1)
    # a search space built in code with the strings YAML 1.1 would have made
    r.tune.search_space = {"train.lr": ["1e-3", "3e-3"], "algorithm.beta": {"choice": ["1e-2", "1e-1"]}}
    keys = {k.key: k for k in parse_search_space(r)}
    assert keys["train.lr"].values == (1e-3, 3e-3) and keys["train.lr"].numeric
    assert keys["algorithm.beta"].values == (1e-2, 1e-1)
