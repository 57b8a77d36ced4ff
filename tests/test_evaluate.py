"""--mode=eval and --mode=sample end to end on the digits smoke config."""

import json

import numpy as np
import pytest
from test_configs import load_config
from test_inception import seeded_state_dict

from diffusion_jax import metrics_io
from diffusion_jax.data import digits
from diffusion_jax.evaluation import evaluate, reference_stats
from diffusion_jax.jobs import sample
from diffusion_jax.jobs import train as train_job


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("eval")
    config = load_config("digits.py", "smoke")
    config.training.sample_every = 100
    config.eval.metrics = ("digits_fd", "bpd")
    config.training.eval_every = 2  # training scores step 2 itself
    train_job.train_and_evaluate(config, workdir)
    return config, workdir


def test_eval_writes_results_and_skips_done_steps(trained):
    config, workdir = trained
    assert (workdir / "eval" / "step_2.json").exists()  # written during training
    results = evaluate.evaluate(config, workdir)
    assert [r["step"] for r in results] == [1]
    saved = json.loads((workdir / "eval" / "step_2.json").read_text())
    for key in (
        "digits_fd",
        "bpd",
        "num_samples",
        "sampler",
        "sampling_steps",
        "seed",
        "feature_network",
    ):
        assert key in saved, key
    assert saved["digits_fd"] > 0 and 0 < saved["bpd"] < 20
    assert evaluate.evaluate(config, workdir) == []  # nothing left to score


def test_sample_mode_writes_grid_npz_and_reverse_process(trained):
    config, workdir = trained
    png = sample.sample(config, workdir)
    assert png.exists()
    with np.load(workdir / "samples" / "sample_step_2.npz") as f:
        assert f["arr_0"].shape == (8, 16, 16, 1) and f["arr_0"].dtype == np.uint8
    assert (workdir / "samples" / "reverse_step_2.png").exists()


def test_fid_is_precision_recall_with_seeded_inception(trained, tmp_path):
    config, workdir = trained
    weights = tmp_path / "inception.npz"
    np.savez(weights, **seeded_state_dict())
    config = config.copy_and_resolve_references()
    config.eval.inception_weights = str(weights)
    real = metrics_io.to_uint8(digits.load_digits("test", 16)[0][:40])
    ref = tmp_path / "digits_ref.npz"
    reference_stats.compute(config, real, ref)
    config.eval.reference_stats = str(ref)
    config.eval.metrics = ("fid", "is", "precision", "recall")
    config.eval.checkpoint_step = 2
    (workdir / "eval" / "step_2.json").unlink(missing_ok=True)
    [result] = evaluate.evaluate(config, workdir)
    assert np.isfinite(result["fid"]) and result["fid"] > 0
    assert 1.0 <= result["is"] <= 1008
    assert 0.0 <= result["precision"] <= 1.0 and 0.0 <= result["recall"] <= 1.0
    assert result["reference_stats_sha256"] and result["inception_weights_sha256"]


def test_eval_without_weights_names_the_field(trained):
    config, workdir = trained
    config = config.copy_and_resolve_references()
    config.eval.metrics = ("fid",)
    config.eval.checkpoint_step = 1
    (workdir / "eval" / "step_1.json").unlink(missing_ok=True)
    with pytest.raises(ValueError, match="config.eval.inception_weights"):
        evaluate.evaluate(config, workdir)
