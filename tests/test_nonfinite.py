"""Non-finite steps are skipped (nothing changes), counted and logged; too many in a row stop the run.

In-process: NaN/inf injected into the reward, the reward gradient, the divergence and (through a finite but
overflowing reward gradient) the parameter gradient; the weights and the AdamW state are compared before and
after every step. Ray: the same through the RewardService on 2 Ray Train workers (ZeRO 0: this project's skip;
ZeRO 2: DeepSpeed's overflow skip), and a stop that Ray Train does not retry.
"""

from __future__ import annotations

import csv
import math

import pytest
import torch

from rocm_ray.cli import main
from rocm_ray.config import load_recipe
from rocm_ray.train import inprocess as inproc
from rocm_ray.train import step as step_mod
from rocm_ray.train.nonfinite import inject_nonfinite
from rocm_ray.train.step import NonFiniteError

DEBUG = "recipes/tiny_debug.yaml"


def _read_csv(path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


class _Spy:
    """Counts steps through the reward calls and snapshots the weights and optimizer state at each step's start."""

    def __init__(self, monkeypatch, at: dict[int, str], nan_divergence_at: int | None = None):
        self.step = 0
        self.snapshots: dict[int, tuple] = {}
        self.policy = None
        self.opt = None
        real_score, real_build, real_divs = inproc.score_with_grad, inproc.build_policy, step_mod.step_divergences
        spy = self

        def build(*a, **kw):
            spy.policy = real_build(*a, **kw)
            return spy.policy

        class AdamW(torch.optim.AdamW):
            def __init__(self, *a, **kw):
                super().__init__(*a, **kw)
                spy.opt = self

        def score(scorer, images, prompts):
            spy.step += 1
            spy.snapshots[spy.step] = spy.state()
            inject = inject_nonfinite(lambda im, ps: real_score(scorer, im, ps), at, lambda: spy.step)
            return inject(images, prompts)

        def divs(*a, **kw):
            d = real_divs(*a, **kw)
            return d * math.nan if spy.step == nan_divergence_at else d

        monkeypatch.setattr(inproc, "build_policy", build)
        monkeypatch.setattr(inproc.torch.optim, "AdamW", AdamW)
        monkeypatch.setattr(inproc, "score_with_grad", score)
        monkeypatch.setattr(step_mod, "step_divergences", divs)

    def state(self) -> tuple:
        weights = {n: p.detach().clone() for n, p in self.policy.unet.named_parameters() if p.requires_grad}
        opt = {k: {kk: vv.clone() if torch.is_tensor(vv) else vv for kk, vv in v.items()}
               for k, v in self.opt.state.items()}
        return weights, opt


def _same(a: tuple, b: tuple) -> bool:
    (wa, oa), (wb, ob) = a, b
    if wa.keys() != wb.keys() or oa.keys() != ob.keys():
        return False
    if not all(torch.equal(wa[k], wb[k]) for k in wa):
        return False
    return all(torch.equal(torch.as_tensor(oa[k][kk]), torch.as_tensor(ob[k][kk])) for k in oa for kk in oa[k])


def test_inprocess_skips_nonfinite_steps_without_changing_anything(tmp_path, monkeypatch):
    # step 2: NaN reward; 3: inf reward gradient; 4: parameter gradient overflow; 5: NaN divergence
    spy = _Spy(monkeypatch, {2: "reward", 3: "reward_grad", 4: "gradient"}, nan_divergence_at=5)
    recipe = load_recipe(DEBUG, [f"train.output_dir={tmp_path}", "train.steps=7", "train.max_nonfinite_steps=5",
                                 "train.batch_size=2"])
    res = inproc.train_inprocess(recipe)
    assert spy.step == 7
    for s in (2, 3, 4, 5):  # the state at the start of step s+1 is the state at the start of step s
        assert _same(spy.snapshots[s], spy.snapshots[s + 1]), f"step {s} changed the weights or the optimizer"
    for s in (1, 6):
        assert not _same(spy.snapshots[s], spy.snapshots[s + 1]), f"step {s} trained nothing"
    rows = _read_csv(tmp_path / "metrics.csv")
    assert [int(r["step"]) for r in rows] == list(range(1, 8))
    assert [int(float(r["skipped"])) for r in rows] == [0, 1, 1, 1, 1, 0, 0]
    assert [int(float(r["nonfinite_steps"])) for r in rows] == [0, 1, 2, 3, 4, 4, 4]
    assert math.isnan(float(rows[1]["reward"])) and math.isfinite(float(rows[3]["loss"]))
    assert not math.isfinite(float(rows[3]["grad_norm"]))  # step 4: finite loss, overflowing gradient
    assert res.summary["reward_after"] == res.summary["reward_after"]  # finished and evaluated (not NaN)


def test_inprocess_stops_after_max_in_a_row_with_last_good_weights(tmp_path, monkeypatch, capsys):
    _Spy(monkeypatch, {3: "reward", 4: "gradient"})
    code = main(["train", DEBUG, f"train.output_dir={tmp_path}", "train.steps=6", "train.max_nonfinite_steps=2",
                 "train.batch_size=2"])
    err = capsys.readouterr().err
    assert code == 1, err
    assert err.startswith("error: training diverged: 2 non-finite steps in a row (train.max_nonfinite_steps = 2)")
    assert "last good state (step 2)" in err and "last_good" in err and "Traceback" not in err
    state = (tmp_path / "last_good/state.json").read_text()
    assert '"step": 2' in state
    assert (tmp_path / "last_good/lora/pytorch_lora_weights.safetensors").is_file()
    rows = _read_csv(tmp_path / "metrics.csv")
    assert [int(float(r["skipped"])) for r in rows] == [0, 0, 1, 1]
    assert not (tmp_path / "weights").exists() and not (tmp_path / "summary.json").exists()  # not a result


# ---------------------------------------------------------------------------------------------- Ray


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    from rocm_ray.train.ray_trainer import local_ray_options, stop_local_ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=3, **local_ray_options())
    yield ray
    if started:
        stop_local_ray()


@pytest.fixture(scope="module")
def service(ray_local):
    """One reward replica for both Ray runs (start-up paid once)."""
    from rocm_ray.rewards.service import RewardService

    svc = RewardService.from_recipe(load_recipe("recipes/tiny_ray.yaml"))
    svc.wait_ready(timeout_s=300)
    yield svc
    svc.shutdown()


def _checkpoint_weights(run_dir) -> dict[int, dict]:
    from safetensors.torch import load_file

    from rocm_ray.train.ray_worker import WEIGHTS_FILE, read_state

    out = {}
    for d in sorted(run_dir.glob("checkpoint_*")):
        state = read_state(d)
        if state is not None and (d / WEIGHTS_FILE).is_file():
            out[int(d.name.split("_")[1])] = (state, load_file(str(d / WEIGHTS_FILE)))
    return out


@pytest.mark.slow
def test_ray_workers_skip_together_zero0(service, tmp_path):
    from rocm_ray.train.ray_trainer import train_ray

    recipe = load_recipe("recipes/tiny_ray.yaml", [
        "name=nf0", f"train.output_dir={tmp_path}", "train.steps=4", "train.zero_stage=0", "train.checkpoint_every=1",
        "train.max_nonfinite_steps=3"])
    # step 2: a NaN reward on both ranks' shards; step 3: the parameter gradient overflows
    res = train_ray(recipe, service=service, nonfinite_at={2: "reward", 3: "gradient"})
    assert [int(r["step"]) for r in res.metrics] == [1, 2, 3, 4]
    assert [r["skipped"] for r in res.metrics] == [0, 1, 1, 0]
    assert [r["nonfinite_steps"] for r in res.metrics] == [0, 1, 2, 2]
    ckpts = _checkpoint_weights(tmp_path / "ray" / "nf0")  # num_to_keep=2: steps 3 and 4
    assert sorted(ckpts) == [3, 4]
    w3, w4 = ckpts[3][1], ckpts[4][1]
    assert any(not torch.equal(w3[k], w4[k]) for k in w3)  # step 4 trained
    header = next(csv.reader(open(res.output_dir / "metrics.csv")))
    assert header[-2:] == ["skipped", "nonfinite_steps"]


@pytest.mark.slow
def test_ray_stop_is_not_retried_and_keeps_the_last_good_state(service, tmp_path):
    from rocm_ray.train.ray_trainer import train_ray

    recipe = load_recipe("recipes/tiny_ray.yaml", [
        "name=nf2", f"train.output_dir={tmp_path}", "train.steps=5", "train.zero_stage=2", "train.checkpoint_every=1",
        "train.max_nonfinite_steps=2", "train.max_failures=3"])
    with pytest.raises(NonFiniteError) as e:  # steps 2 and 3 overflow: DeepSpeed skips, then the run stops
        train_ray(recipe, service=service, nonfinite_at={2: "gradient", 3: "gradient"})
    msg = str(e.value)
    assert "2 non-finite steps in a row" in msg and "last good state (step 1)" in msg and "--resume" in msg
    ckpts = _checkpoint_weights(tmp_path / "ray" / "nf2")
    stop = ckpts[3][0]
    assert stop["step"] == 1 and stop["nonfinite_stop"]["at_step"] == 3
    assert [r["step"] for r in stop["metrics"]] == [1]
    assert all(torch.equal(ckpts[2][1][k], ckpts[3][1][k]) for k in ckpts[3][1])  # ZeRO 2 skipped the update
    # not retried: a retry would have resumed from the stop checkpoint and written checkpoint_000002.. again
    assert sorted(ckpts) == [2, 3]
    rows = _read_csv(tmp_path / "metrics.csv")
    assert [int(float(r["skipped"])) for r in rows] == [0, 1, 1]
    assert not (tmp_path / "weights").exists()


def test_a_later_micro_batch_failing_still_answers_the_other_ranks():
    """With micro-batches, a rank whose second micro-batch is non-finite (after the first was backpropagated)
    must still send its "no" to the agreement the other ranks wait in, or they would hang in the all-reduce."""
    from rocm_ray.train.nonfinite import guarded_step
    from rocm_ray.train.step import NonFiniteError

    votes: list[bool] = []
    backward_calls: list[float] = []

    def agree(ok: bool) -> bool:  # this rank's side of the collective: record what it sends
        votes.append(ok)
        return ok

    def two_micro_batches(bw):
        bw(torch.tensor(1.0))  # micro-batch 1: finite, agreed and backpropagated
        raise NonFiniteError("micro-batch 2: NaN reward")

    res, skip = guarded_step(two_micro_batches, lambda t: backward_calls.append(float(t)), agree)
    assert res is None and "micro-batch 2" in skip
    assert votes == [True, False]  # one vote per micro-batch, the failing one included
    assert backward_calls == [1.0]
