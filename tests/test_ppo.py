"""The RLCM-style PPO baseline (algorithm.name: ppo): the loss by hand, the log-probs against
torch.distributions, training on a toy and a non-differentiable reward, and the Ray path (1 worker) against
the in-process trainer."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from rocm_ray.config import RecipeError, load_recipe
from rocm_ray.ppo import gaussian_log_prob, group_advantages, minibatch_indices, ppo_clip_loss

DEBUG = "recipes/tiny_debug.yaml"
TOL_RAY_ONE_WORKER = 5e-5  # PPO, 1 Ray Train worker + 1 reward replica vs in-process (measured 8.5e-6)


# ------------------------------------------------------------------------------------- the loss by hand


def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 3.0, 10.0, 10.0, 2.0, 4.0, 6.0, 8.0])
    adv = group_advantages(r, group_size=4)
    # group 1: mean 6, population std sqrt(((5^2 + 3^2 + 4^2 + 4^2) / 4)) = sqrt(16.5)
    s1 = math.sqrt(16.5)
    # group 2: mean 5, std sqrt((9 + 1 + 1 + 9) / 4) = sqrt(5)
    s2 = math.sqrt(5.0)
    expected = [-5 / s1, -3 / s1, 4 / s1, 4 / s1, -3 / s2, -1 / s2, 1 / s2, 3 / s2]
    assert adv.tolist() == pytest.approx(expected, rel=1e-6)
    clipped = group_advantages(torch.tensor([0.0, 0.0, 0.0, 100.0]), group_size=4, clip_max=1.5)
    # unclipped: (-25, -25, -25, 75) / sqrt(1875) = (-0.577, -0.577, -0.577, 1.732) -> 1.732 clipped to 1.5
    assert clipped.tolist() == pytest.approx([-25 / math.sqrt(1875)] * 3 + [1.5], rel=1e-6)
    with pytest.raises(ValueError, match="multiple of group_size"):
        group_advantages(torch.zeros(6), group_size=4)


def test_ppo_clip_loss_by_hand():
    old = torch.zeros(3, 2)
    # ratios: exp(log 1.5) = 1.5 (clipped to 1.2), exp(log 0.9) = 0.9, exp(log 0.5) = 0.5, 1, 1.1, exp(log 2)
    new = torch.log(torch.tensor([[1.5, 0.9], [0.5, 1.0], [1.1, 2.0]])).requires_grad_(True)
    adv = torch.tensor([2.0, -1.0, 0.5])
    terms = ppo_clip_loss(new, old, adv, clip_range=0.2)
    # per element max(-A rho, -A clip(rho, 0.8, 1.2)):
    #   A=2:   rho 1.5 -> max(-3.0, -2.4) = -2.4 ; rho 0.9 -> max(-1.8, -1.8) = -1.8
    #   A=-1:  rho 0.5 -> max(0.5, 0.8)   = 0.8  ; rho 1.0 -> 1.0
    #   A=0.5: rho 1.1 -> max(-0.55, -0.55) = -0.55 ; rho 2.0 -> max(-1.0, -0.6) = -0.6
    expected = (-2.4 - 1.8 + 0.8 + 1.0 - 0.55 - 0.6) / 6
    assert terms.policy_loss == pytest.approx(expected, rel=1e-6)
    assert float(terms.surrogate.detach()) == pytest.approx(expected, rel=1e-6)
    assert terms.clip_fraction == pytest.approx(3 / 6)  # 1.5, 0.5 and 2.0 lie outside [0.8, 1.2]
    terms.surrogate.backward()
    # d/d logp of -A rho = -A rho where the unclipped term is active, 0 where the clipped one is
    grad = new.grad
    assert grad[0, 0] == 0 and grad[1, 0] == 0 and grad[2, 1] == 0  # clipped: no gradient
    assert float(grad[0, 1]) == pytest.approx(-2.0 * 0.9 / 6, rel=1e-6)
    assert float(grad[1, 1]) == pytest.approx(1.0 * 1.0 / 6, rel=1e-6)
    assert float(grad[2, 0]) == pytest.approx(-0.5 * 1.1 / 6, rel=1e-6)
    # the penalty: beta * mean over samples of the per-step sum
    pen = torch.tensor([[1.0, 2.0], [0.0, 0.0], [3.0, 0.0]])
    with_pen = ppo_clip_loss(new.detach(), old, adv, 0.2, penalty=pen, beta=0.5)
    assert float(with_pen.surrogate) == pytest.approx(expected + 0.5 * (3 + 0 + 3) / 3, rel=1e-6)
    assert with_pen.policy_loss == pytest.approx(expected, rel=1e-6)


def test_minibatches_keep_prompt_groups_and_cover_the_batch():
    parts = minibatch_indices(4, 3, 2, torch.Generator().manual_seed(0))
    assert len(parts) == 2 and all(len(p) == 6 for p in parts)
    allidx = sorted(torch.cat(parts).tolist())
    assert allidx == list(range(12))
    for p in parts:
        groups = p.view(-1, 3)
        assert all(g.tolist() == [int(g[0]), int(g[0]) + 1, int(g[0]) + 2] and int(g[0]) % 3 == 0 for g in groups)


# --------------------------------------------------------------------- log-probs of real sampled steps


def test_log_prob_of_sampled_steps_is_the_gaussian_density(tiny_pipe):
    from rocm_ray.models.policy import make_policy
    from rocm_ray.train.ppo_step import kernel_mean, sample_rollout

    policy = make_policy(copy.deepcopy(tiny_pipe), lora_rank=4, lora_alpha=4.0, seed=0)
    with torch.no_grad():  # move off the reference so the test is not about a special point
        for n, p in policy.unet.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    prompts, seeds = ["a digit 1", "a digit 1", "a digit 7", "a digit 7"], [3, 4, 5, 6]
    ro = sample_rollout(policy, prompts, seeds, policy.eps_fn(), num_inference_steps=4, guidance_scale=8.0,
                        terminal="auto", ref_eps_fn=policy.ref_eps_fn())
    assert len(ro.samples) == 4 and ro.old_log_probs.shape == (4, 4)  # 3 noisy steps + RLCM's noisy last one
    abar = policy.scheduler.alphas_cumprod.double()
    ts = ro.timesteps
    idx = torch.arange(4)
    for k in range(4):
        a_next = float(abar[ts[k + 1]]) if k < 3 else float(abar[ts[k]])
        assert ro.variances[k] == pytest.approx(1 - a_next, rel=1e-12)
        with torch.no_grad():
            mean = kernel_mean(policy.eps_fn(), policy, ro, k, idx)  # [B, C, h, w]
        dist = torch.distributions.Normal(mean.double(), math.sqrt(1 - a_next))
        joint = dist.log_prob(ro.samples[k].double()).flatten(1).sum(1)  # [B]
        dims = ro.samples[k][0].numel()
        torch.testing.assert_close(ro.old_log_probs[:, k].double(), joint / dims, rtol=0, atol=1e-5)
        torch.testing.assert_close(gaussian_log_prob(ro.samples[k], mean, ro.variances[k], "sum").double(),
                                   joint, rtol=1e-6, atol=1e-3)
        # the sampled step is the mean plus sqrt(var) standard noise: a standardized residual of scale 1
        z = (ro.samples[k] - mean) / math.sqrt(ro.variances[k])
        assert 0.5 < float(z.std()) < 1.5
    # the images are decoded from the last SAMPLED latent (RLCM's scheduler): not the noise-free one
    assert ro.images.shape == (4, 3, 16, 16) and 0 <= float(ro.images.min()) and float(ro.images.max()) <= 1


# ------------------------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def ppo_toy_run(tmp_path_factory):
    from rocm_ray.train.inprocess import train_inprocess

    out = tmp_path_factory.mktemp("ppo_toy")
    # the embedded tiny LCM (a trained model: the random one of tiny_debug barely reacts to any update)
    # toward its toy "aesthetic" reward (ink mass)
    recipe = load_recipe("recipes/tiny_kl.yaml", [
        f"train.output_dir={out}", "algorithm.name=ppo", "train.steps=5", "train.batch_size=8", "train.lr=0.003",
        "algorithm.ppo_clip_range=0.2", "algorithm.ppo_epochs=2", "algorithm.ppo_minibatches=2",
        "algorithm.beta=0.01", "algorithm.reduction=mean", "data.eval_seeds=2"])
    return recipe, train_inprocess(recipe)


def test_a_few_ppo_steps_raise_a_toy_reward(ppo_toy_run):
    recipe, res = ppo_toy_run
    rewards = [row["reward"] for row in res.metrics]
    assert rewards[-1] > rewards[0] + 1.0  # the sampled batches' reward rises (about 5 -> 20 measured)
    assert res.summary["reward_after"] > res.summary["reward_before"] + 1.0  # and on the fixed eval images
    assert res.summary["algorithm"] == "ppo"
    assert all(row["ppo_updates"] == 4 for row in res.metrics)  # 2 epochs x 2 minibatches
    assert res.metrics[0]["divergence"] == 0.0 and res.metrics[-1]["divergence"] > 0  # the KL penalty's
    assert (res.output_dir / "weights" / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert "clip_fraction" in (res.output_dir / "metrics.csv").read_text().splitlines()[0]


def test_ppo_trains_on_a_non_differentiable_reward_rocm_refuses_it(tmp_path, capsys):
    from rocm_ray.cli import main
    from rocm_ray.train.inprocess import train_inprocess

    jpeg = ["reward.models=[{name: jpeg_compressibility, weight: 1.0}]", "reward.scale=1.0"]
    with pytest.raises(RecipeError, match="not differentiable.*algorithm.name: ppo") as e:
        load_recipe(DEBUG, jpeg)
    assert e.value.key == "reward.models.0.name"
    assert main(["train", DEBUG, f"train.output_dir={tmp_path / 'rocm'}", *jpeg]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "Traceback" not in err and not (tmp_path / "rocm").exists()
    recipe = load_recipe(DEBUG, [*jpeg, "algorithm.name=ppo", "train.steps=2", f"train.output_dir={tmp_path}"])
    res = train_inprocess(recipe)
    assert len(res.metrics) == 2 and all(math.isfinite(r["loss"]) for r in res.metrics)
    assert res.metrics[0]["reward"] < 0  # -kB: a real JPEG size
    assert res.summary["reward_after"] != res.summary["reward_before"]


@pytest.mark.parametrize("override, key", [
    ("algorithm.ppo_group_size=3", "algorithm.ppo_group_size"),  # 4 images per step: 3 does not divide
    ("algorithm.ppo_minibatches=2", "algorithm.ppo_minibatches"),  # 1 prompt group: cannot split in 2
    ("algorithm.ppo_clip_range=0", "algorithm.ppo_clip_range"),
])
def test_ppo_recipe_errors(override, key):
    with pytest.raises(RecipeError) as e:
        load_recipe(DEBUG, ["algorithm.name=ppo", override])
    assert e.value.key == key


def test_pbt_refuses_ppo_trials():
    from rocm_ray.tune import check_search_space, parse_search_space

    recipe = load_recipe("recipes/tune_tiny_debug.yaml", ["algorithm.name=ppo", "algorithm.ppo_group_size=2",
                                                           "tune.scheduler=pbt",
                                                           "tune.search_space={train.lr: [0.01, 0.05]}"])
    with pytest.raises(RecipeError, match="ROCM only") as e:
        check_search_space(recipe, parse_search_space(recipe))
    assert e.value.key == "tune.scheduler"


# ----------------------------------------------------------------------------------- the Ray path


@pytest.mark.slow
def test_ppo_on_ray_with_one_worker_equals_in_process(tmp_path):
    ray = pytest.importorskip("ray")
    from rocm_ray.train.inprocess import train_inprocess
    from rocm_ray.train.ray_trainer import local_ray_options, stop_local_ray, train_ray

    common = ["algorithm.name=ppo", "train.steps=3", "train.batch_size=4", "train.lr=0.05",
              "algorithm.ppo_epochs=2", "algorithm.ppo_clip_range=0.2", "algorithm.beta=0.01"]
    local = train_inprocess(load_recipe(DEBUG, [*common, f"train.output_dir={tmp_path / 'local'}"]))
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=3, **local_ray_options())
    try:
        remote = train_ray(load_recipe(DEBUG, [*common, "train.num_workers=1", "ray.reward_num_cpus=0.5",
                                               f"train.output_dir={tmp_path / 'ray'}"]))
    finally:
        if started:
            stop_local_ray()
    assert len(remote.metrics) == len(local.metrics) == 3
    keys = ("loss", "reward", "divergence", "clip_fraction", "approx_kl")
    worst = max(abs(b[k] - a[k]) for a, b in zip(local.metrics, remote.metrics, strict=True) for k in keys)
    print(f"PPO Ray (1 worker) vs in-process: max |difference| of per-step metrics {worst:.3g}")
    assert worst <= TOL_RAY_ONE_WORKER
    assert remote.metrics[-1]["reward"] != remote.metrics[0]["reward"]  # it trained: not a frozen equality
    assert remote.summary["reward_after"] == pytest.approx(local.summary["reward_after"], abs=TOL_RAY_ONE_WORKER)
    assert (remote.output_dir / "weights" / "lora").is_dir() and (remote.output_dir / "summary.md").is_file()
