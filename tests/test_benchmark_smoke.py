"""The sampler-quality benchmark's smoke mode: trains the tiny digits model, scores samplers
per NFE and post-hoc EMA lengths, and writes its table, JSON and plots."""

import json

from benchmarks import sampler_quality


def test_sampler_quality_smoke_writes_table_and_plots(tmp_path, capsys):
    out = sampler_quality.main(
        ["--smoke", f"--workdir={tmp_path}", "--samplers=ddim,heun", "--num_samples=8"]
    )
    results = json.loads((out / "results.json").read_text())
    assert results["reference"]["sampler"] == "ddpm" and results["reference"]["nfe"] == 6
    assert [(r["sampler"], r["nfe"]) for r in results["samplers"]] == [("ddim", 3), ("heun", 3)]
    assert all(r["digits_fd"] > 0 and 0 <= r["digits_confident"] <= 1 for r in results["samplers"])
    assert [r["sigma_rel"] for r in results["ema_lengths"]] == [0.02, 0.04]
    table = (out / "table.md").read_text()
    assert "| heun |" in table and "Reference: ddpm at NFE 6" in table
    assert table in capsys.readouterr().out
    for name in ("fd_vs_nfe.png", "fd_vs_ema.png"):
        assert (out / name).stat().st_size > 1000
