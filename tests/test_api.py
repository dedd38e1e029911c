"""The Python API: ``import rocm_ray`` stays light, every public name resolves, docs/api.md's example runs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "ray", "deepspeed", "diffusers", "transformers", "peft")


def _python(code: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_import_is_light_and_every_name_resolves():
    """A fresh interpreter: ``import rocm_ray`` loads none of the heavy libraries; each public name then
    resolves to a real object from its module, and even after all of them neither Ray nor DeepSpeed is loaded."""
    code = f"""
import json, sys
import rocm_ray
heavy_after_import = [m for m in {HEAVY!r} if m in sys.modules]
names = {{n: type(getattr(rocm_ray, n)).__name__ for n in rocm_ray.__all__}}
print(json.dumps({{"heavy": heavy_after_import, "names": names,
                  "ray": "ray" in sys.modules, "deepspeed": "deepspeed" in sys.modules,
                  "train_callable": callable(rocm_ray.train), "train_is_pkg": hasattr(rocm_ray.train, "__path__")}}))
"""
    out = _python(code)
    assert out.returncode == 0, out.stderr[-3000:]
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert info["heavy"] == [], f"import rocm_ray loaded {info['heavy']}"
    for name in ("sample", "sample_trajectory", "gaussian_divergence", "rocm_loss", "load_recipe", "train",
                 "RewardScorer", "build_scorer"):
        assert name in info["names"], name
    assert info["names"]["sample"] == "function" and info["names"]["RewardScorer"] in ("_ProtocolMeta", "type")
    assert not info["ray"] and not info["deepspeed"]
    assert info["train_callable"] and info["train_is_pkg"]  # rocm_ray.train(...) and rocm_ray.train.<module>


def test_unknown_name_is_an_attribute_error():
    import rocm_ray

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        rocm_ray.nope  # noqa: B018


def test_train_rejects_bad_overrides_before_running(tmp_path):
    import rocm_ray

    with pytest.raises(rocm_ray.RecipeError, match="train.stepz"):
        rocm_ray.train(REPO / "recipes/tiny_debug.yaml", ["train.stepz=2", f"train.output_dir={tmp_path}/x"])
    with pytest.raises(rocm_ray.RecipeError, match="num_workers"):
        rocm_ray.train(REPO / "recipes/tiny_debug.yaml", [f"train.output_dir={tmp_path}/x"], resume=True)
    with pytest.raises(TypeError, match="Recipe, a recipe file path or a dict"):
        rocm_ray.train(42)
    assert not (tmp_path / "x").exists()  # nothing half-written


@pytest.mark.slow
def test_docs_api_example_runs():
    """The ``python`` code block of docs/api.md under "A runnable example", run as it stands (its asserts
    check the sampler, the divergence, the loss's gradients, the run's outputs and loading the result)."""
    text = (REPO / "docs/api.md").read_text()
    section = text.split("## A runnable example", 1)[1]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert blocks, "docs/api.md has no python block under 'A runnable example'"
    out = _python(blocks[0], timeout=600)
    assert out.returncode == 0, f"docs/api.md example failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"
    assert "reward before -> after:" in out.stdout and "fine-tuned image (1, 3," in out.stdout
