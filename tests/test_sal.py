"""method=sal: the stage schedule, the guidance terms, the frozen guide, warm start, base
methods, bad schedules, and the data-scarce preset (stabbench/methods/sal.py, docs/methods/sal.md)."""
from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from stabbench import cli, methods, train
from stabbench.config import register_schemas, validate
from stabbench.errors import UserError
from stabbench.methods import sal
from stabbench.methods.base import Shape, Stage

TINY = ["dataset.n_train=256", "dataset.n_test=128", "batch_size=32", "width=8", "device=cpu", "log_every=1"]


def make_cfg(*overrides: str):
    register_schemas()
    with initialize_config_module(config_module="stabbench.conf", version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def sal_method(**options):
    cfg = OmegaConf.structured(sal.Config)
    for key, value in options.items():
        cfg[key] = value
    return methods.create(cfg)


def run_sal(tmp_path, *overrides):
    cfg = make_cfg("method=sal", *TINY, *overrides)
    validate(cfg)
    train.run(cfg, tmp_path)
    return (pd.read_csv(tmp_path / "metrics.csv"), pd.read_csv(tmp_path / "layers.csv"),
            json.loads((tmp_path / "summary.json").read_text()))


# -- schedules and layer matching ------------------------------------------------------

def test_schedules():
    assert sal.geometric_depths(16) == [1, 2, 4, 8, 16]
    assert sal.geometric_depths(20) == [1, 2, 4, 8, 16, 20]
    assert sal.geometric_depths(1) == [1]
    assert sal.linear_depths(16, 4) == [4, 8, 12, 16]
    assert sal_method(schedule="linear").schedule(16) == [4, 7, 10, 13, 16]  # as many stages as geometric
    assert sal_method(depths=[3, 5, 9]).schedule(9) == [3, 5, 9]
    stages = sal_method(epochs_per_stage=2).stages(8, 7)
    assert [(s.depth, s.epochs, s.index, s.guided) for s in stages] == [
        (1, 2, 0, False), (2, 2, 1, True), (4, 2, 2, True), (8, 2, 3, True)]
    assert [s.epochs for s in sal_method().stages(8, 7)] == [7, 7, 7, 7]


def test_layer_match():
    assert sal.layer_match(2, 8, "top") == [7, 8]
    assert sal.layer_match(3, 8, "relative") == [3, 5, 8]  # round(8/3)=3, round(16/3)=5, 8
    assert sal.layer_match(2, 3, "relative") == [2, 3]  # 1.5 rounds half up
    for guide_depth, depth in [(1, 2), (3, 7), (5, 16), (8, 9)]:
        for match in sal.MATCHES:
            pi = sal.layer_match(guide_depth, depth, match)
            assert pi[-1] == depth and all(b > a for a, b in zip(pi, pi[1:])) and pi[0] >= 1


@pytest.mark.parametrize("depths,message", [
    ([1, 2], "does not end at depth=4"), ([1, 3, 2, 4], "not strictly increasing"),
    ([2, 2, 4], "not strictly increasing"), ([], "empty"), ([0, 4], "below 1")])
def test_bad_depths_raise(depths, message):
    with pytest.raises(UserError, match=message):
        sal_method(depths=depths).stages(4, 1)


# -- guidance terms ----------------------------------------------------------------------

def guide_and_student(guide_depth=2, depth=5, match="top", batch=6, width=4, classes=3):
    torch.manual_seed(0)
    guide = {"logits": torch.randn(batch, classes), "hidden": [torch.randn(batch, width) for _ in range(guide_depth)]}
    student = {"logits": guide["logits"].clone(), "hidden": [torch.randn(batch, width) for _ in range(depth)]}
    pi = sal.layer_match(guide_depth, depth, match)
    for j, p in enumerate(pi):
        student["hidden"][p - 1] = guide["hidden"][j].clone()
    return guide, student, pi, Stage(depth=depth, epochs=1, index=1, guided=True,
                                      extra={"guide_depth": guide_depth, "match": pi})


@pytest.mark.parametrize("match", sal.MATCHES)
def test_guidance_zero_when_student_equals_guide(match):
    method = sal_method(match=match)
    guide, student, pi, stage = guide_and_student(match=match)
    terms = method.guidance_losses(student, guide, stage)
    assert set(terms) == {"hint_loss", "output_loss"}
    assert all(abs(float(v)) < 1e-6 for v in terms.values())

    # an unmatched student layer is free: still zero
    free = next(i for i in range(stage.depth) if i + 1 not in pi)
    student["hidden"][free] = student["hidden"][free] + 5
    assert abs(float(method.guidance_losses(student, guide, stage)["hint_loss"])) < 1e-6

    # a matched hidden layer moved: hint > 0, output unchanged
    moved = {**student, "hidden": list(student["hidden"])}
    moved["hidden"][pi[0] - 1] = moved["hidden"][pi[0] - 1] + 0.5
    terms = method.guidance_losses(moved, guide, stage)
    assert float(terms["hint_loss"]) == pytest.approx(0.25 / len(pi), rel=1e-5)  # mean_j of MSE, one layer off by 0.5
    assert abs(float(terms["output_loss"])) < 1e-6

    # other logits: output > 0, hint unchanged
    terms = method.guidance_losses({**student, "logits": student["logits"] + torch.randn_like(student["logits"])},
                                   guide, stage)
    assert float(terms["output_loss"]) > 1e-4
    assert abs(float(terms["hint_loss"])) < 1e-6


def test_output_term_is_tau_squared_kl_and_weights_scale():
    guide, student, _, stage = guide_and_student()
    student["logits"] = torch.randn_like(student["logits"]) * 3
    tau = 4.0
    expected = tau**2 * F.kl_div(F.log_softmax(student["logits"] / tau, -1), F.log_softmax(guide["logits"] / tau, -1),
                                 log_target=True, reduction="batchmean")
    assert float(sal_method().guidance_losses(student, guide, stage)["output_loss"]) == pytest.approx(float(expected), rel=1e-5)
    student["hidden"][-1] = student["hidden"][-1] + 1
    one = sal_method().guidance_losses(student, guide, stage)
    scaled = sal_method(hint_weight=2.0, output_weight=0.5).guidance_losses(student, guide, stage)
    assert float(scaled["hint_loss"]) == pytest.approx(2 * float(one["hint_loss"]))
    assert float(scaled["output_loss"]) == pytest.approx(0.5 * float(one["output_loss"]))
    assert set(sal_method(hint_weight=0.0).guidance_losses(student, guide, stage)) == {"output_loss"}
    mse = sal_method(output_loss="mse").guidance_losses(student, guide, stage)["output_loss"]
    assert float(mse) == pytest.approx(float(F.mse_loss(student["logits"], guide["logits"])))


# -- full runs -----------------------------------------------------------------------------

def test_stages_run_in_order_with_scheduled_depths(tmp_path):
    metrics, layers, summary = run_sal(tmp_path, "depth=5", "method.depths=[1,3,5]", "max_steps=3", "epochs=1")
    assert list(metrics["stage"]) == sorted(metrics["stage"]) and set(metrics["stage"]) == {0, 1, 2}
    assert [s["depth"] for s in summary["stages"]] == [1, 3, 5]
    assert [s["steps"] for s in summary["stages"]] == [3, 3, 3] and summary["total_steps"] == 9
    assert summary["steps"] == 3 and summary["depth"] == 5
    # each stage's network has its scheduled depth; the final one has depth hidden layers
    assert layers.groupby("stage")["layer"].max().tolist() == [2, 4, 6]
    final = layers[layers["stage"] == 2]
    assert (final.groupby("step")["layer"].nunique() == 6).all()
    assert (final["kind"] == "hidden").sum() == 4 * final["step"].nunique()
    # the guidance terms are logged, only for guided stages
    train_rows = metrics[metrics["split"] == "train"]
    assert train_rows.loc[train_rows["stage"] == 0, ["hint_loss", "output_loss"]].isna().all().all()
    guided = train_rows[train_rows["stage"] > 0]
    assert (guided["hint_loss"] > 0).all() and (guided["output_loss"] > 0).all()
    # stage 1 of 3 costs less than the final one: FLOPs sum over stages
    assert summary["total_flops"] > 0 and summary["stages"][0]["test_acc"] is not None


def test_guide_is_frozen_while_the_next_stage_trains(tmp_path, monkeypatch):
    seen = []

    def record(self, student, guide, stage):
        seen.append((stage.index, guide, {k: v.clone() for k, v in guide.params.items()},
                     student, {k: v.clone() for k, v in student.params.items()}))

    monkeypatch.setattr(sal.Sal, "warm_start", record)
    run_sal(tmp_path, "depth=4", "max_steps=4", "epochs=1", "seeds=2")
    assert [index for index, *_ in seen] == [1, 2]
    for _, guide, guide_before, student, student_before in seen:
        for name, tensor in guide.params.items():
            assert torch.equal(tensor, guide_before[name]), name
            assert not tensor.requires_grad
        assert any(not torch.equal(t, student_before[k]) for k, t in student.params.items())  # the student trained


def test_regression_uses_mse_output_term(tmp_path):
    metrics, _, summary = run_sal(tmp_path, "dataset=synthetic_regression", "depth=2", "max_steps=2", "epochs=1")
    assert summary["test_acc"] is None and len(summary["stages"]) == 2
    assert metrics.loc[metrics["stage"] == 1, "output_loss"].dropna().gt(0).all()
    for task in ("regression", "classification"):  # the runner passes the task in the shape
        method = methods.create(make_cfg("method=sal").method)
        method.build(Shape(in_features=5, out_features=3, depth=2, width=4, task=task))
        assert method.task == task


# -- warm start and base methods ------------------------------------------------------------

@pytest.mark.parametrize("match", sal.MATCHES)
def test_warm_start_copies_guide_layers_by_the_matching(match):
    method = sal_method(warm_start=True, match=match)
    stage = method.stages(6, 1)[-1]  # guide depth 4 -> 6
    shape = Shape(in_features=5, out_features=3, depth=4, width=7)
    guide = train.build_ensemble(method, shape, [0, 1], torch.device("cpu"))
    student = train.build_ensemble(method, Shape(5, 3, 6, 7), [10, 11], torch.device("cpu"))
    before = {k: v.clone() for k, v in student.params.items()}
    method.warm_start(student, guide, stage)
    pi = sal.layer_match(4, 6, match)
    copied = {0: 0, 4: 6, **{j - 1: pi[j - 1] - 1 for j in range(2, 5)}}
    for g, s in copied.items():
        for part in ("weight", "bias"):
            assert torch.equal(student.params[f"layers.{s}.{part}"], guide.params[f"layers.{g}.{part}"])
    for s in set(range(7)) - set(copied.values()):
        assert torch.equal(student.params[f"layers.{s}.weight"], before[f"layers.{s}.weight"])
    untouched = sal_method(warm_start=False)
    student = train.build_ensemble(untouched, Shape(5, 3, 6, 7), [10, 11], torch.device("cpu"))
    untouched.warm_start(student, guide, stage)
    assert all(torch.equal(student.params[k], before[k]) for k in before)


def test_base_methods_build_each_stage():
    shape = Shape(in_features=5, out_features=3, depth=3, width=6)
    reachable = {"tat": ["c_val_0_target=0.5"]}  # TAT's default 0.9 needs 13 layers or more
    for base in sorted(set(methods.REGISTRY) - {"sal"}):
        options = reachable.get(base, [])
        cfg = make_cfg("method=sal", f"method.base={base}", *(f"+method.base_options.{o}" for o in options))
        method = methods.create(cfg.method)
        plain = methods.create(make_cfg(f"method={base}", *(f"method.{o}" for o in options)).method)
        torch.manual_seed(0)
        ours = method.build(shape)
        torch.manual_seed(0)
        theirs = plain.build(shape)
        assert ours.depth == 3 and str(ours) == str(theirs), base  # null shared options: the base's own defaults
        assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), theirs.state_dict().values())), base


def test_base_options_are_forwarded_and_checked():
    method = methods.create(make_cfg("method=sal", "method.base=bsnn", "+method.base_options.constraint=none",
                                     "method.activation=relu").method)
    assert method.base.cfg.constraint == "none" and method.base.cfg.activation == "relu"
    assert methods.create(make_cfg("method=sal", "method.base=snn").method).base.cfg.activation == "selu"
    with pytest.raises(UserError, match=r"method.base_options.nope is not an option of method.base=baseline"):
        methods.create(make_cfg("method=sal", "+method.base_options.nope=1").method)
    with pytest.raises(UserError, match=r"method.base_options.constraint='bad'.*method.base=bsnn"):
        methods.create(make_cfg("method=sal", "method.base=bsnn", "+method.base_options.constraint=bad").method)
    with pytest.raises(UserError, match="method.base='sal'"):
        methods.create(make_cfg("method=sal", "method.base=sal").method)


# -- the command line ---------------------------------------------------------------------------

@pytest.mark.parametrize("depths,message", [
    ("[1,2]", "does not end at depth=4"), ("[1,3,2,4]", "not strictly increasing"), ("[]", "empty")])
@pytest.mark.parametrize("early_check", [True, False])
def test_bad_schedule_is_one_line_exit_2_no_run_dir(tmp_path, capsys, monkeypatch, depths, message, early_check):
    if not early_check:  # the error raised by stages() at run time must end the same way
        monkeypatch.setattr(sal.Sal, "validate_run", lambda self, cfg: None)
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["run", "method=sal", "depth=4", f"method.depths={depths}", *TINY, "max_steps=1",
                  f"hydra.run.dir={run_dir}"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and err.startswith("stabbench: error: method.depths=")
    assert not run_dir.exists()


def test_bad_schedule_in_a_sweep_fails_before_any_point_runs(tmp_path, capsys):
    sweep_dir = tmp_path / "sweep"
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["run", "-m", "method=sal", "depth=2,4", "method.depths=[1,2]", *TINY, "max_steps=1",
                  f"hydra.sweep.dir={sweep_dir}"])
    assert exit_info.value.code == 2 and "does not end at depth=4" in capsys.readouterr().err
    assert not sweep_dir.exists()


# -- the data-scarce preset -----------------------------------------------------------------------

def test_data_scarce_preset_composes_for_both_methods():
    register_schemas()
    with initialize_config_module(config_module="stabbench.conf", version_base="1.3"):
        full = compose(config_name="config", overrides=["experiment=sal_data_scarce"], return_hydra_config=True)
        params = dict(full.hydra.sweeper.params)
        assert params == {"dataset.fraction": "0.01,0.05,0.1,1.0", "method": "baseline,sal"}
        assert full.seed == 0 and full.seeds == 3 and full.depth == 20
        for method in params["method"].split(","):
            point = compose(config_name="config", overrides=["experiment=sal_data_scarce", f"method={method}",
                                                             "dataset.fraction=0.01"])
            validate(point)
            assert point.dataset.name == "fashion_mnist" and point.method.name == method
            assert methods.create(point.method).build(Shape(784, 10, point.depth, 4)).activation.name == "tanh"


@pytest.mark.slow
def test_method_sweep_baseline_and_sal_runs(tmp_path):
    sweep_dir = tmp_path / "sweep"
    code = cli.main(["run", "-m", "experiment=sal_data_scarce", "dataset=synthetic", "dataset.fraction=0.05",
                     "seeds=1", "seed=0", "depth=2", "width=4", "max_steps=2", "epochs=1", "device=cpu",
                     f"hydra.sweep.dir={sweep_dir}"])
    assert code == 0
    summaries = sorted(sweep_dir.glob("*/summary.json"))
    assert len(summaries) == 2  # the command line's fraction replaced the preset's four
    found = {json.loads(p.read_text())["method"]: json.loads(p.read_text()) for p in summaries}
    assert set(found) == {"baseline", "sal"}
    assert "stages" not in found["baseline"] and len(found["sal"]["stages"]) == 2
    assert found["sal"]["config"]["dataset"]["fraction"] == 0.05
