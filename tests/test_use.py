"""Using a run: sample / export / eval on one short tiny_debug run (made once for the module).

The equality tests compare rocm_ray's images with plain diffusers' ``LatentConsistencyModelPipeline.__call__``
for the same seeds: a LoRA export loaded with ``load_lora_weights``, and a merged export loaded with
``from_pretrained``, must both reproduce ``rocm-ray sample`` on the run to 1e-4.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from rocm_ray.cli import main

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tiny_debug.yaml"
EVAL_DEBUG = Path(__file__).resolve().parents[1] / "recipes" / "eval_debug.yaml"
PROMPTS = ["a handwritten digit 1", "a handwritten digit 4"]
SEEDS = [3, 4]
TRAIN_STEPS = 2


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The toy models are far too small for intra-op parallelism; on a shared 2-core machine one thread is
    many times faster than two (no spin-waiting on a busy core)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A LoRA run (rank 8, alpha 16: alpha != rank, so the adapter metadata matters) of 2 steps."""
    out = tmp_path_factory.mktemp("use") / "run"
    rc = main(["train", str(RECIPE), f"train.output_dir={out}", f"train.steps={TRAIN_STEPS}",
               "train.batch_size=2", "data.eval_seeds=1", "train.lr=0.2"])
    assert rc == 0
    return out


def diffusers_images(pipe, prompts: list[str], seeds: list[int], steps: int = 4, guidance: float = 8.0):
    """Plain diffusers: one ``pipe(...)`` call per image with its own seeded generator. [B, 3, H, W]"""
    pipe.set_progress_bar_config(disable=True)
    out = [pipe(p, num_inference_steps=steps, guidance_scale=guidance, output_type="pt",
                generator=torch.Generator().manual_seed(s)).images for p in prompts for s in seeds]
    return torch.cat(out).float()


def ours(model, prompts=PROMPTS, seeds=SEEDS) -> torch.Tensor:
    from rocm_ray.use import sample_images

    images, ps, ss, _ = sample_images(model, prompts, seed=seeds[0], num_images=len(seeds))
    assert ss == [s for _ in prompts for s in seeds] and ps == [p for p in prompts for _ in seeds]
    return images


def decode_png(blob: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(blob)).convert("RGB"))


def test_run_reproduces_the_trained_policy(run_dir):
    """The run's LoRA, loaded with load_lora_weights, gives the images the trainer logged after training."""
    rows = [r for r in pq.read_table(run_dir / "samples.parquet").to_pylist() if r["step"] == TRAIN_STEPS]
    assert rows
    from rocm_ray.use import generate_pairs, load_model

    loaded = load_model(run_dir)
    imgs = generate_pairs(loaded.pipe, [r["prompt"] for r in rows], [r["seed"] for r in rows], 4, 8.0)
    mine = (imgs.permute(0, 2, 3, 1).numpy() * 255).round().astype(int)
    logged = np.stack([decode_png(r["image_png"]) for r in rows]).astype(int)
    assert np.abs(mine - logged).max() <= 1
    with loaded.base_pipeline() as base:  # the LoRA is really there: the base differs
        base_imgs = generate_pairs(base, [r["prompt"] for r in rows], [r["seed"] for r in rows], 4, 8.0)
    assert (base_imgs - imgs).abs().max() > 1e-3


def test_lora_export_loads_in_plain_diffusers(run_dir, tmp_path, capsys):
    from diffusers import LatentConsistencyModelPipeline

    from rocm_ray.models.policy import load_pipeline

    out = tmp_path / "lora"
    assert main(["export", str(run_dir), "--out", str(out)]) == 0
    assert (out / "pytorch_lora_weights.safetensors").is_file() and (out / "README.md").is_file()
    card = (out / "README.md").read_text()
    for words in ("random:0", "toy_brightness", "kl", "beta 0.01", "load_lora_weights", "reward_after"):
        assert words in card
    ref = ours(run_dir)

    rebuilt = load_pipeline("random:0")  # the rebuilt base: a plain LatentConsistencyModelPipeline
    assert type(rebuilt) is LatentConsistencyModelPipeline
    rebuilt.load_lora_weights(str(out))
    d_rebuilt = (diffusers_images(rebuilt, PROMPTS, SEEDS) - ref).abs().max().item()

    shipped = LatentConsistencyModelPipeline.from_pretrained(str(out / "base"))  # no rocm_ray involved
    shipped.load_lora_weights(str(out))
    d_shipped = (diffusers_images(shipped, PROMPTS, SEEDS) - ref).abs().max().item()
    print(f"LoRA export vs rocm-ray sample: max abs diff {d_rebuilt:.2e} (rebuilt base), "
          f"{d_shipped:.2e} (shipped base)")
    assert d_rebuilt <= 1e-4 and d_shipped <= 1e-4

    # the CLI's PNGs are the same images, quantized; the export folder itself samples the same too
    samples = tmp_path / "samples"
    rc = main(["sample", str(run_dir), *sum((["--prompt", p] for p in PROMPTS), []), "--seed", str(SEEDS[0]),
               "--steps", "4", "--num-images", str(len(SEEDS)), "--out", str(samples)])
    assert rc == 0
    png = np.asarray(Image.open(samples / f"p001_s{SEEDS[1]}.png").convert("RGB")).astype(int)
    want = (ref[3].permute(1, 2, 0).numpy() * 255).round().astype(int)
    assert np.abs(png - want).max() <= 1
    assert (samples / "grid.png").is_file() and json.loads((samples / "sample.json").read_text())["seed"] == 3
    assert (ours(out) - ref).abs().max().item() <= 1e-5


def test_kohya_export_round_trips_exactly(run_dir, tmp_path):
    """``--format kohya``: one file in the key layout ComfyUI / A1111 / Forge load; diffusers' own kohya
    loader reads it back to exactly the run's LoRA tensors, and the base UNet with it loaded gives the run's
    output. The run's alpha (16) != rank (8): a file with diffusers' default alpha = rank would not."""
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft
    from safetensors import safe_open
    from safetensors.torch import save_file

    from rocm_ray.export import from_kohya, to_kohya, unet_probe
    from rocm_ray.loading import load_model, read_lora
    from rocm_ray.models.policy import load_pipeline

    out = tmp_path / "kohya"
    assert main(["export", str(run_dir), "--out", str(out), "--format", "kohya"]) == 0
    f = out / f"{run_dir.name}.safetensors"
    with safe_open(str(f), "pt") as h:
        keys, meta = list(h.keys()), h.metadata()
        alphas = {k: float(h.get_tensor(k)) for k in keys if k.endswith(".alpha")}
    modules = {k.split(".")[0] for k in keys}
    assert all(m.startswith("lora_unet_") and "." not in m for m in modules)
    assert set(keys) == {f"{m}.{part}" for m in modules for part in ("lora_down.weight", "lora_up.weight", "alpha")}
    assert set(alphas.values()) == {16.0} and meta["ss_network_dim"] == "8" and meta["ss_network_alpha"] == "16.0"
    info = json.loads((out / "rocm_ray_export.json").read_text())
    assert info["kind"] == "kohya" and info["file"] == f.name and info["verify"]["kohya_vs_run"] <= 1e-5
    assert "models/loras" in (out / "README.md").read_text()

    sd, _ = read_lora(run_dir / "weights" / "lora")
    ref = convert_unet_state_dict_to_peft(dict(sd))
    back, back_alpha = from_kohya(f)
    assert set(back) == set(ref) and all(torch.equal(back[k], ref[k]) for k in ref)
    assert set(back_alpha.values()) == {16.0} and len(back_alpha) == len(modules)

    want = unet_probe(load_model(run_dir).pipe.unet)
    base = load_pipeline("random:0")
    base.load_lora_weights(str(f))
    assert (unet_probe(base.unet) - want).abs().max().item() <= 1e-5
    wrong = tmp_path / "alpha_eq_rank.safetensors"  # the control: diffusers' converter's alpha = rank
    save_file(to_kohya(sd, 8.0), str(wrong))
    base = load_pipeline("random:0")
    base.load_lora_weights(str(wrong))
    assert (unet_probe(base.unet) - want).abs().max().item() > 1e-4


def test_merged_export_loads_with_from_pretrained(run_dir, tmp_path):
    from diffusers import LatentConsistencyModelPipeline

    out = tmp_path / "merged"
    assert main(["export", str(run_dir), "--out", str(out), "--merge"]) == 0
    info = json.loads((out / "rocm_ray_export.json").read_text())
    assert info["kind"] == "merged" and max(info["verify"].values()) < 1e-4
    pipe = LatentConsistencyModelPipeline.from_pretrained(str(out))
    assert not any("lora" in n for n, _ in pipe.unet.named_parameters())
    ref = ours(run_dir)
    diff = (diffusers_images(pipe, PROMPTS, SEEDS) - ref).abs().max().item()
    print(f"merged export vs rocm-ray sample: max abs diff {diff:.2e}")
    assert diff <= 1e-4
    # the export is a model folder for sample and eval too; eval finds its base in rocm_ray_export.json
    assert (ours(out) - ref).abs().max().item() <= 1e-4
    ev = tmp_path / "eval"
    assert main(["eval", str(out), str(EVAL_DEBUG), f"output_dir={ev}", "seeds=[0,1]",
                 "prompts=[a handwritten digit 2]"]) == 0
    report = json.loads((ev / "eval.json").read_text())
    assert report["kind"] == "pipeline" and report["base_model"] == "random:0"
    assert report["trained_rewards"] == ["toy_brightness"]


def test_full_finetune_run_exports_a_pipeline(run_dir, tmp_path):
    """A full fine-tune (weights/unet) samples with its UNet and exports a whole pipeline folder."""
    from diffusers import LatentConsistencyModelPipeline

    from rocm_ray.models.policy import load_pipeline

    full = tmp_path / "full_run"
    full.mkdir()
    recipe = json.loads((run_dir / "recipe.json").read_text())
    recipe["model"]["lora_rank"] = 0
    (full / "recipe.json").write_text(json.dumps(recipe))
    shutil.copy(run_dir / "summary.json", full / "summary.json")
    unet = load_pipeline("random:0").unet
    torch.manual_seed(0)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.01 * torch.randn_like(p))
    unet.save_pretrained(str(full / "weights" / "unet"))
    out = tmp_path / "full_export"
    assert main(["export", str(full), "--out", str(out)]) == 0
    pipe = LatentConsistencyModelPipeline.from_pretrained(str(out))
    mine = ours(full, PROMPTS[:1], SEEDS[:1])
    diff = (diffusers_images(pipe, PROMPTS[:1], SEEDS[:1]) - mine).abs().max().item()
    print(f"full fine-tune export vs rocm-ray sample: max abs diff {diff:.2e}")
    assert diff <= 1e-4
    base = diffusers_images(load_pipeline("random:0"), PROMPTS[:1], SEEDS[:1])
    assert (base - mine).abs().max() > 1e-3


def test_sample_log_schema(run_dir):
    """samples.parquet has the documented columns and types; images decode to the model's size."""
    import pyarrow as pa

    schema = pq.read_schema(run_dir / "samples.parquet")
    want = {"step": pa.int64(), "prompt": pa.string(), "seed": pa.int64(), "reward": pa.float64(),
            "divergence": pa.float64(), "divergences": pa.list_(pa.float64()), "image_png": pa.binary()}
    for name, tp in want.items():
        assert schema.field(name).type == tp, name
    doc = (Path(__file__).resolve().parents[1] / "docs" / "outputs.md").read_text()
    for name in [*want, "model", "reward_<name>"]:
        assert f"`{name}`" in doc, name
    df = pq.read_table(run_dir / "samples.parquet").to_pandas()
    assert sorted(df["step"].unique()) == [0, TRAIN_STEPS]
    for blob in df["image_png"]:
        assert Image.open(io.BytesIO(blob)).size == (16, 16)


def test_eval_base_vs_finetuned(run_dir, tmp_path):
    out = tmp_path / "eval"
    rc = main(["eval", str(run_dir), str(EVAL_DEBUG), f"output_dir={out}", "seeds=[0,1]"])
    assert rc == 0
    for f in ("eval.csv", "eval.md", "eval_per_prompt.csv", "eval.json", "grid.png", "samples.parquet"):
        assert (out / f).is_file(), f
    import pandas as pd

    table = pd.read_csv(out / "eval.csv").set_index("metric")
    assert {"base", "fine_tuned", "delta"} <= set(table.columns)
    assert {"reward", "reward_toy_brightness", "reward_toy_redness", "diversity"} <= set(table.index)
    for col in ("base", "fine_tuned"):
        assert 0.0 <= table.loc["diversity", col] <= 2.0
        assert np.isfinite(table.loc[["reward_toy_brightness", "reward_toy_redness"], col]).all()
    print("\n" + table.to_string())
    log = pq.read_table(out / "samples.parquet").to_pandas()
    assert set(log["model"]) == {"base", "fine-tuned"} and len(log) == 2 * 2 * 2
    assert {"reward_toy_brightness", "reward_toy_redness"} <= set(log.columns)
    assert set(log[log["model"] == "base"]["step"]) == {0}
    assert set(log[log["model"] == "fine-tuned"]["step"]) == {TRAIN_STEPS}
    assert "toy_brightness *" in (out / "eval.md").read_text()  # the trained reward is marked


def test_diversity_bounds():
    from rocm_ray.diversity import diversity, mean_pairwise_cosine_distance

    same = torch.rand(1, 3, 16, 16).repeat(3, 1, 1, 1)
    assert diversity(same, ["p"] * 3) == pytest.approx(0.0, abs=1e-6)
    assert mean_pairwise_cosine_distance(torch.tensor([[1.0, 0.0], [-1.0, 0.0]])) == pytest.approx(2.0)


@pytest.mark.parametrize("argv, words", [
    (["sample", "{missing}", "--prompt", "x", "--out", "{tmp}/s"], ["no such run or model folder"]),
    (["sample", "{run}", "--out", "{tmp}/s"], ["no prompts"]),
    (["sample", "{run}", "--prompts", "{tmp}/nope.txt", "--out", "{tmp}/s"], ["prompts file not found"]),
    (["eval", "{missing}", str(EVAL_DEBUG), "output_dir={tmp}/e"], ["no such run or model folder"]),
    (["eval", "{run}", str(EVAL_DEBUG), "prompts=[]"], ["prompts", "no prompts"]),
    (["eval", "{run}", str(EVAL_DEBUG), "seeds=[0]"], ["seeds", "at least 2 seeds"]),
    (["eval", "{run}", str(EVAL_DEBUG), "rewards.0.name=nope"], ["rewards.0.name", "unknown reward"]),
    (["export", "{missing}", "--out", "{tmp}/x"], ["no such run or model folder"]),
    (["export", "{run}", "--out", "{tmp}"], ["not empty", "--force"]),
    (["export", "{run}", "--out", "{tmp}/k", "--format", "kohya", "--merge"], ["--format kohya", "--merge"]),
])
def test_bad_input_exits_2(run_dir, tmp_path, capsys, argv, words):
    (tmp_path / "occupied").write_text("x")
    argv = [a.format(missing=tmp_path / "no_such_run", run=run_dir, tmp=tmp_path) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    for w in words:
        assert w in err[0], (w, err[0])


@pytest.mark.parametrize("path", sorted(EVAL_DEBUG.parent.glob("eval_*.yaml")), ids=lambda p: p.name)
def test_shipped_eval_recipes_parse(path):
    from rocm_ray.use import eval_prompts, load_eval_recipe

    cfg = load_eval_recipe(path)
    assert len(cfg.rewards) >= 2 and eval_prompts(cfg) and len(cfg.seeds) >= 2
