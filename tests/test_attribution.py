"""diffmem.attribution: pooling tokens into units, the three methods on a tiny Stable Diffusion,
a finite-difference check of the gradient, faithfulness, rendering and ``diffmem attribute``."""

from __future__ import annotations

import html
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from diffmem.attribution import (
    attribute,
    deletion_test,
    html_page,
    list_methods,
    occlusion,
    pool_tokens,
    render_html,
    render_png,
    save_attribution,
)
from diffmem.cli import main
from diffmem.errors import ConfigError, PromptError
from diffmem.models import generation_seed, load_model
from diffmem.models.tiny import tiny_clip_tokenizer, tiny_stable_diffusion

PROMPT = "Dr. ___ was notified of the right lower lobe pneumonia."
FAST = {"generations": 1, "num_inference_steps": 10}


@pytest.fixture(scope="module")
def sd():
    return load_model(tiny_stable_diffusion(seed=0))


@pytest.fixture(scope="module")
def sd64():
    return load_model(tiny_stable_diffusion(seed=0), dtype=torch.float64)


@pytest.fixture(scope="module")
def bert_tokenizer(tmp_path_factory):
    """A BERT WordPiece tokenizer without marker handling: ``___`` becomes three ``_``."""
    from transformers import BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "_", ".", ",", "dr", "was", "at",
             "no", "##ti", "##fied", "the", "seen"]
    path = tmp_path_factory.mktemp("bert") / "vocab.txt"
    path.write_text("\n".join(vocab), encoding="utf-8")
    return BertTokenizerFast(str(path), model_max_length=16)


# ---------------------------------------------------------------------------- pooling
def test_pooling_marker_split_into_subwords(bert_tokenizer):
    units, tokens = pool_tokens("Dr. ___ was notified at ___.", bert_tokenizer)
    assert tokens.count("_") == 6  # the tokenizer really splits each marker in three
    assert [u.text for u in units] == ["Dr", ".", "___", "was", "notified", "at", "___", "."]
    markers = [u for u in units if u.text == "___"]
    assert all(u.kind == "marker" and u.key == "___" and len(u.tokens) == 3 for u in markers)
    assert [tokens[i] for i in markers[0].tokens] == ["_", "_", "_"]
    notified = units[4]
    assert [tokens[i] for i in notified.tokens] == ["no", "##ti", "##fied"]
    # every real token in exactly one unit; [CLS] and [SEP] in none
    owned = sorted(i for u in units for i in u.tokens)
    assert owned == list(range(1, len(tokens) - 1))
    assert tokens[0] == "[CLS]" and tokens[-1] == "[SEP]"


def test_pooling_clip_bpe_and_cxr_tokenizers():
    from diffmem.pipelines import train_tokenizer

    units, tokens = pool_tokens("Seen at ___.", tiny_clip_tokenizer())
    last = units[-1]  # CLIP's BPE glues the marker to the full stop: one unit, keyed ___
    assert last.kind == "marker" and last.key == "___" and tokens[last.tokens[0]] == "___.</w>"

    cxr = train_tokenizer(["Dr. ___ was notified.", "Seen at [**Hospital 12**]."] * 5,
                          vocab_size=120)
    prompt = "Dr. ____ seen at [** Hospital 3 **] today."
    units, tokens = pool_tokens(prompt, cxr)
    # the normalizer rewrites both markers; their offsets cover only the last character
    kinds = {u.text: (u.kind, u.key, [tokens[i] for i in u.tokens]) for u in units}
    assert kinds["____"] == ("marker", "___", ["___"])
    assert kinds["[** Hospital 3 **]"] == ("marker", "[** **]", ["[****]"])
    assert [u.text for u in units] == ["Dr", ".", "____", "seen", "at", "[** Hospital 3 **]",
                                       "today", "."]


def test_pooling_over_maximum_length(bert_tokenizer):
    long = "Dr. ___ was seen at ___. " * 4
    with pytest.raises(PromptError, match="has 50 tokens but the text encoder reads 16"):
        pool_tokens(long, bert_tokenizer)
    units, tokens = pool_tokens(long, bert_tokenizer, truncate=True)
    assert len(tokens) == 16 and max(i for u in units for i in u.tokens) == 14
    with pytest.raises(PromptError, match="empty"):
        pool_tokens("   ", bert_tokenizer)


# ---------------------------------------------------------------------------- methods
def test_gradient_matches_finite_differences(sd64):
    """Each token's score is the norm of the gradient of the noise magnitude with respect to its
    text embedding (a unit's: the mean over its tokens); check both against central differences
    along every embedding axis."""
    from diffmem.detect.scores import noise_magnitude

    prompt = "Dr. ___ was notified."
    result = attribute(sd64, prompt, method="gradient", generations=1)
    assert result.memorization == pytest.approx(
        float(noise_magnitude(sd64, [prompt], generations=1)[0]), rel=1e-9)

    cond, uncond = sd64.encode_prompt([prompt])
    cond = cond.detach()
    g = torch.Generator("cpu").manual_seed(generation_seed(0, prompt, 0))
    x_t = torch.randn((1, *sd64.latent_shape), generator=g, dtype=torch.float64)
    scheduler = type(sd64.scheduler).from_config(sd64.scheduler.config)
    scheduler.set_timesteps(50)
    t = scheduler.timesteps[0]
    h = 1e-5
    for unit in (result.units[2], result.units[4]):  # "___" (1 token), "notified" (3 tokens)
        rows = []
        for i in unit.tokens:
            for k in range(cond.shape[2]):
                for sign in (1, -1):
                    e = cond.clone()
                    e[0, i, k] += sign * h
                    rows.append(e)
        batch = torch.cat(rows)
        x = x_t.expand(len(rows), -1, -1, -1)
        with torch.no_grad():  # the magnitude in float64 (the score function returns float32)
            diff = sd64.predict_noise(x, t, batch) - sd64.predict_noise(x_t, t, uncond)
        d = diff.flatten(1).norm(dim=1)
        derivative = (d[0::2] - d[1::2]).view(len(unit.tokens), -1) / (2 * h)
        per_token = derivative.norm(dim=1)  # each token's gradient norm; the unit: their mean
        assert result.token_scores[list(unit.tokens)] == pytest.approx(per_token.tolist(),
                                                                       rel=1e-4)
        expected = float(per_token.mean())
        score = float(result.scores[result.units.index(unit)])
        assert score == pytest.approx(expected, rel=1e-4)
    assert len(result.units[4].tokens) == 3 and len(result.units[2].tokens) == 1


def test_methods_share_units_and_memorization(sd):
    results = {m: attribute(sd, PROMPT, method=m, **FAST) for m in list_methods()}
    assert list_methods() == ["attention", "gradient", "integrated_gradients", "occlusion"]
    texts = ["Dr", ".", "___", "was", "notified", "of", "the", "right", "lower", "lobe",
             "pneumonia", "."]
    for name, r in results.items():
        assert r.method == name and r.texts == texts
        assert np.isfinite(r.scores).all() and r.scores.shape == (len(texts),)
        assert r.memorization == pytest.approx(results["gradient"].memorization, rel=1e-5)
    att = results["attention"]
    assert (att.scores > 0).all() and att.scores.sum() < 1  # the start token takes the rest
    assert att.token_scores[0] > 0 and att.token_scores.sum() == pytest.approx(1.0, abs=1e-6)
    assert results["gradient"].token_scores[0] == 0  # special tokens belong to no unit
    payload = json.loads(json.dumps(results["occlusion"].to_dict()))
    assert sorted(u["rank"] for u in payload["units"]) == list(range(1, len(texts) + 1))


def test_occlusion_is_the_paired_magnitude_drop(sd):
    """Occluding "was" equals the drop to the prompt written without it, on the same noise."""
    from diffmem.detect.scores import noise_magnitude_from_embeddings

    prompt = "Dr. ___ was notified."
    result = attribute(sd, prompt, method="occlusion", generations=1)
    g = torch.Generator("cpu").manual_seed(generation_seed(0, prompt, 0))
    x_t = torch.randn((1, *sd.latent_shape), generator=g)
    scheduler = type(sd.scheduler).from_config(sd.scheduler.config)
    scheduler.set_timesteps(50)
    with torch.no_grad():
        full = sd.encode_prompt([prompt])
        cut = sd.encode_prompt(["Dr. ___ notified."])
        d_full = noise_magnitude_from_embeddings(sd, *full, x_t, scheduler.timesteps[0])
        d_cut = noise_magnitude_from_embeddings(sd, *cut, x_t, scheduler.timesteps[0])
    assert result.texts[3] == "was"
    assert result.scores[3] == pytest.approx(float(d_full - d_cut), abs=1e-5)
    assert result.details["magnitude_drop"] == pytest.approx(result.scores.tolist())
    padded = attribute(sd, prompt, method="occlusion", generations=1, mode="pad")
    assert padded.params["mode"] == "pad" and not np.allclose(padded.scores, result.scores)


def test_occlusion_similarity_target(sd):
    rng = np.random.default_rng(0)
    reference = rng.random((5, 16, 16), dtype=np.float32)
    result = attribute(sd, "Dr. ___ was notified.", method="occlusion", generations=1,
                       num_inference_steps=2, target="similarity", reference=reference)
    assert -1 <= result.details["similarity"] <= 1
    assert result.scores.tolist() == pytest.approx(result.details["similarity_drop"])
    with pytest.raises(ConfigError, match="needs reference="):
        attribute(sd, PROMPT, method="occlusion", target="similarity")
    with pytest.raises(ConfigError, match=r"mode='drop'; use one of \['remove', 'pad'\]"):
        attribute(sd, PROMPT, method="occlusion", mode="drop")


# ---------------------------------------------------------------------------- bad input
def test_unknown_method_lists_methods(sd):
    with pytest.raises(ConfigError, match="unknown attribution method 'saliency'; known methods: "
                                          "attention, gradient, integrated_gradients, occlusion"):
        attribute(sd, PROMPT, method="saliency")
    with pytest.raises(ConfigError, match=r"takes no option\(s\) \['mode'\]"):
        attribute(sd, PROMPT, method="gradient", mode="pad")


@pytest.mark.parametrize("prompt", ["___ ___", "___, ___.", "XXXX"])
def test_prompt_made_only_of_markers(sd, prompt):
    with pytest.raises(PromptError, match="made only of de-identification markers"):
        attribute(sd, prompt, method="gradient")


def test_prompt_over_maximum_length(sd):
    long = "Dr. ___ was notified of the right lower lobe pneumonia. " * 4
    assert sd.count_tokens(long) > sd.max_length
    with pytest.raises(PromptError, match=f"but the text encoder reads {sd.max_length}"):
        attribute(sd, long, method="attention")
    result = attribute(sd, long, method="attention", truncate=True, **FAST)
    assert result.units[-1].end < len(long) and max(result.units[-1].tokens) < sd.max_length


# ---------------------------------------------------------------------------- faithfulness
def test_deletion_test(sd):
    prompts = ["Dr. ___ was notified.", "Right lower lobe pneumonia.", "___ ___"]
    res = deletion_test(sd, prompts, method="occlusion", **FAST)
    assert res.prompts == prompts[:2] and res.skipped[0][0] == "___ ___"
    # occlusion's top unit is the largest drop: never below the mean drop
    assert (res.drop_top >= res.drop_random - 1e-12).all()
    ok = ~np.isnan(res.ratios)
    assert np.allclose(res.ratios[ok], res.drop_top[ok] / res.drop_random[ok])
    assert res.mean_ratio == pytest.approx(float(res.ratios[ok].mean()))
    grad = deletion_test(sd, prompts[:2], method="gradient", **FAST)
    assert grad.drop_random == pytest.approx(res.drop_random)  # same deletions, same noise
    assert set(json.loads(json.dumps(grad.to_dict()))) >= {"mean_ratio", "ratio_of_means",
                                                             "per_prompt"}
    # position-preserving deletion: the same drops as occlusion with padding
    pad = deletion_test(sd, prompts[:1], method="occlusion", deletion="pad", **FAST)
    padded = occlusion(sd, prompts[0], mode="pad", **FAST)
    assert pad.drop_random[0] == pytest.approx(padded.scores.mean())
    assert pad.drop_random[0] != pytest.approx(res.drop_random[0])
    assert pad.params["deletion"] == "pad"
    with pytest.raises(ConfigError, match="no prompts"):
        deletion_test(sd, [])
    with pytest.raises(ConfigError, match="occlusion mode"):
        deletion_test(sd, prompts[:1], deletion="blank", **FAST)


# ---------------------------------------------------------------------------- rendering
def test_render_escapes_prompt_text(sd, tmp_path):
    prompt = "<script>alert('x')</script> Dr. ___ & $NAME$ notified."
    result = attribute(sd, prompt, method="attention", truncate=True, **FAST)
    snippet = render_html(result)
    assert "<script" not in snippet and "</script" not in snippet and "&amp;" in snippet
    assert snippet.count('class="diffmem-unit') == len(result.units)
    # with the markup taken away, the prompt paragraph reads exactly as the prompt
    paragraph = re.search(r'<p class="diffmem-prompt"[^>]*>(.*?)</p>', snippet).group(1)
    assert html.unescape(re.sub(r"<[^>]+>", "", paragraph)) == prompt
    assert "<script>" not in html_page(result)
    png = render_png(result, tmp_path / "a.png")
    with Image.open(png) as im:
        rgb = np.asarray(im.convert("RGB"), dtype=np.int64)
    assert rgb.shape[0] > 40 and rgb.shape[1] > 200
    # heat colours are drawn: some pixels are clearly red-orange (R high, B low)
    assert ((rgb[..., 0] > 200) & (rgb[..., 2] < 120)).sum() > 50
    assert json.loads(save_attribution(result, tmp_path / "a.json").read_text())["method"] \
        == "attention"
    with pytest.raises(ConfigError, match=r"\.html"):
        save_attribution(result, tmp_path / "a.txt")


# ---------------------------------------------------------------------------- CLI
def test_cli_attribute(sd_folder, tmp_path, capsys):
    out = tmp_path / "prompt.html"
    code = main(["-q", "attribute", "--model", str(sd_folder), PROMPT, "--method", "attention",
                 "--generations", "1", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "attention attribution of 12 units" in printed and "___" in printed
    assert "diffmem-unit" in out.read_text()

    assert main(["attribute", "--model", str(sd_folder), PROMPT, "--method", "lime"]) == 2
    assert "known methods: attention, gradient, integrated_gradients, occlusion" in capsys.readouterr().err
    assert main(["attribute", "--model", str(sd_folder), "___ ___"]) == 2
    assert "only of de-identification markers" in capsys.readouterr().err
    assert main(["attribute", "--model", str(sd_folder), PROMPT * 4]) == 2
    assert "truncate=True (--truncate)" in capsys.readouterr().err
