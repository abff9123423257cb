"""fastnorm.experiments: the structure of the results with tiny settings (not the verdicts),
the run cache, and a CLI smoke test."""
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("sklearn")

from fastnorm import experiments as ex  # noqa: E402

VERDICTS = {"supported", "partly supported", "not reproduced here"}
QUIET = dict(log=lambda *a: None)


def _runner():
    return ex._Runner(jobs=1, **QUIET)


def test_settings_and_overrides():
    full, quick = ex.settings(3), ex.settings(3, quick=True)
    assert full["batch_sizes"] == (2, 4, 8, 16, 32, 64)
    assert len(quick["batch_sizes"]) < len(full["batch_sizes"])
    assert quick["epochs"] < full["epochs"]
    assert ex.settings(1, epochs=1)["epochs"] == 1
    with pytest.raises(ex.ExperimentError, match="unknown settings"):
        ex.settings(1, epoch=1)
    assert ex.parse_list("0, 1,2", "--seeds") == (0, 1, 2)
    with pytest.raises(ex.ExperimentError, match="--only"):
        ex.parse_list("1,x", "--only")


def test_splits_merge_a_last_batch_of_one():
    assert ex._splits(5, 2) == [(0, 2), (2, 5)]
    assert ex._splits(6, 2) == [(0, 2), (2, 4), (4, 6)]
    assert ex._splits(3, 1) == [(0, 1), (1, 2), (2, 3)]
    assert ex._splits(4, 8) == [(0, 4)]


def test_rescale_weights_touches_only_linear_and_conv_weights():
    import fastnorm as fn
    from fastnorm import nn, train

    fn.manual_seed(0)
    m = train.build_model("cnn", "batch")
    before = {k: v.data.copy() for k, v in m.named_parameters()}
    ex.rescale_weights(m, 10.0)
    for k, v in m.named_parameters():
        mod = m[int(k.split(".")[0])]
        scaled = isinstance(mod, (nn.Linear, nn.Conv2d)) and k.endswith("weight")
        np.testing.assert_allclose(v.data, before[k] * (10.0 if scaled else 1.0), rtol=1e-6)


def test_runner_serves_shorter_runs_from_longer_ones():
    runner = _runner()
    with runner:
        two = runner.train([ex._spec("mlp", "batch", "adam", 1e-3, 0, 2)], "t")[0]
        one = runner.train([ex._spec("mlp", "batch", "adam", 1e-3, 0, 1)], "t")[0]
    assert runner.trained == 1
    assert len(two["history"]) == 2 and len(one["history"]) == 1
    assert one["spec"]["epochs"] == 1
    # a run is a deterministic function of its spec: training 1 epoch afresh agrees
    fresh = ex.train_run(ex._spec("mlp", "batch", "adam", 1e-3, 0, 1))
    assert fresh["history"] == one["history"]


def test_claim1_structure():
    res = ex.claim1_convergence(seeds=(0,), runner=_runner(), models=("mlp",),
                                optimizers=(("adam", 1e-3),), epochs=2, **QUIET)
    assert res["claim"] == 1 and res["verdict"] in VERDICTS
    assert [(r["model"], r["norm"]) for r in res["rows"]] == [("mlp", "none"), ("mlp", "batch")]
    for r in res["rows"]:
        assert len(r["final_acc"]) == 1 and 0.0 <= r["final_acc"][0] <= 1.0
        assert r["epochs_to_95"][0] in (None, 1, 2)
    curves = res["curves"]["mlp/adam/batch"]
    assert np.shape(curves["train_loss"]) == (1, 2) and np.shape(curves["test_acc"]) == (1, 2)
    assert res["table"].startswith("| model |") and res["table"].count("\n") == 3
    assert len(res["findings"]) == len(res["compare"]) == 1
    assert isinstance(res["disagreements"], list)


def test_claim3_structure():
    res = ex.claim3_batch_size(seeds=(0,), runner=_runner(), models=("mlp",),
                               norms=("batch", "layer"), batch_sizes=(8, 64), epochs=1, **QUIET)
    assert res["verdict"] in VERDICTS
    assert [r["batch_size"] for r in res["rows"]] == [8, 64]
    for r in res["rows"]:
        assert set(r) >= {"batch", "layer", "bn_deficit", "steps_per_epoch"}
        assert np.isfinite(r["bn_deficit"])
    assert res["rows"][0]["steps_per_epoch"] == -(-1438 // 8)
    assert all(isinstance(d, str) for d in res["disagreements"])


def test_claim4_structure_and_batch_of_one():
    res = ex.claim4_inference(seeds=(0,), runner=_runner(), models=("mlp",), epochs=1,
                              test_batches=(1, 2, 359), companions=(2, 4), probes=3, sets=2,
                              other_classes=1, **QUIET)
    (run,) = res["runs"]
    assert res["verdict"] in VERDICTS
    # eval mode is a per-sample function: batch 1 and one batch of 359 agree
    assert run["eval_b1"] == run["eval_full"]
    assert run["eval_b1_vs_full_max_abs_logit_diff"] < 1e-3
    # BatchNorm1d cannot use batch statistics of a single sample
    assert np.isnan(run["train_mode"][1])
    assert "more than 1 value per channel" in run["train_mode_error"][1]
    assert 0.0 <= run["train_mode"][2] <= 1.0
    # momentum 0 leaves the running statistics at their initial values, weights unchanged
    assert run["momentum0_running_mean_abs_max"] == 0.0
    assert run["momentum0_weight_max_abs_diff"] == 0.0
    assert set(run["dependence"]) == {2, 4}
    assert len(run["probe_most_sensitive"]["train_mode_probs"][2]) == 2
    assert "| MLP |" in res["tables"]["modes"] and "| MLP |" in res["tables"]["dependence"]


def test_run_all_writes_markdown_without_plots(tmp_path):
    res = ex.run_all(out_dir=str(tmp_path), seeds=(0,), only=(1,), plots=False,
                     overrides={1: {"models": ("mlp",), "optimizers": (("adam", 1e-3),),
                                    "epochs": 1}}, **QUIET)
    text = (tmp_path / "experiments.md").read_text(encoding="utf-8")
    assert "## Claim 1" in text and "**Verdict:" in text and "**Setup.**" in text
    assert "**Where the measurement disagrees with the claim.**" in text
    assert "![" not in text and not list(tmp_path.glob("*.png"))
    assert res["meta"]["only"] == (1,)
    with pytest.raises(ex.ExperimentError, match="only"):
        ex.run_all(out_dir=None, only=(5,), **QUIET)


def test_worker_processes_give_the_same_numbers():
    spec = ex._spec("mlp", "layer", "sgd", 0.1, 1, 1)
    with ex._Runner(jobs=2, **QUIET) as runner:
        a, b = runner.train([spec, {**spec, "seed": 2}], "t")
    assert a["history"] == ex.train_run(spec)["history"]
    assert b["spec"]["seed"] == 2


def test_cli_quick_claim4(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "-m", "fastnorm", "experiments", "--quick", "--only",
                        "4", "--out", str(out), "--jobs", "1"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "verdict:" in p.stdout and "wrote" in p.stdout
    text = (out / "experiments.md").read_text(encoding="utf-8")
    assert "## Claim 4" in text and "Quick run" in text
    assert "Expected more than 1 value per channel" in text
    assert os.path.getsize(out / "experiments_inference.png") > 10_000


def test_cli_errors(tmp_path):
    p = subprocess.run([sys.executable, "-m", "fastnorm", "experiments", "--only", "5",
                        "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert "fastnorm experiments: error: only" in p.stderr
