"""Loading LCM pipelines and turning them into a trainable policy with a frozen reference.

LoRA (peft, through diffusers' ``unet.add_adapter``): the reference is the same UNet with the adapter
disabled, so there is no second copy of the weights. Full fine-tuning: the reference is a frozen copy.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from rocm_ray.paths import resolve_path
from rocm_ray.sampling import EpsFn

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(FileNotFoundError):
    """An LCM pipeline could not be loaded; the message says what was tried and what to do."""


def load_pipeline(pretrained: str, revision: str | None = None, cache_dir: str | None = None,
                  dtype: str = "float32", device: str | torch.device = "cpu"):
    """Load a diffusers ``LatentConsistencyModelPipeline`` from a local folder, the HF cache, or ``embedded:``.

    Nothing is downloaded unless ``HF_HUB_OFFLINE`` is unset *and* the path is a hub id absent from the
    cache; on the machines this project tests on, a missing model is a clear error, not a hang.
    """
    from diffusers import LatentConsistencyModelPipeline

    from rocm_ray.train.progress import requiet

    requiet()  # the CLI's quiet run log covers diffusers' loading bars too (train/progress.py)
    if pretrained.startswith("random:"):  # a random-weight toy pipeline built offline (tests, tiny_debug)
        import tempfile

        from rocm_ray.models.tiny import build_random_pipeline

        seed = int(pretrained.split(":", 1)[1] or 0)
        with tempfile.TemporaryDirectory(prefix="rocm_ray_tok_") as tmp:  # the tokenizer is read into memory
            return build_random_pipeline(tmp, seed=seed).to(device)
    path = resolve_path(pretrained)
    local = Path(path).exists()
    if pretrained.startswith("embedded:") and not local:
        raise ModelLoadError(
            f"embedded model {pretrained!r} is not in this installation ({path} is missing): rebuild it with "
            "`rocm-ray build-tiny` or reinstall rocm_ray from a clone that has rocm_ray/assets/")
    if local and not (Path(path) / "model_index.json").is_file():
        raise ModelLoadError(f"{path} is not a diffusers pipeline folder (no model_index.json): point "
                             "model.pretrained at a folder written by save_pretrained, or a Hugging Face id")
    try:
        pipe = LatentConsistencyModelPipeline.from_pretrained(
            path, revision=revision, cache_dir=cache_dir, torch_dtype=DTYPES[dtype],
            safety_checker=None, requires_safety_checker=False,
            local_files_only=local or os.environ.get("HF_HUB_OFFLINE", "0") == "1",
        )
    except (OSError, ValueError) as e:
        raise ModelLoadError(
            f"cannot load the LCM pipeline {pretrained!r}: {e}\nGive model.pretrained as a local folder "
            "written by save_pretrained, or a Hugging Face id already in the cache (model.cache_dir), e.g. "
            "download it once with `huggingface-cli download SimianLuo/LCM_Dreamshaper_v7`.") from e
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


@dataclass
class Policy:
    """The parts of an LCM pipeline ROCM needs: a trainable UNet and a frozen everything else."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler: object
    lora: bool
    ref_unet: torch.nn.Module | None = None  # full fine-tuning only

    @property
    def time_cond_proj_dim(self) -> int | None:
        return self.unet.config.time_cond_proj_dim

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.unet.parameters() if p.requires_grad]

    def eps_fn(self, unet: torch.nn.Module | None = None) -> EpsFn:
        """The policy's noise prediction; ``unet`` may be a wrapper (DeepSpeed engine) of ``self.unet``."""
        net = unet if unet is not None else self.unet

        def fn(x: Tensor, t: int, w_emb: Tensor | None, text: Tensor) -> Tensor:
            return net(x, t, timestep_cond=w_emb, encoder_hidden_states=text, return_dict=False)[0]

        return fn

    def ref_eps_fn(self) -> EpsFn:
        """The frozen reference's noise prediction (adapter disabled, or the frozen copy)."""
        if not self.lora:
            ref = self.ref_unet

            def full(x: Tensor, t: int, w_emb: Tensor | None, text: Tensor) -> Tensor:
                return ref(x, t, timestep_cond=w_emb, encoder_hidden_states=text, return_dict=False)[0]

            return full
        unet = self.unet

        def lora_off(x: Tensor, t: int, w_emb: Tensor | None, text: Tensor) -> Tensor:
            unet.disable_adapters()
            try:
                return unet(x, t, timestep_cond=w_emb, encoder_hidden_states=text, return_dict=False)[0]
            finally:
                unet.enable_adapters()

        return lora_off


def make_policy(pipe, lora_rank: int = 8, lora_alpha: float = 8.0,
                lora_targets: list[str] | tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0"),
                seed: int = 0) -> Policy:
    """Freeze the pipeline and make its UNet trainable: a LoRA adapter (rank > 0) or all weights (rank 0).

    LoRA A matrices are initialized from ``seed`` (B = 0, so the policy starts equal to the reference).
    """
    for module in (pipe.vae, pipe.text_encoder, pipe.unet):
        module.requires_grad_(False)
        module.eval()
    unet = pipe.unet
    ref = None
    if lora_rank > 0:
        from peft import LoraConfig

        torch.manual_seed(seed)
        unet.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_alpha, init_lora_weights="gaussian",
                                    target_modules=list(lora_targets)))
        for name, p in unet.named_parameters():
            p.requires_grad_("lora_" in name)
    else:
        ref = copy.deepcopy(unet).requires_grad_(False)
        unet.requires_grad_(True)
    unet.train()
    return Policy(unet=unet, vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                  scheduler=pipe.scheduler, lora=lora_rank > 0, ref_unet=ref)


def lora_state_dict(unet: torch.nn.Module) -> dict[str, Tensor]:
    """The UNet's LoRA weights in diffusers' naming (what ``pipe.load_lora_weights`` reads)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    return convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))


def save_policy_weights(policy: Policy, out_dir: str | Path) -> Path:
    """Write the fine-tuned weights atomically: ``lora/pytorch_lora_weights.safetensors`` or ``unet/``.

    Written into a temporary folder first and renamed, so an interrupted save never leaves half a model.
    """
    import shutil

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = "lora" if policy.lora else "unet"
    tmp = out / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    if policy.lora:
        from diffusers import LatentConsistencyModelPipeline

        sd = {k: v.detach().float().cpu().contiguous() for k, v in lora_state_dict(policy.unet).items()}
        # the adapter config (rank, alpha, targets) goes into the file's metadata: without it diffusers'
        # load_lora_weights assumes alpha = rank and scales the update wrongly when lora_alpha != lora_rank
        meta = next(iter(policy.unet.peft_config.values())).to_dict()
        LatentConsistencyModelPipeline.save_lora_weights(str(tmp), unet_lora_layers=sd, safe_serialization=True,
                                                         unet_lora_adapter_metadata=meta)
    else:
        policy.unet.save_pretrained(str(tmp))
    final = out / name
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    return final
