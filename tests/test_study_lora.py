"""LoRA fine-tuning study: the t-interval helper, the peft adapter (trainable parameters, exact
merge into a plain diffusers folder), the study end to end on the tiny preset (a few steps,
tiny detector settings), its CLI and its table in the report."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch

from diffmem.cli import main
from diffmem.errors import ConfigError
from diffmem.study.lora import LoraAdapter, count_trainable, parse_ranks
from diffmem.study.measure import MeasureConfig
from diffmem.study.results import mean_ci

TINY_MEASURE = MeasureConfig(controls=2, nn_generations=1, sample_steps=2, unconditional=2,
                             unrelated=1, fid_images=6, batch_size=8)


def test_mean_ci_is_the_student_t_interval():
    from scipy import stats

    xs = [0.2, 0.5, 0.35, 0.9]
    mean, half = mean_ci(xs)
    lo, hi = stats.t.interval(0.95, len(xs) - 1, loc=np.mean(xs), scale=stats.sem(xs))
    assert mean == pytest.approx(np.mean(xs)) and half == pytest.approx((hi - lo) / 2)
    # by hand: [1, 2, 3] has s = 1, t(0.975, 2) = 4.302653
    assert mean_ci([1.0, 2.0, 3.0])[1] == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)
    assert mean_ci([0.4, float("nan"), None, 0.4]) == (pytest.approx(0.4), 0.0)
    assert mean_ci([None]) == (None, None) and mean_ci([3.0]) == (3.0, None)


def test_parse_ranks_rejects_what_is_not_a_positive_integer():
    assert parse_ranks([4, 16]) == [4, 16]
    for bad, word in (("4,x", "'x'"), ("0", "'0'"), ("2.5", "'2.5'"), ("", "none given"),
                      ("4,4", "repeats")):
        with pytest.raises(ConfigError, match=word):
            parse_ranks(bad)


def test_lora_trains_few_parameters_and_merges_exactly(model, tmp_path):
    """peft's own count for the rank; after training-like changes to the adapters, the merged
    folder opened by load_model predicts what the in-memory peft model predicts."""
    from peft import get_peft_model

    from diffmem.models import load_model
    from diffmem.pipelines import CXRDiffusionPipeline

    full, total = count_trainable(model, None)
    lora, _ = count_trainable(model, LoraAdapter(4))
    fresh = CXRDiffusionPipeline.from_pretrained(str(model))
    peft_count = get_peft_model(fresh.unet, LoraAdapter(4).configs()["unet"]) \
        .get_nb_trainable_parameters()[0]
    assert full == total and lora == peft_count and 0 < lora < full / 5
    with_te, _ = count_trainable(model, LoraAdapter(4, text_encoder=True))
    assert with_te > lora

    pipe = CXRDiffusionPipeline.from_pretrained(str(model))
    adapter = LoraAdapter(4, text_encoder=True)
    adapter.prepare(pipe)
    assert not any(p.requires_grad for n, p in pipe.unet.named_parameters() if "lora_" not in n)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in [*pipe.unet.named_parameters(), *pipe.text_encoder.named_parameters()]:
            if "lora_B" in n:  # B starts at zero; give the update a size, as training does
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    ids = pipe.tokenizer(["No acute process."], padding="max_length",
                         max_length=pipe.tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids
    x = torch.randn((1, *pipe.sample_shape), generator=g)
    t = torch.tensor([500])
    with torch.no_grad():
        cond = pipe.text_encoder(ids, return_dict=False)[0]
        expected = pipe.unet(x, t, encoder_hidden_states=cond, return_dict=False)[0]
    adapter.merge(pipe)
    assert not any("lora_" in n for n, _ in pipe.unet.named_parameters())
    pipe.save_pretrained(str(tmp_path / "merged"))
    merged = load_model(tmp_path / "merged")
    with torch.no_grad():
        cond2, _ = merged.encode_prompt(["No acute process."])
        got = merged.predict_noise(x, 500, cond2)
    assert torch.allclose(cond2, cond, atol=1e-5)
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()


def test_lora_fine_tuning_resumes_exactly_and_keeps_the_frozen_weights(data, model, tmp_path):
    """train(init=, adapter=): a stopped LoRA run resumed ends at the uninterrupted run's
    weights; the text encoder (no adapters) is the base's; another adapter is refused."""
    from safetensors.torch import load_file

    from diffmem.errors import TrainingError
    from diffmem.train import TrainConfig, train

    cfg = TrainConfig(preset="tiny", steps=2, lr=1e-2, checkpoint_every=1)
    train(data, tmp_path / "full", config=cfg, init=model, adapter=LoraAdapter(2))
    train(data, tmp_path / "parts", config=cfg, init=model, adapter=LoraAdapter(2), stop_after=1)
    with pytest.raises(TrainingError, match="adapter: checkpoint"):
        train(data, tmp_path / "parts", config=cfg, init=model, adapter=LoraAdapter(4),
              resume=True)
    assert train(data, tmp_path / "parts", config=cfg, init=model, adapter=LoraAdapter(2),
                 resume=True).resumed_from == 1
    unet = "unet/diffusion_pytorch_model.safetensors"
    a, b = load_file(str(tmp_path / "full" / unet)), load_file(str(tmp_path / "parts" / unet))
    base = load_file(str(model / unet))
    assert set(a) == set(base) and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], base[k]) for k in a if "to_q" in k)  # the merged update
    assert all(torch.equal(a[k], base[k]) for k in a if "conv" in k)  # not adapted: unchanged
    te = "text_encoder/model.safetensors"
    t1, t0 = load_file(str(tmp_path / "full" / te)), load_file(str(model / te))
    assert all(torch.equal(t1[k], t0[k]) for k in t0)


def test_train_refuses_an_init_that_is_no_pipeline_or_another_preset(data, tmp_path):
    from diffmem.train import TrainConfig, train

    cfg = TrainConfig(preset="tiny", steps=1)
    with pytest.raises(ConfigError, match="is not a CXR pipeline folder"):
        train(data, tmp_path / "a", config=cfg, init=tmp_path)
    fake = tmp_path / "demo-model"
    (fake / "unet").mkdir(parents=True)
    (fake / "model_index.json").write_text("{}")
    (fake / "model_card.json").write_text(json.dumps({"preset": "demo"}))
    with pytest.raises(ConfigError, match="trained with preset 'demo', not 'tiny'"):
        train(data, tmp_path / "b", config=cfg, init=fake)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.fixture(scope="module")
def lora_study(data, encoder, tmp_path_factory):
    from diffmem.study.lora import run_lora_study

    out = tmp_path_factory.mktemp("lora") / "study"
    kw = dict(preset="tiny", steps=2, base_steps=2, ranks=[2, 4], seeds=[0, 1],
              measure=TINY_MEASURE, encoder=encoder, threads=1)
    return out, kw, run_lora_study(data, out, **kw)


def test_lora_study_writes_settings_with_ci_and_reuses_runs(lora_study, data):
    from diffmem.data import load
    from diffmem.data.synth import read_ground_truth
    from diffmem.study.lora import run_lora_study

    out, kw, res = lora_study
    doc = json.loads((out / "study.json").read_text())
    assert doc["study"] == "lora" and doc["figures"] == ["lora.png"]
    rows = {r["setting"]: r for r in doc["records"]}
    assert list(rows) == ["base", "full", "lora-r2", "lora-r4"]
    for name in ("full", "lora-r2", "lora-r4"):
        r = rows[name]
        assert [x["seed"] for x in r["runs"]] == [0, 1] and r["seeds"] == 2
        for metric, field in (("own_copies", "memorization_rate_own"),
                              ("any_copies", "memorization_rate_any"), ("fid", "fid_in_domain"),
                              ("reid_leaks", "reid_rate"), ("reid_leaks_own", "reid_rate_own"),
                              ("train_seconds", "train_seconds")):
            m, h = mean_ci([x[field] for x in r["runs"]])
            assert r[f"{metric}_mean"] == pytest.approx(m) and r[f"{metric}_ci95"] == \
                pytest.approx(h)
        assert all(0 <= x["reid_rate_not_copies"] <= x["reid_rate"] <= 1 for x in r["runs"])
        assert all(0 <= x["reid_rate_own"] <= x["reid_rate"] for x in r["runs"])
    assert rows["lora-r2"]["trainable_params"] < rows["lora-r4"]["trainable_params"] \
        < rows["full"]["trainable_params"] / 5
    assert rows["lora-r4"]["lr"] == pytest.approx(10 * rows["full"]["lr"])
    # every fine-tuned model is a plain diffusers folder, fine-tuned from the base
    card = json.loads((out / "runs" / "lora-r4-s1" / "model_card.json").read_text())
    assert card["fine_tuned_from"] == str((out / "runs" / "base").resolve())
    assert card["adapter"] == "lora(r=4,alpha=4,text_encoder=false)"
    assert not (out / "runs" / "lora-r4-s1" / "unet" / "adapter_config.json").exists()
    with open(out / "lora_runs.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 1 + 3 * 2
    with open(out / "lora.csv", newline="") as f:
        assert [r["setting"] for r in csv.DictReader(f)] == list(rows)
    # the base population: another seed, nothing planted
    base = load(out / "base-data")
    assert base.fingerprint() != load(data).fingerprint()
    assert not any(int(r["planted"]) for r in read_ground_truth(base.root).values())
    assert any("no planted clusters" in f for f in res.findings)
    again = run_lora_study(data, out, **kw)
    assert {x["status"] for r in again.records[1:] for x in r["runs"]} == {"skipped"}


def test_report_shows_the_lora_table(lora_study, tmp_path):
    from diffmem.report import build_report

    out, _, _ = lora_study
    result = build_report(tmp_path / "r", model=out / "runs" / "full-s0", studies=[out])
    html = (tmp_path / "r" / "report.html").read_text(encoding="utf-8")
    assert "Full fine-tuning vs LoRA" in html and "lora-r4" in html
    assert "<th>own_copies_mean</th>" in html and "<th>trainable_params</th>" in html
    assert result.sections["study"] == "included"


@pytest.mark.parametrize("args, word", [(["--ranks", "4,x"], "'x' is not a positive integer"),
                                        (["--ranks", "0"], "'0' is not a positive integer"),
                                        (["--seeds", "0,-1"], "'-1'"),
                                        (["--lora-lr", "0"], "lora_lr=0.0")])
def test_cli_rejects_bad_settings(data, tmp_path, capsys, args, word):
    out = tmp_path / "o"
    code = main(["-q", "study", "lora", "--data", str(data), "--out", str(out), *args])
    assert code == 2 and word in capsys.readouterr().err
    assert not out.exists()


def test_study_help_lists_lora(capsys):
    with pytest.raises(SystemExit) as e:
        main(["study", "--help"])
    assert e.value.code == 0 and "lora" in capsys.readouterr().out
