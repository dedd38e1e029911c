"""The embedded tiny world: the shipped assets load through the real classes, and the build script runs."""

from __future__ import annotations

import json

import pytest
import torch

from rocm_ray.models import tiny_world as tw
from rocm_ray.models.judge import DigitJudge, judge_predict, load_judge
from rocm_ray.paths import assets_dir

TINY = assets_dir() / "tiny"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one torch thread is as fast, and does not crawl when the shared machine is busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data() -> tw.DigitData:
    return tw.load_digit_data()


def test_prompt_helpers() -> None:
    prompts = tw.tiny_prompts()
    assert prompts[7] == "a handwritten digit 7"
    assert [tw.prompt_digit(p) for p in prompts] == list(range(10))
    assert tw.prompt_digit("a thick handwritten digit seven") == 7
    assert len(tw.tiny_prompts([3], styles=("", "thick", "thin"))) == 3
    with pytest.raises(ValueError, match="names no digit"):
        tw.prompt_digit("a cat")


def test_split_is_fixed_and_stratified(data: tw.DigitData) -> None:
    assert data.train_images.shape == (1437, 3, 32, 32) and data.test_images.shape == (360, 3, 32, 32)
    assert 0.0 <= float(data.train_images.min()) and float(data.train_images.max()) <= 1.0
    assert torch.bincount(data.test_labels).min() >= 35


def test_shipped_pipeline_generates_images_in_unit_range() -> None:
    from diffusers import LatentConsistencyModelPipeline

    pipe = LatentConsistencyModelPipeline.from_pretrained(TINY / "lcm")
    pipe.set_progress_bar_config(disable=True)
    assert pipe.unet.config.time_cond_proj_dim is not None
    assert sum(p.numel() for p in pipe.unet.parameters()) < 2_000_000
    out = pipe(
        ["a handwritten digit 3", "a handwritten digit 8"],
        num_inference_steps=4,
        guidance_scale=tw.DEFAULT_GUIDANCE,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    )
    images = out.images
    assert images.shape == (2, 3, 32, 32)
    assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0


def test_distillation_matches_the_pipeline_conventions() -> None:
    """LCD's c_skip/c_out, guidance embedding and prompt embeddings are the pipeline's own."""
    from diffusers import LatentConsistencyModelPipeline, LCMScheduler

    from rocm_ray.models.tiny import tiny_scheduler_config

    sched = LCMScheduler(**tiny_scheduler_config())
    t = torch.tensor([0, 19, 259, 999])
    c_skip, c_out = tw.boundary_scalings(t)
    for i, ti in enumerate(t.tolist()):
        ref_skip, ref_out = sched.get_scalings_for_boundary_condition_discrete(ti)
        assert abs(float(c_skip[i]) - ref_skip) < 1e-9 and abs(float(c_out[i]) - ref_out) < 1e-6
    sched.set_timesteps(4)
    assert sched.timesteps.tolist() == [999, 759, 499, 259]  # all on LCD's 50-step grid t = 20 i - 1
    assert torch.allclose(tw.alphas_cumprod(), sched.alphas_cumprod.float())
    pipe = LatentConsistencyModelPipeline.from_pretrained(TINY / "lcm")
    w = torch.tensor([2.0])
    ref = pipe.get_guidance_scale_embedding(w, embedding_dim=pipe.unet.config.time_cond_proj_dim)
    assert torch.equal(tw.guidance_embedding(w, pipe.unet.config.time_cond_proj_dim), ref)
    prompts = ["a handwritten digit 7", ""]
    ours = tw.encode_prompts(pipe.tokenizer, pipe.text_encoder, prompts)
    theirs, _ = pipe.encode_prompt(prompts, "cpu", 1, False)
    assert torch.allclose(ours, theirs)


def test_shipped_clip_prefers_the_right_prompt(data: tw.DigitData) -> None:
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

    model = CLIPModel.from_pretrained(TINY / "clip").eval()
    tok = CLIPTokenizer.from_pretrained(TINY / "clip")
    proc = CLIPImageProcessor.from_pretrained(TINY / "clip")
    assert proc.crop_size["height"] == 32 and list(proc.image_mean) == list(tw.OPENAI_CLIP_MEAN)
    acc = tw.clip_retrieval_accuracy(model, tok, data.test_images[:200], data.test_labels[:200])
    assert acc > 0.5  # chance is 0.1


def test_shipped_aesthetic_head_has_laion_layout(data: tw.DigitData) -> None:
    from transformers import CLIPModel

    state = torch.load(TINY / "aesthetic_head.pth", map_location="cpu", weights_only=True)
    assert sorted(state) == sorted(f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias"))
    head = tw.load_aesthetic_head(TINY / "aesthetic_head.pth")
    model = CLIPModel.from_pretrained(TINY / "clip").eval()
    with torch.no_grad():
        real = head(tw.image_features(model, data.test_images[:64]))
        blobs = head(tw.image_features(model, torch.nn.functional.max_pool2d(data.test_images[:64], 5, 1, 2)))
    assert blobs.mean() > real.mean() + 1.0  # more ink scores higher: the hackable "aesthetic"


def test_shipped_judge_is_accurate_on_held_out_digits(data: tw.DigitData) -> None:
    judge = load_judge(TINY / "judge")
    assert isinstance(judge, DigitJudge)
    pred = judge_predict(judge, data.test_images)
    assert pred.shape == (360,)
    assert (pred == data.test_labels).float().mean() >= 0.95


def test_build_info_records_the_gate() -> None:
    info = json.loads((TINY / "build_info.json").read_text())
    assert info["metrics"]["gate"]["steps"] == 4
    assert info["metrics"]["gate"]["guidance"] == tw.DEFAULT_GUIDANCE


def test_build_script_end_to_end(tmp_path) -> None:
    from diffusers import LatentConsistencyModelPipeline
    from transformers import CLIPModel

    out = tmp_path / "tiny"
    args = ["--out", str(out), "--scale", "0.002", "--grid", str(tmp_path / "grid.png"), "--threads", "1"]
    assert tw.main(args) == 0
    assert torch.get_num_threads() == 1  # the build restores the caller's thread count
    assert not (out / ".build").exists()  # the work folder is removed after a full build
    pipe = LatentConsistencyModelPipeline.from_pretrained(out / "lcm")
    assert pipe.unet.config.time_cond_proj_dim == tw.unet_config()["time_cond_proj_dim"]
    CLIPModel.from_pretrained(out / "clip")
    load_judge(out / "judge")
    tw.load_aesthetic_head(out / "aesthetic_head.pth")
    info = json.loads((out / "build_info.json").read_text())
    assert set(info["times_s"]) == set(tw.STAGES)
    assert (tmp_path / "grid.png").stat().st_size > 0
