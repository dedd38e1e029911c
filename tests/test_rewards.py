"""Reward scorers: tiny random models in the real on-disk formats, loaded through the real loaders.

For each scorer we check (a) that the torch preprocessing and the scores agree with the official
pipeline (transformers' PIL image processors, or a reference forward written from the official
open_clip / BLIP code structure), (b) that d score / d image is finite and non-zero, (c) that a missing
or corrupt checkpoint gives the clear error. Nothing touches the network.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from rocm_ray.rewards import (
    RewardMixture,
    RewardModelLoadError,
    RewardModelNotFoundError,
    available_scorers,
    build_scorer,
    require_differentiable,
    scorer_options,
)
from rocm_ray.rewards.preprocess import ImagePreprocessConfig, preprocess_images

torch.set_num_threads(2)

PROMPTS = ["a cat", "a dog on a mat", "cat, dog!"]


# ----------------------------------------------------------------------------------------------
# Offline fixtures: tokenizers, images
# ----------------------------------------------------------------------------------------------


def _byte_chars() -> list[str]:
    """GPT-2 / CLIP byte -> unicode table (the base alphabet of a byte-level BPE vocab)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_clip_tokenizer(folder: Path) -> Path:
    """A tiny CLIP BPE tokenizer; <|endoftext|> gets the highest id, as in OpenAI's vocabulary."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    chars = _byte_chars()
    vocab: dict[str, int] = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    merges = ["c a", "ca t</w>", "d o", "do g</w>", "m a", "ma t</w>", "o n</w>"]
    for m in merges:
        vocab[m.replace(" ", "")] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"))
    tok.save_pretrained(str(folder))
    return folder


def write_bert_vocab(folder: Path) -> Path:
    """A tiny bert-base-uncased-style WordPiece vocab.txt."""
    folder.mkdir(parents=True, exist_ok=True)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = [
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
        *letters,
        *("##" + c for c in letters),
        "cat",
        "dog",
        "mat",
        "on",
        "a",
        ",",
        "!",
    ]
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    return folder


def smooth_images(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Random smooth RGB images [b, 3, h, w] with some texture, on the uint8 grid (so PIL sees the same)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(b, 3, 5, 6, generator=g)
    x = F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)
    x = x + 0.1 * torch.rand(b, 3, h, w, generator=g)
    return (x.clamp(0, 1) * 255).round() / 255


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    arr = (images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arr]


def clip_pil_processor(size: int, crop: int):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": crop, "width": crop})


def hf_pixels(processor, images: torch.Tensor) -> torch.Tensor:
    return torch.tensor(np.stack(processor(to_pil(images), return_tensors="np")["pixel_values"]))


def assert_grad_ok(scorer, images: torch.Tensor, prompts=PROMPTS) -> torch.Tensor:
    x = images.clone().requires_grad_(True)
    r = scorer.score(x, prompts[: len(x)])
    assert r.shape == (len(x),) and r.dtype == torch.float32
    (g,) = torch.autograd.grad(r.sum(), x)
    assert torch.isfinite(g).all(), "non-finite image gradient"
    assert g.abs().sum() > 0, "zero image gradient"
    assert all(not p.requires_grad for p in scorer.parameters()), "reward weights must be frozen"
    return r.detach()


# ----------------------------------------------------------------------------------------------
# Tiny models
# ----------------------------------------------------------------------------------------------

TINY_OPEN_CLIP = {
    "embed_dim": 24,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 4},
    "text_cfg": {"context_length": 16, "vocab_size": 525, "width": 32, "heads": 2, "layers": 2},
}


def tiny_clip_model(vocab_size: int, eos_token_id: int, seed: int = 0, projection_dim: int = 24):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config={
            "vocab_size": vocab_size,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": 32,
            "eos_token_id": eos_token_id,
            "bos_token_id": eos_token_id - 1,
            "pad_token_id": eos_token_id,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 4,
        },
        projection_dim=projection_dim,
    )
    model = CLIPModel(config).eval()
    with torch.no_grad():  # random init gives near-constant features; spread them a little
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
        model.logit_scale.fill_(math.log(20.0))
    return model


@pytest.fixture(scope="module")
def tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("rewards")


@pytest.fixture(scope="module")
def clip_tok(tmp) -> Path:
    return write_clip_tokenizer(tmp / "clip_tokenizer")


@pytest.fixture(scope="module")
def clip_folder(tmp, clip_tok) -> Path:
    """A CLIPModel + CLIPTokenizer + image-processor folder, as the embedded tiny world ships."""
    from transformers import CLIPTokenizer

    folder = tmp / "clip"
    tok = CLIPTokenizer.from_pretrained(str(clip_tok))
    tiny_clip_model(len(tok), tok.eos_token_id).save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    clip_pil_processor(32, 32).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def clip_model_only(tmp, clip_tok) -> Path:
    """A CLIPModel folder without processor files (as yuvalkirstain/PickScore_v1 ships)."""
    from transformers import CLIPTokenizer

    folder = tmp / "pickscore_model"
    tok = CLIPTokenizer.from_pretrained(str(clip_tok))
    tiny_clip_model(len(tok), tok.eos_token_id, seed=1).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def processor_folder(tmp, clip_tok) -> Path:
    from transformers import CLIPTokenizer

    folder = tmp / "processor"
    CLIPTokenizer.from_pretrained(str(clip_tok)).save_pretrained(str(folder))
    clip_pil_processor(32, 32).save_pretrained(str(folder))
    return folder


def fake_hf_cache(cache: Path, repo_id: str, files: dict[str, Path]) -> None:
    """Lay out a Hugging Face hub cache entry (refs/main -> snapshots/<commit>/...) offline."""
    commit = "0" * 40
    root = cache / ("models--" + repo_id.replace("/", "--"))
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True, exist_ok=True)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    for name, src in files.items():
        (snap / name).write_bytes(src.read_bytes())


@pytest.fixture()
def hf_cache(tmp_path, monkeypatch) -> Path:
    import huggingface_hub.constants as hc

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


# ----------------------------------------------------------------------------------------------
# (a) preprocessing
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "hw,size,crop",
    [((48, 40), 32, 32), ((64, 64), 32, 32), ((50, 77), 33, 31), ((20, 30), 32, 32), ((300, 512), 224, 224)],
)
def test_preprocess_matches_hf_clip_processor(hw, size, crop):
    images = smooth_images(2, *hw)
    proc = clip_pil_processor(size, crop)
    ref = hf_pixels(proc, images)
    ours = preprocess_images(images, ImagePreprocessConfig.from_hf_dict(proc.to_dict()))
    assert ours.shape == ref.shape
    err = (ours - ref).abs()
    # PIL resizes uint8 images and rounds to uint8 after each of its two 1-D passes; we stay in float. In
    # [0, 1] units the difference is <= ~2/255, i.e. <= 0.03 after CLIP normalization, ~0.0045 on average.
    assert err.max() < 0.03 and err.mean() < 0.006, (err.max(), err.mean())


@pytest.mark.parametrize("hw", [(48, 40), (64, 64), (20, 30)])
def test_preprocess_matches_hf_blip_processor(hw):
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    images = smooth_images(2, *hw, seed=1)
    proc = BlipImageProcessorPil(size={"height": 32, "width": 32})
    cfg = ImagePreprocessConfig.from_hf_dict(proc.to_dict())
    assert cfg.layout == "exact" and cfg.mean == tuple(proc.image_mean)
    err = (preprocess_images(images, cfg) - hf_pixels(proc, images)).abs()
    assert err.max() < 0.03 and err.mean() < 0.006


def test_preprocess_kernel_equals_pil_float_resize():
    """Without uint8 rounding the antialiased kernels are PIL's own (to float precision)."""
    x = torch.rand(1, 3, 48, 40, generator=torch.Generator().manual_seed(0))
    for mode, pil_mode in (("bicubic", Image.BICUBIC), ("bilinear", Image.BILINEAR)):
        ref = np.stack(
            [
                np.asarray(Image.fromarray(x[0, c].numpy(), mode="F").resize((30, 36), pil_mode))
                for c in range(3)
            ]
        )
        ours = F.interpolate(x, size=(36, 30), mode=mode, antialias=True, align_corners=False)[0].numpy()
        assert np.abs(ours - ref).max() < 1e-4


def test_preprocess_longest_edge_pad_matches_open_clip_resize_max_size():
    """HPSv2's ResizeMaxSize on a float tensor: longest side -> S (bicubic), zero-pad, normalize."""
    from rocm_ray.rewards.hps import hps_preprocess_config

    cfg = hps_preprocess_config(32)
    mean = torch.tensor(cfg.mean).view(3, 1, 1)
    std = torch.tensor(cfg.std).view(3, 1, 1)
    for h, w in ((48, 40), (30, 64), (32, 32), (64, 64)):
        x = smooth_images(1, h, w, seed=h)
        scale = 32 / max(h, w)
        nh, nw = round(h * scale), round(w * scale)
        if scale != 1:
            res = np.stack(
                [
                    np.asarray(Image.fromarray(x[0, c].numpy(), mode="F").resize((nw, nh), Image.BICUBIC))
                    for c in range(3)
                ]
            )
            ph, pw = 32 - nh, 32 - nw
            ref = F.pad(torch.tensor(res), (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
        else:
            ref = x[0]
        ref = (ref - mean) / std
        assert (preprocess_images(x, cfg)[0] - ref).abs().max() < 1e-4


def test_preprocess_crop_rounding_options():
    x = torch.arange(7.0).view(1, 1, 1, 7).expand(1, 3, 1, 7)
    from rocm_ray.rewards.preprocess import center_crop

    assert center_crop(x, (1, 4), "floor")[0, 0, 0].tolist() == [1, 2, 3, 4]  # HF: (7 - 4) // 2 = 1
    assert center_crop(x, (1, 4), "round")[0, 0, 0].tolist() == [2, 3, 4, 5]  # torchvision: round(1.5) = 2


def test_preprocess_reads_legacy_int_sizes():
    legacy = {
        "crop_size": 224,
        "do_center_crop": True,
        "do_normalize": True,
        "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor",
        "resample": 3,
        "size": 224,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
    }
    cfg = ImagePreprocessConfig.from_hf_dict(legacy)
    assert (cfg.layout, cfg.size, cfg.crop_size, cfg.interpolation) == (
        "shortest_edge",
        224,
        (224, 224),
        "bicubic",
    )
    blip = ImagePreprocessConfig.from_hf_dict(
        {"image_processor_type": "BlipImageProcessor", "size": 384, "resample": 3}
    )
    assert (blip.layout, blip.size, blip.output_size) == ("exact", (384, 384), (384, 384))


# ----------------------------------------------------------------------------------------------
# CLIP score and PickScore
# ----------------------------------------------------------------------------------------------


def official_clip_cosine(
    folder_model: Path, folder_proc: Path, images: torch.Tensor, prompts
) -> torch.Tensor:
    """The official transformers pipeline: PIL image processor, tokenizer, CLIPModel features, cosine."""
    from transformers import CLIPModel, CLIPTokenizer
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    model = CLIPModel.from_pretrained(str(folder_model)).eval()
    proc = CLIPImageProcessorPil.from_pretrained(str(folder_proc))
    tok = CLIPTokenizer.from_pretrained(str(folder_proc))
    with torch.no_grad():
        pixels = hf_pixels(proc, images)
        img = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        t = tok(list(prompts), padding=True, truncation=True, max_length=77, return_tensors="pt")
        txt = model.text_projection(model.text_model(**t).pooler_output)
    img, txt = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
    return (img * txt).sum(-1), model.logit_scale.exp()


def test_clip_score_matches_official_pipeline_and_has_gradient(clip_folder):
    scorer = build_scorer("clip_score", path=str(clip_folder))
    assert scorer.name == "clip_score" and scorer.differentiable
    images = smooth_images(3, 48, 40)
    ours = assert_grad_ok(scorer, images)
    cos, _ = official_clip_cosine(clip_folder, clip_folder, images, PROMPTS)
    assert torch.allclose(ours, 100 * cos, atol=0.05), (ours, 100 * cos)
    assert ours.std() > 0.05  # the images are told apart (the check above is not vacuous)


def test_pickscore_uses_logit_scale_and_separate_processor(clip_model_only, processor_folder):
    scorer = build_scorer("pickscore", path=str(clip_model_only), processor_path=str(processor_folder))
    images = smooth_images(3, 40, 56, seed=3)
    ours = assert_grad_ok(scorer, images)
    cos, scale = official_clip_cosine(clip_model_only, processor_folder, images, PROMPTS)
    assert torch.allclose(scale, torch.tensor(20.0))
    assert torch.allclose(ours, scale * cos, atol=0.02), (ours, scale * cos)


def test_pickscore_finds_laion_processor_in_hf_cache(clip_model_only, processor_folder, hf_cache):
    """With no processor in the model folder, PickScore uses laion/CLIP-ViT-H-14 from the local cache."""
    with pytest.raises(RewardModelNotFoundError) as err:
        build_scorer("pickscore", path=str(clip_model_only))
    assert "laion/CLIP-ViT-H-14-laion2B-s32B-b79K" in str(err.value) and "PickScore" in str(err.value)
    files = {p.name: p for p in processor_folder.iterdir() if p.is_file()}
    fake_hf_cache(hf_cache, "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", files)
    scorer = build_scorer("pickscore", path=str(clip_model_only))
    assert scorer.processor_folder.name == "0" * 40


def test_hub_id_resolves_through_local_cache_only(clip_folder, hf_cache):
    with pytest.raises(RewardModelNotFoundError) as err:
        build_scorer("clip_score", path="someorg/tiny-clip")
    msg = str(err.value)
    assert "someorg/tiny-clip" in msg and "local cache" in msg and "config.json" in msg
    fake_hf_cache(hf_cache, "someorg/tiny-clip", {p.name: p for p in clip_folder.iterdir() if p.is_file()})
    scorer = build_scorer("clip_score", path="someorg/tiny-clip")
    images = smooth_images(2, 32, 32)
    direct = build_scorer("clip_score", path=str(clip_folder))
    assert torch.allclose(scorer.score(images, PROMPTS[:2]), direct.score(images, PROMPTS[:2]))


def test_clip_missing_and_corrupt_checkpoints(tmp, clip_folder):
    with pytest.raises(RewardModelNotFoundError) as err:
        build_scorer("clip_score", path=str(tmp / "nowhere"))
    msg = str(err.value)
    assert "CLIP score" in msg and "nowhere" in msg and "openai/clip-vit-large-patch14" in msg
    assert isinstance(err.value, FileNotFoundError)

    broken = tmp / "clip_corrupt"
    broken.mkdir()
    for p in clip_folder.iterdir():
        (broken / p.name).write_bytes(p.read_bytes())
    (broken / "model.safetensors").write_bytes(b"not a safetensors file" * 10)
    with pytest.raises(RewardModelLoadError) as err:
        build_scorer("clip_score", path=str(broken))
    msg = str(err.value)
    assert (
        "CLIP score" in msg
        and str(broken) in msg
        and "corrupt" in msg
        and "openai/clip-vit-large-patch14" in msg
    )

    no_proc = tmp / "clip_noproc"
    no_proc.mkdir()
    for name in ("config.json", "model.safetensors"):
        (no_proc / name).write_bytes((clip_folder / name).read_bytes())
    with pytest.raises(RewardModelNotFoundError) as err:
        build_scorer("clip_score", path=str(no_proc))
    assert "preprocessor_config.json" in str(err.value)


def test_embedded_paths_load_through_the_same_code(tmp, clip_folder, monkeypatch):
    """``embedded:tiny/clip`` and ``embedded:tiny/aesthetic_head.pth`` resolve into the package assets."""
    import rocm_ray.paths as paths

    assets = tmp / "assets"
    (assets / "tiny").mkdir(parents=True, exist_ok=True)
    if not (assets / "tiny" / "clip").exists():
        (assets / "tiny" / "clip").symlink_to(clip_folder, target_is_directory=True)
    torch.save(tiny_head_state_dict(24), assets / "tiny" / "aesthetic_head.pth")
    monkeypatch.setattr(paths, "assets_dir", lambda: assets)
    clip = build_scorer("clip_score", path="embedded:tiny/clip")
    aes = build_scorer("aesthetic", path="embedded:tiny/clip", head_path="embedded:tiny/aesthetic_head.pth")
    images = smooth_images(2, 32, 32)
    assert clip.score(images, PROMPTS[:2]).shape == aes.score(images, PROMPTS[:2]).shape == (2,)


def test_shipped_embedded_assets_load_if_present():
    from rocm_ray.paths import resolve_path

    clip_dir = Path(resolve_path("embedded:tiny/clip"))
    head = Path(resolve_path("embedded:tiny/aesthetic_head.pth"))
    if not (clip_dir / "config.json").exists() or not head.exists():
        pytest.skip("the embedded tiny world has not been built yet")
    images = smooth_images(2, 32, 32)
    clip = build_scorer("clip_score", path="embedded:tiny/clip")
    assert_grad_ok(clip, images)
    aes = build_scorer("aesthetic", path="embedded:tiny/clip", head_path="embedded:tiny/aesthetic_head.pth")
    assert_grad_ok(aes, images)


# ----------------------------------------------------------------------------------------------
# Aesthetic
# ----------------------------------------------------------------------------------------------


def tiny_head_state_dict(
    in_features: int, sizes=(64, 16, 8, 4), seed: int = 0, gain: float = 1.0
) -> dict[str, torch.Tensor]:
    """A head in the official layout (Linear, Dropout, Linear, Dropout, Linear, Dropout, Linear, Linear).

    ``gain`` scales the first layer: a tiny random CLIP's unit embeddings differ little between images.
    """
    g = torch.Generator().manual_seed(seed)
    dims = [in_features, *sizes, 1]
    sd = {}
    for idx, (a, b) in zip((0, 2, 4, 6, 7), zip(dims[:-1], dims[1:], strict=True), strict=True):
        sd[f"layers.{idx}.weight"] = (
            torch.randn(b, a, generator=g) / math.sqrt(a) * (gain if idx == 0 else 1.0)
        )
        sd[f"layers.{idx}.bias"] = 0.1 * torch.randn(b, generator=g)
    return sd


def test_aesthetic_head_has_official_layout():
    from rocm_ray.rewards.aesthetic import build_mlp_head

    head = build_mlp_head(tiny_head_state_dict(768, sizes=(1024, 128, 64, 16))).layers
    kinds = [type(m).__name__ for m in head]
    assert kinds == ["Linear", "Dropout", "Linear", "Dropout", "Linear", "Dropout", "Linear", "Linear"]
    assert [m.p for m in head if isinstance(m, torch.nn.Dropout)] == [0.2, 0.2, 0.1]
    assert (head[0].in_features, head[0].out_features, head[7].out_features) == (768, 1024, 1)


def test_aesthetic_matches_official_pipeline(tmp, clip_folder):
    head_sd = tiny_head_state_dict(24, gain=50.0)
    head_path = tmp / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save(head_sd, head_path)
    scorer = build_scorer("aesthetic", path=str(clip_folder), head_path=str(head_path))
    images = smooth_images(4, 48, 48, seed=5)  # even crop margins: HF floor == torchvision round
    ours = assert_grad_ok(scorer, images, PROMPTS + ["x"])

    from transformers import CLIPModel
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    model = CLIPModel.from_pretrained(str(clip_folder)).eval()

    def official(pixels):  # simple_inference.py: normalized(encode_image) -> MLP
        with torch.no_grad():
            emb = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
            x = emb / emb.norm(dim=-1, keepdim=True)
            for i in (0, 2, 4, 6, 7):
                x = F.linear(x, head_sd[f"layers.{i}.weight"], head_sd[f"layers.{i}.bias"])
        return x.squeeze(-1)

    via_pil = official(hf_pixels(CLIPImageProcessorPil.from_pretrained(str(clip_folder)), images))
    exact = official(preprocess_images(images, scorer.preprocess_config))
    assert torch.allclose(ours, exact, atol=1e-5)
    assert ours.std() > 0.01
    assert (ours - via_pil).abs().max() < 0.1 * ours.std(), (ours, via_pil)


def test_aesthetic_head_default_location_and_errors(tmp, clip_folder):
    with pytest.raises(RewardModelNotFoundError) as err:
        build_scorer("aesthetic", path=str(clip_folder))  # no head beside the CLIP folder
    msg = str(err.value)
    assert "sac+logos+ava1-l14-linearMSE.pth" in msg and "improved-aesthetic-predictor" in msg

    bad = tmp / "bad_head.pth"
    bad.write_bytes(b"\x00garbage" * 20)
    with pytest.raises(RewardModelLoadError) as err:
        build_scorer("aesthetic", path=str(clip_folder), head_path=str(bad))
    assert "aesthetic" in str(err.value) and "layers.0" in str(err.value)

    wrong = tmp / "wrong_dim_head.pth"
    torch.save(tiny_head_state_dict(768, sizes=(1024, 128, 64, 16)), wrong)
    with pytest.raises(RewardModelLoadError) as err:
        build_scorer("aesthetic", path=str(clip_folder), head_path=str(wrong))
    assert "768" in str(err.value)


# ----------------------------------------------------------------------------------------------
# HPSv2 / HPSv2.1: open_clip checkpoint -> transformers CLIPModel
# ----------------------------------------------------------------------------------------------


def _resblocks(x, sd, prefix, layers, heads, mask=None):
    """open_clip's ResidualAttentionBlock stack (nn.MultiheadAttention math), from open_clip key names."""
    width = x.shape[-1]
    for i in range(layers):
        p = f"{prefix}{i}."
        h = F.layer_norm(x, (width,), sd[p + "ln_1.weight"], sd[p + "ln_1.bias"])
        h = h.transpose(0, 1)  # [L, B, W]
        a, _ = F.multi_head_attention_forward(
            h,
            h,
            h,
            width,
            heads,
            sd[p + "attn.in_proj_weight"],
            sd[p + "attn.in_proj_bias"],
            None,
            None,
            False,
            0.0,
            sd[p + "attn.out_proj.weight"],
            sd[p + "attn.out_proj.bias"],
            training=False,
            need_weights=False,
            attn_mask=mask,
        )
        x = x + a.transpose(0, 1)
        h = F.layer_norm(x, (width,), sd[p + "ln_2.weight"], sd[p + "ln_2.bias"])
        x = x + F.linear(
            F.gelu(F.linear(h, sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"])),
            sd[p + "mlp.c_proj.weight"],
            sd[p + "mlp.c_proj.bias"],
        )
    return x


def open_clip_reference_features(sd, cfg, pixels, text_ids):
    """open_clip ``CLIP.encode_image`` / ``encode_text`` written out from the open_clip state dict."""
    v, t = cfg["vision_cfg"], cfg["text_cfg"]
    vw, tw = v["width"], t["width"]
    x = F.conv2d(pixels, sd["visual.conv1.weight"], stride=v["patch_size"])  # [B, W, g, g]
    x = x.flatten(2).transpose(1, 2)
    x = (
        torch.cat([sd["visual.class_embedding"].expand(x.shape[0], 1, -1), x], dim=1)
        + sd["visual.positional_embedding"]
    )
    x = F.layer_norm(x, (vw,), sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"])
    x = _resblocks(x, sd, "visual.transformer.resblocks.", v["layers"], vw // v["head_width"])
    x = F.layer_norm(x[:, 0], (vw,), sd["visual.ln_post.weight"], sd["visual.ln_post.bias"])
    image = x @ sd["visual.proj"]
    n = text_ids.shape[1]
    mask = torch.full((n, n), float("-inf")).triu_(1)
    y = sd["token_embedding.weight"][text_ids] + sd["positional_embedding"][:n]
    y = _resblocks(y, sd, "transformer.resblocks.", t["layers"], t["heads"], mask=mask)
    y = F.layer_norm(y, (tw,), sd["ln_final.weight"], sd["ln_final.bias"])
    text = y[torch.arange(y.shape[0]), text_ids.argmax(dim=-1)] @ sd["text_projection"]
    return F.normalize(image, dim=-1), F.normalize(text, dim=-1)


@pytest.fixture(scope="module")
def hps_checkpoint(tmp, clip_tok):
    """A tiny open_clip-format HPS checkpoint: {'state_dict': {'module.' + open_clip key: tensor}}."""
    from transformers import CLIPModel, CLIPTokenizer

    from rocm_ray.rewards.hps import clip_config_from_open_clip, transformers_to_open_clip

    tok = CLIPTokenizer.from_pretrained(str(clip_tok))
    cfg = json.loads(json.dumps(TINY_OPEN_CLIP))
    cfg["text_cfg"]["vocab_size"] = len(tok)
    torch.manual_seed(7)
    model = CLIPModel(clip_config_from_open_clip(cfg, eos_token_id=tok.eos_token_id)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    sd = transformers_to_open_clip(model.state_dict())
    folder = tmp / "hps"
    folder.mkdir()
    torch.save(
        {"epoch": 1, "state_dict": {"module." + k: v for k, v in sd.items()}}, folder / "HPS_v2_compressed.pt"
    )
    torch.save(sd, folder / "HPS_v2.1_compressed.pt")  # a bare state dict works too
    return folder, cfg, model, sd


def test_open_clip_key_mapping_round_trips(hps_checkpoint):
    from rocm_ray.rewards.hps import open_clip_to_transformers

    _, _, model, sd = hps_checkpoint
    assert "visual.transformer.resblocks.1.attn.in_proj_weight" in sd and sd["visual.proj"].shape == (32, 24)
    back = open_clip_to_transformers(sd)
    ref = {k: v for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    assert set(back) == set(ref)
    assert all(torch.equal(back[k], ref[k]) for k in ref)


def test_hps_matches_open_clip_reference_forward(hps_checkpoint, clip_tok):
    """Loaded through the mapping, the transformers model computes open_clip's features and HPS score."""
    folder, cfg, model, sd = hps_checkpoint
    scorer = build_scorer("hpsv2", path=str(folder), tokenizer_path=str(clip_tok), model_config=cfg)
    assert scorer.name == "hpsv2" and scorer.differentiable
    images = smooth_images(3, 48, 40, seed=2)
    ours = assert_grad_ok(scorer, images)

    pixels = preprocess_images(images, scorer.preprocess_config)  # checked against ResizeMaxSize above
    tok = scorer.tokenizer(PROMPTS, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    ids = tok.input_ids * tok.attention_mask  # open_clip pads with 0
    with torch.no_grad():
        img, txt = open_clip_reference_features(sd, cfg, pixels, ids)
    ref = (img * txt).sum(-1)
    assert torch.allclose(ours, ref, atol=1e-5), (ours, ref)
    assert ours.abs().max() <= 1.0 and ours.std() > 1e-3
    with torch.no_grad():  # and the transformers model the checkpoint was written from agrees
        out = model.get_image_features(pixel_values=pixels)
        hf_img = F.normalize(
            getattr(out, "pooler_output", out), dim=-1
        )  # transformers 5 returns an output object
    assert torch.allclose(hf_img, img, atol=1e-5)


def test_hpsv21_reads_its_own_file_and_bare_state_dicts(hps_checkpoint, clip_tok):
    folder, cfg, _, _ = hps_checkpoint
    v2 = build_scorer("hpsv2", path=str(folder), tokenizer_path=str(clip_tok), model_config=cfg)
    v21 = build_scorer("hpsv21", path=str(folder), tokenizer_path=str(clip_tok), model_config=cfg)
    assert v21.name == "hpsv21" and v21.checkpoint_path.name == "HPS_v2.1_compressed.pt"
    images = smooth_images(2, 32, 32)
    assert torch.allclose(v2.score(images, PROMPTS[:2]), v21.score(images, PROMPTS[:2]), atol=1e-6)


def test_hps_training_checkpoint_with_python_objects_loads_with_weights_only(tmp, hps_checkpoint, clip_tok):
    """Training checkpoints may pickle plain data next to the tensors (argparse args, numpy scalars): loaded with
    weights_only=True; anything else in the pickle is refused, never unpickled."""
    import argparse
    import pathlib

    import numpy as np

    _, cfg, _, sd = hps_checkpoint
    folder = tmp / "hps_training_ckpt"
    folder.mkdir()
    torch.save({"args": argparse.Namespace(lr=1e-5, wd=np.float64(0.1)), "state_dict": sd},
               folder / "HPS_v2_compressed.pt")
    scorer = build_scorer("hpsv2", path=str(folder), tokenizer_path=str(clip_tok), model_config=cfg)
    assert scorer.score(smooth_images(1, 32, 32), ["a cat"]).shape == (1,)
    torch.save({"args": pathlib.PurePosixPath("/x"), "state_dict": sd}, folder / "HPS_v2_compressed.pt")
    with pytest.raises(RewardModelLoadError, match="weights_only=True"):
        build_scorer("hpsv2", path=str(folder), tokenizer_path=str(clip_tok), model_config=cfg)


def test_hps_missing_and_corrupt_checkpoints(tmp, hps_checkpoint, clip_tok, hf_cache):
    folder, cfg, _, sd = hps_checkpoint
    with pytest.raises(RewardModelNotFoundError) as err:  # default: the HF cache, which is empty
        build_scorer("hpsv2", tokenizer_path=str(clip_tok), model_config=cfg)
    msg = str(err.value)
    assert "HPS_v2_compressed.pt" in msg and "xswu/HPSv2" in msg and "HPS v2.0" in msg

    with pytest.raises(RewardModelNotFoundError) as err:
        build_scorer("hpsv21", path=str(tmp), tokenizer_path=str(clip_tok), model_config=cfg)
    assert "HPS_v2.1_compressed.pt" in str(err.value)

    bad = tmp / "hps_bad"
    bad.mkdir(exist_ok=True)
    (bad / "HPS_v2_compressed.pt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(RewardModelLoadError) as err:
        build_scorer("hpsv2", path=str(bad), tokenizer_path=str(clip_tok), model_config=cfg)
    assert "HPS_v2_compressed.pt" in str(err.value) and "xswu/HPSv2" in str(err.value)

    partial = {k: v for k, v in sd.items() if "resblocks.1." not in k}
    torch.save({"state_dict": partial}, bad / "HPS_v2_compressed.pt")
    with pytest.raises(RewardModelLoadError) as err:
        build_scorer("hpsv2", path=str(bad), tokenizer_path=str(clip_tok), model_config=cfg)
    assert "missing" in str(err.value)

    with pytest.raises(RewardModelLoadError) as err:  # a real-size ViT-H-14 config does not fit a tiny file
        build_scorer(
            "hpsv2",
            path=str(folder),
            tokenizer_path=str(clip_tok),
            model_config={**cfg, "vision_cfg": {**cfg["vision_cfg"], "layers": 3}},
        )
    assert "HPS" in str(err.value)


def test_hps_checkpoint_found_in_hf_cache(hps_checkpoint, clip_tok, hf_cache):
    folder, cfg, _, _ = hps_checkpoint
    fake_hf_cache(hf_cache, "xswu/HPSv2", {"HPS_v2_compressed.pt": folder / "HPS_v2_compressed.pt"})
    scorer = build_scorer("hpsv2", tokenizer_path=str(clip_tok), model_config=cfg)
    assert scorer.checkpoint_path.name == "HPS_v2_compressed.pt"


def test_vit_h_14_config_is_the_open_clip_one():
    from rocm_ray.rewards.hps import VIT_H_14, clip_config_from_open_clip

    c = clip_config_from_open_clip(VIT_H_14, eos_token_id=49407)
    v, t = c.vision_config, c.text_config
    assert (v.hidden_size, v.num_hidden_layers, v.num_attention_heads, v.patch_size, v.intermediate_size) == (
        1280,
        32,
        16,
        14,
        5120,
    )
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.max_position_embeddings) == (
        1024,
        24,
        16,
        77,
    )
    assert (c.projection_dim, v.hidden_act, v.layer_norm_eps, t.eos_token_id) == (1024, "gelu", 1e-5, 49407)


# ----------------------------------------------------------------------------------------------
# ImageReward: original BLIP keys -> transformers Blip classes
# ----------------------------------------------------------------------------------------------


def blip_reference_reward(sd, pixels, ids, attn, v_heads, t_heads):
    """ImageReward.score written out from BLIP's vit.py / med.py on the original key names."""

    def ln(x, p, eps):
        return F.layer_norm(x, (x.shape[-1],), sd[p + ".weight"], sd[p + ".bias"], eps)

    def lin(x, p):
        return F.linear(x, sd[p + ".weight"], sd[p + ".bias"])

    v = "blip.visual_encoder."
    x = (
        F.conv2d(
            pixels,
            sd[v + "patch_embed.proj.weight"],
            sd[v + "patch_embed.proj.bias"],
            stride=sd[v + "patch_embed.proj.weight"].shape[-1],
        )
        .flatten(2)
        .transpose(1, 2)
    )
    x = torch.cat([sd[v + "cls_token"].expand(x.shape[0], -1, -1), x], 1) + sd[v + "pos_embed"]
    b, n, c = x.shape
    i = 0
    while f"{v}blocks.{i}.norm1.weight" in sd:
        p = f"{v}blocks.{i}."
        h = ln(x, p + "norm1", 1e-6)
        qkv = lin(h, p + "attn.qkv").reshape(b, n, 3, v_heads, c // v_heads).permute(2, 0, 3, 1, 4)
        a = ((qkv[0] @ qkv[1].transpose(-2, -1)) * (c // v_heads) ** -0.5).softmax(-1)
        x = x + lin((a @ qkv[2]).transpose(1, 2).reshape(b, n, c), p + "attn.proj")
        x = x + lin(F.gelu(lin(ln(x, p + "norm2", 1e-6), p + "mlp.fc1")), p + "mlp.fc2")
        i += 1
    image_embeds = ln(x, v + "norm", 1e-6)

    t = "blip.text_encoder."

    def attention(hq, hkv, p, mask):
        d = hq.shape[-1]
        hd = d // t_heads

        def split(z):
            return z.view(z.shape[0], z.shape[1], t_heads, hd).transpose(1, 2)

        q, k, vv = (
            split(lin(hq, p + "self.query")),
            split(lin(hkv, p + "self.key")),
            split(lin(hkv, p + "self.value")),
        )
        s = q @ k.transpose(-1, -2) / math.sqrt(hd)
        if mask is not None:
            s = s + mask
        ctx = (s.softmax(-1) @ vv).transpose(1, 2).reshape(hq.shape)
        return ln(lin(ctx, p + "output.dense") + hq, p + "output.LayerNorm", 1e-12)

    L = ids.shape[1]
    y = sd[t + "embeddings.word_embeddings.weight"][ids] + sd[t + "embeddings.position_embeddings.weight"][:L]
    y = ln(y, t + "embeddings.LayerNorm", 1e-12)
    ext = (1.0 - attn[:, None, None, :].float()) * -10000.0  # med.py's extended mask
    i = 0
    while f"{t}encoder.layer.{i}.attention.self.query.weight" in sd:
        p = f"{t}encoder.layer.{i}."
        y = attention(y, y, p + "attention.", ext)
        y = attention(y, image_embeds, p + "crossattention.", None)
        y = ln(
            lin(F.gelu(lin(y, p + "intermediate.dense")), p + "output.dense") + y,
            p + "output.LayerNorm",
            1e-12,
        )
        i += 1
    r = y[:, 0]
    for idx in (0, 2, 4, 6, 7):
        r = lin(r, f"mlp.layers.{idx}")
    return (r.squeeze(-1) - 0.16717362830052426) / 1.0333394966054072


@pytest.fixture(scope="module")
def bert_tok(tmp) -> Path:
    return write_bert_vocab(tmp / "bert")


@pytest.fixture(scope="module")
def imagereward_checkpoint(tmp, bert_tok):
    from transformers import BertTokenizer, BlipTextConfig, BlipVisionConfig
    from transformers.models.blip.modeling_blip import BlipVisionModel
    from transformers.models.blip.modeling_blip_text import BlipTextModel

    from rocm_ray.rewards.imagereward import transformers_to_imagereward

    vocab = len(BertTokenizer.from_pretrained(str(bert_tok))) + 2  # BLIP adds [DEC] and [ENC]
    torch.manual_seed(11)
    vision = BlipVisionModel(
        BlipVisionConfig(
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=3,
            image_size=32,
            patch_size=8,
            layer_norm_eps=1e-6,
        )
    ).eval()
    text = BlipTextModel(
        BlipTextConfig(
            vocab_size=vocab,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            encoder_hidden_size=48,
            max_position_embeddings=40,
            bos_token_id=None,
            sep_token_id=None,
            is_decoder=True,
        ),
        add_pooling_layer=False,
    ).eval()
    with torch.no_grad():
        for p in [*vision.parameters(), *text.parameters()]:
            p.add_(0.2 * torch.randn_like(p))
    head = tiny_head_state_dict(32, seed=3)
    sd = transformers_to_imagereward(vision.state_dict(), text.state_dict(), head)
    sd["blip.vision_proj.weight"] = torch.randn(8, 48)  # present in the real file, unused by the score
    sd["blip.text_encoder.embeddings.position_ids"] = torch.arange(40)[None]
    folder = tmp / "imagereward"
    folder.mkdir()
    torch.save(sd, folder / "ImageReward.pt")
    (folder / "med_config.json").write_text(
        json.dumps(
            {"num_attention_heads": 2, "layer_norm_eps": 1e-12, "hidden_size": 32, "encoder_width": 48}
        )
    )
    return folder, sd


def test_imagereward_key_mapping_round_trips(imagereward_checkpoint):
    from rocm_ray.rewards.imagereward import imagereward_to_transformers, transformers_to_imagereward

    _, sd = imagereward_checkpoint
    assert "blip.visual_encoder.blocks.1.attn.qkv.weight" in sd and "blip.visual_encoder.cls_token" in sd
    v, t, h = imagereward_to_transformers(sd)
    assert (
        "encoder.layers.1.self_attn.qkv.weight" in v and "encoder.layer.1.crossattention.self.key.weight" in t
    )
    back = transformers_to_imagereward(v, t, h)
    expected = {k for k in sd if not k.startswith("blip.vision_proj") and not k.endswith("position_ids")}
    assert set(back) == expected and all(torch.equal(back[k], sd[k]) for k in expected)


def test_imagereward_matches_blip_reference_forward(imagereward_checkpoint, bert_tok):
    folder, sd = imagereward_checkpoint
    scorer = build_scorer("imagereward", path=str(folder), tokenizer_path=str(bert_tok), vision_heads=3)
    assert scorer.name == "imagereward" and scorer.differentiable
    images = smooth_images(3, 40, 48, seed=4)  # even crop margin: torchvision round == HF floor
    ours = assert_grad_ok(scorer, images)

    # official preprocessing (Resize(32, bicubic) on PIL, CenterCrop, ToTensor, Normalize) = PIL processor
    pixels = hf_pixels(clip_pil_processor(32, 32), images)
    tok = scorer.tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    with torch.no_grad():
        ref = blip_reference_reward(sd, pixels, tok.input_ids, tok.attention_mask, v_heads=3, t_heads=2)
    assert torch.allclose(ours, ref, atol=5e-3), (ours, ref)
    with torch.no_grad():  # same pixels: the port is exact
        ref_exact = blip_reference_reward(
            sd,
            preprocess_images(images, scorer.preprocess_config),
            tok.input_ids,
            tok.attention_mask,
            v_heads=3,
            t_heads=2,
        )
    assert torch.allclose(ours, ref_exact, atol=1e-5)
    assert ours.std() > 0.03  # images are told apart: the checks above are not vacuous


def test_imagereward_missing_and_corrupt_checkpoints(tmp, imagereward_checkpoint, bert_tok, hf_cache):
    folder, sd = imagereward_checkpoint
    with pytest.raises(RewardModelNotFoundError) as err:
        build_scorer("imagereward", tokenizer_path=str(bert_tok))
    assert "ImageReward.pt" in str(err.value) and "THUDM/ImageReward" in str(err.value)

    with pytest.raises(RewardModelNotFoundError) as err:
        build_scorer("imagereward", path=str(folder))  # default tokenizer bert-base-uncased: not cached
    assert "bert-base-uncased" in str(err.value)

    bad = tmp / "ir_bad"
    bad.mkdir()
    (bad / "ImageReward.pt").write_bytes(b"\x80\x02garbage")
    with pytest.raises(RewardModelLoadError) as err:
        build_scorer("imagereward", path=str(bad), tokenizer_path=str(bert_tok))
    assert "ImageReward" in str(err.value) and "THUDM/ImageReward" in str(err.value)

    torch.save({k: v for k, v in sd.items() if not k.startswith("mlp.")}, bad / "ImageReward.pt")
    with pytest.raises(RewardModelLoadError) as err:
        build_scorer("imagereward", path=str(bad), tokenizer_path=str(bert_tok))
    assert "mlp" in str(err.value)


# ----------------------------------------------------------------------------------------------
# JPEG
# ----------------------------------------------------------------------------------------------


def test_jpeg_rewards_match_ddpo():
    import io

    images = torch.cat(
        [
            torch.full((1, 3, 32, 32), 0.5),
            torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)),
        ]
    )
    inc = build_scorer("jpeg_incompressibility")
    comp = build_scorer("jpeg_compressibility")
    assert not inc.differentiable and not comp.differentiable
    sizes = inc.score(images, ["", ""])
    arr = (images * 255).round().clamp(0, 255).to(torch.uint8).numpy().transpose(0, 2, 3, 1)
    ref = []
    for a in arr:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="JPEG", quality=95)
        ref.append(buf.tell() / 1000)
    assert sizes.tolist() == pytest.approx(ref)
    assert torch.equal(comp.score(images, ["", ""]), -sizes)
    assert sizes[0] < sizes[1]  # a flat image compresses better than noise


# ----------------------------------------------------------------------------------------------
# Registry, mixture, differentiability
# ----------------------------------------------------------------------------------------------


class _Toy:
    def __init__(self, name, fn, differentiable=True):
        self.name, self.fn, self.differentiable = name, fn, differentiable

    def score(self, images, prompts):
        return self.fn(images)


def test_registry_names_and_errors():
    assert set(available_scorers()) == {
        "clip_score",
        "pickscore",
        "hpsv2",
        "hpsv21",
        "imagereward",
        "aesthetic",
        "jpeg_compressibility",
        "jpeg_incompressibility",
        "toy_brightness",
        "toy_redness",
    }
    with pytest.raises(ValueError, match="unknown reward 'hps'.*hpsv2"):
        build_scorer("hps")
    with pytest.raises(ValueError, match="unknown option.*head_paht.*allowed: head_path"):
        build_scorer("aesthetic", head_paht="x")
    assert "tokenizer_path" in scorer_options("hpsv2") and "version" not in scorer_options("hpsv2")
    with pytest.raises(ValueError, match="no weights"):
        build_scorer("jpeg_compressibility", path="x")
    assert build_scorer("jpeg_compressibility", dtype="bf16").name == "jpeg_compressibility"


def test_mixture_weighted_sum_components_and_flag():
    images = smooth_images(2, 8, 8)
    bright = _Toy("bright", lambda x: x.mean(dim=(1, 2, 3)))
    red = _Toy("red", lambda x: x[:, 0].mean(dim=(1, 2)))
    mix = RewardMixture([(bright, 2.0), (red, -0.5)])
    assert mix.differentiable and mix.name == "2*bright+-0.5*red"
    comps = mix.score_components(images, ["", ""])
    assert set(comps) == {"bright", "red"}
    assert torch.allclose(mix.score(images, ["", ""]), 2 * comps["bright"] - 0.5 * comps["red"])
    x = images.clone().requires_grad_(True)
    mix.score(x, ["", ""]).sum().backward()
    assert x.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="distinct names"):
        RewardMixture([(bright, 1.0), (bright, 1.0)])
    with pytest.raises(ValueError, match="one prompt per image"):
        mix.score(images, ["only one"])


def test_require_differentiable_names_the_culprit():
    jpeg = build_scorer("jpeg_compressibility")
    with pytest.raises(ValueError) as err:
        require_differentiable(jpeg)
    msg = str(err.value)
    assert "'jpeg_compressibility' is not differentiable" in msg and "ROCM backpropagates" in msg
    assert "policy-gradient baseline" in msg and "hpsv2" in msg
    mix = RewardMixture([(_Toy("bright", lambda x: x.mean((1, 2, 3))), 1.0), (jpeg, 0.1)])
    assert not mix.differentiable
    with pytest.raises(ValueError, match="'jpeg_compressibility' is not differentiable"):
        require_differentiable(mix)
    require_differentiable(_Toy("ok", lambda x: x.mean((1, 2, 3))))


# ----------------------------------------------------------------------------------------------
# Real-size layouts, on the meta device (shapes only, no memory, no weights)
# ----------------------------------------------------------------------------------------------


def _open_clip_vit_h_14_shapes() -> dict[str, tuple[int, ...]]:
    """The open_clip ViT-H-14 state-dict layout (the HPS checkpoints'), written from open_clip's modules."""
    shapes: dict[str, tuple[int, ...]] = {
        "positional_embedding": (77, 1024),
        "text_projection": (1024, 1024),
        "logit_scale": (),
        "token_embedding.weight": (49408, 1024),
        "ln_final.weight": (1024,),
        "ln_final.bias": (1024,),
        "visual.class_embedding": (1280,),
        "visual.positional_embedding": (257, 1280),
        "visual.proj": (1280, 1024),
        "visual.conv1.weight": (1280, 3, 14, 14),
        "visual.ln_pre.weight": (1280,),
        "visual.ln_pre.bias": (1280,),
        "visual.ln_post.weight": (1280,),
        "visual.ln_post.bias": (1280,),
    }
    for prefix, layers, w in (
        ("visual.transformer.resblocks.", 32, 1280),
        ("transformer.resblocks.", 24, 1024),
    ):
        for i in range(layers):
            p = f"{prefix}{i}."
            shapes.update({
                p + "ln_1.weight": (w,), p + "ln_1.bias": (w,),
                p + "ln_2.weight": (w,), p + "ln_2.bias": (w,),
                p + "attn.in_proj_weight": (3 * w, w), p + "attn.in_proj_bias": (3 * w,),
                p + "attn.out_proj.weight": (w, w), p + "attn.out_proj.bias": (w,),
                p + "mlp.c_fc.weight": (4 * w, w), p + "mlp.c_fc.bias": (4 * w,),
                p + "mlp.c_proj.weight": (w, 4 * w), p + "mlp.c_proj.bias": (w,),
            })  # fmt: skip
    return shapes


def test_vit_h_14_open_clip_layout_maps_onto_the_transformers_model():
    from transformers import CLIPModel

    from rocm_ray.rewards.hps import VIT_H_14, clip_config_from_open_clip, open_clip_to_transformers

    sd = {k: torch.empty(s, device="meta") for k, s in _open_clip_vit_h_14_shapes().items()}
    mapped = open_clip_to_transformers(sd)
    with torch.device("meta"):
        model = CLIPModel(clip_config_from_open_clip(VIT_H_14, eos_token_id=49407))
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    assert {k: tuple(v.shape) for k, v in mapped.items()} == expected


def test_imagereward_layout_infers_blip_vit_l_and_bert_base():
    from rocm_ray.rewards.imagereward import blip_configs_from_state_dicts, imagereward_to_transformers

    v, t = "blip.visual_encoder.", "blip.text_encoder."
    shapes = {
        v + "cls_token": (1, 1, 1024),
        v + "pos_embed": (1, 197, 1024),
        v + "patch_embed.proj.weight": (1024, 3, 16, 16),
        v + "patch_embed.proj.bias": (1024,),
        v + "norm.weight": (1024,),
        v + "norm.bias": (1024,),
        t + "embeddings.word_embeddings.weight": (30524, 768),
        t + "embeddings.position_embeddings.weight": (512, 768),
        t + "embeddings.LayerNorm.weight": (768,),
        t + "embeddings.LayerNorm.bias": (768,),
        t + "embeddings.position_ids": (1, 512),
        "blip.vision_proj.weight": (256, 1024),
        "blip.text_proj.weight": (256, 768),
        "mlp.layers.0.weight": (1024, 768),
    }
    for i in range(24):
        p = f"{v}blocks.{i}."
        for name, s in (
            ("norm1", (1024,)),
            ("norm2", (1024,)),
            ("attn.qkv", (3072, 1024)),
            ("attn.proj", (1024, 1024)),
            ("mlp.fc1", (4096, 1024)),
            ("mlp.fc2", (1024, 4096)),
        ):
            shapes[f"{p}{name}.weight"] = s
            shapes[f"{p}{name}.bias"] = (s[0],)
    for i in range(12):
        p = f"{t}encoder.layer.{i}."
        shapes[p + "intermediate.dense.weight"] = (3072, 768)
        shapes[p + "attention.self.query.weight"] = (768, 768)
        shapes[p + "crossattention.self.key.weight"] = (768, 1024)
    sd = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    vision, text, head = imagereward_to_transformers(sd)
    vc, tc = blip_configs_from_state_dicts(vision, text, {"num_attention_heads": 12, "layer_norm_eps": 1e-12})
    assert (vc.hidden_size, vc.num_hidden_layers, vc.num_attention_heads, vc.patch_size, vc.image_size) == (
        1024,
        24,
        16,
        16,
        224,
    )
    assert (vc.intermediate_size, vc.layer_norm_eps) == (4096, 1e-6)
    assert (tc.vocab_size, tc.hidden_size, tc.num_hidden_layers, tc.num_attention_heads) == (
        30524,
        768,
        12,
        12,
    )
    assert (tc.encoder_hidden_size, tc.intermediate_size, tc.max_position_embeddings) == (1024, 3072, 512)
    assert set(head) == {"layers.0.weight"} and "embeddings.position_ids" not in text


# ---------------------------------------------------------------------- prompt clean-up (open_clip / HPS)

DIRTY_PROMPTS = {  # as typed / scraped -> what open_clip's tokenizer sees after ftfy + html.unescape + whitespace
    "rock &amp; roll poster": "rock & roll poster",
    "a sign that says “open”": 'a sign that says "open"',
    "a ﬁsh in a bowl": "a fish in a bowl",
    "  A  Cat\n on a   MAT ": "a cat on a mat",
    "caf&eacute; at night": "café at night",
}


def test_open_clip_clean_matches_open_clips_rules():
    from rocm_ray.rewards.text import open_clip_clean

    for dirty, clean in DIRTY_PROMPTS.items():
        assert open_clip_clean(dirty) == clean, dirty
    assert open_clip_clean("&amp;amp;") == "&"  # open_clip unescapes twice


def test_hps_tokenizes_dirty_prompts_as_the_official_scorer(hps_checkpoint, clip_tok):
    """HPS token ids (and text features) of a dirty prompt equal those of its cleaned form, while the bare
    transformers tokenizer (no ftfy / HTML unescape) tokenizes them differently."""
    folder, cfg, _, _ = hps_checkpoint
    scorer = build_scorer("hpsv2", path=str(folder), tokenizer_path=str(clip_tok), model_config=cfg)
    dirty, clean = list(DIRTY_PROMPTS), list(DIRTY_PROMPTS.values())
    assert torch.equal(scorer.tokenize(dirty), scorer.tokenize(clean))

    def bare(p):
        return scorer.tokenizer(p, padding="max_length", max_length=16, truncation=True, return_tensors="pt").input_ids

    differs = [d for d, c in DIRTY_PROMPTS.items() if not torch.equal(bare([d]), bare([c]))]
    assert set(differs) >= {"rock &amp; roll poster", "a sign that says “open”", "a ﬁsh in a bowl"}, differs
    with torch.no_grad():
        assert torch.equal(scorer.text_features(dirty), scorer.text_features(clean))
