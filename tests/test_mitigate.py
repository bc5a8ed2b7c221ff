"""Mitigation registry and methods: strength 0 is the plain pipeline bit for bit, and each method
changes what it says it changes (on the tiny Stable Diffusion pipeline)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch.nn.utils import prune

from diffmem.errors import ConfigError
from diffmem.mitigate import nemo
from diffmem.mitigate import (get_mitigation, list_mitigations, mitigation_hooks,
                              register_mitigation)
from diffmem.models import SamplingHooks, combine_hooks, load_model
from diffmem.models.tiny import tiny_stable_diffusion

PROMPTS = ["Dr. ___ was notified by phone at ___.", "No acute cardiopulmonary process."]
SAMPLE = {"n_per_prompt": 2, "steps": 3, "seed": 0}
ALL = ["attention_rescaling", "caption_word_repetition", "deid_marker_randomization",
       "deid_marker_removal", "dynamic_opposite_guidance", "gaussian_noise_embedding",
       "guidance_delay", "magnitude_pruning", "nemo_deactivation", "opposite_guidance",
       "prompt_embedding_optimization", "random_number_addition", "random_token_insertion"]
#: Settings a method needs beyond its preset in these tests (NeMo: a fixed neuron set).
PARAMS = {"nemo_deactivation": {
    "neurons": {"mid_block.attentions.0.transformer_blocks.0.attn2.to_v": [0, 1, 2]}}}


@pytest.fixture(scope="module")
def model():
    return load_model(tiny_stable_diffusion(seed=0))


@pytest.fixture(scope="module")
def plain(model):
    return model.sample(PROMPTS, **SAMPLE)


def _record_embeds(store: dict) -> SamplingHooks:
    def prompt_embeds(cond, uncond, prompts):
        store["cond"], store["uncond"] = cond.clone(), uncond.clone()
        return cond, uncond
    return SamplingHooks(prompt_embeds=prompt_embeds)


def _embeds(model, hooks) -> dict:
    seen: dict = {}
    model.sample(PROMPTS, **SAMPLE, hooks=combine_hooks(hooks, _record_embeds(seen)))
    return seen


# ---------------------------------------------------------------------------- registry
def test_registry_lists_every_method_and_unknown_names_fail():
    assert list_mitigations() == ALL
    with pytest.raises(ConfigError, match="unknown mitigation 'nope'; registered: "
                                          "attention_rescaling, caption_word_repetition"):
        get_mitigation("nope")


def test_paper_defaults_come_from_the_presets():
    assert get_mitigation("gaussian_noise_embedding").default_strength == 0.1
    assert get_mitigation("attention_rescaling").default_strength == 0.25  # c1 = 1.25
    assert get_mitigation("random_token_insertion").default_strength == 4
    assert get_mitigation("caption_word_repetition").default_strength == 4
    assert get_mitigation("guidance_delay").default_strength == 0.5  # until t = 500
    assert get_mitigation("opposite_guidance").default_strength == 0.35  # until t = 650
    assert get_mitigation("opposite_guidance").params["scale"] == -2.0
    peo = get_mitigation("prompt_embedding_optimization")
    assert peo.default_strength == 10 and peo.params["lr"] == 0.05


def test_strength_out_of_range_gives_the_range(model):
    with pytest.raises(ConfigError, match=r"outside the range of guidance_delay: use a number "
                                          r"in \[0, 1\]"):
        mitigation_hooks("guidance_delay", model, 1.5)
    with pytest.raises(ConfigError, match=r"whole number in \[0, 32\]"):
        mitigation_hooks("random_token_insertion", model, 2.5)
    with pytest.raises(ConfigError, match="has no parameter lr2"):
        mitigation_hooks("prompt_embedding_optimization", model, lr2=1)


def test_register_a_custom_mitigation(model):
    def build(adapter, strength, *, params, seed):
        return SamplingHooks(guidance_scale=lambda i, t, d: d * (1 - strength))

    entry = register_mitigation("no_guidance_test", build, preset={
        "default_strength": 1.0, "strength_range": [0, 1], "strength": "fraction removed",
        "paper": "test"})
    try:
        assert "no_guidance_test" in list_mitigations()
        assert mitigation_hooks("no_guidance_test", model).guidance_scale(0, 981, 7.5) == 0.0
        assert entry.to_dict()["strength_range"] == [0.0, 1.0]
    finally:
        from diffmem.mitigate import registry

        registry._REGISTRY.unregister("no_guidance_test")
    with pytest.raises(ConfigError, match="must hold 0"):
        register_mitigation("bad_range", build, preset={
            "default_strength": 2.0, "strength_range": [1, 3], "strength": "x", "paper": "p"})


# ---------------------------------------------------------------------------- strength 0
@pytest.mark.parametrize("name", ALL)
def test_strength_zero_is_the_plain_pipeline_bit_for_bit(model, plain, name):
    result = model.sample(PROMPTS, **SAMPLE,
                          hooks=mitigation_hooks(name, model, 0, **PARAMS.get(name, {})))
    assert np.array_equal(result.images, plain.images)


@pytest.mark.parametrize("name", ALL)
def test_default_strength_changes_the_images_and_is_seeded(model, plain, name):
    extra = PARAMS.get(name, {})
    a = model.sample(PROMPTS, **SAMPLE, hooks=mitigation_hooks(name, model, seed=3, **extra))
    b = model.sample(PROMPTS, **SAMPLE, hooks=mitigation_hooks(name, model, seed=3, **extra))
    assert np.array_equal(a.images, b.images)
    changed = ~np.isclose(a.images, plain.images).reshape(len(a), -1).all(axis=1)
    if name.startswith("deid_"):  # only the prompt with markers changes
        assert changed.tolist() == [True, True, False, False]
    else:
        assert changed.all()


# ---------------------------------------------------------------------------- what each changes
def test_gaussian_noise_adds_lambda_scaled_standard_noise(model):
    plain = _embeds(model, None)
    small = _embeds(model, mitigation_hooks("gaussian_noise_embedding", model, 0.1, seed=1))
    large = _embeds(model, mitigation_hooks("gaussian_noise_embedding", model, 0.5, seed=1))
    d_small = small["cond"] - plain["cond"]
    d_large = large["cond"] - plain["cond"]
    torch.testing.assert_close(d_large, 5 * d_small, rtol=1e-4, atol=1e-5)  # same draw, x lambda
    assert abs(float((d_small / 0.1).std()) - 1.0) < 0.05  # N(0, I) per element
    assert not torch.allclose(d_small[0], d_small[1])  # one draw per generation
    assert torch.equal(small["uncond"], plain["uncond"])


def test_noise_does_not_depend_on_batching(model):
    hooks = mitigation_hooks("gaussian_noise_embedding", model, 0.3, seed=2)
    together = model.sample(PROMPTS, n_per_prompt=2, steps=2, seed=0, hooks=hooks, batch_size=4)
    apart = model.sample(PROMPTS, n_per_prompt=2, steps=2, seed=0, hooks=hooks, batch_size=1)
    np.testing.assert_allclose(together.images, apart.images, atol=1e-5)


def _texts(model, name, strength, prompt, n=3):
    """The prompts a text-level method produces for ``n`` generations of ``prompt``."""
    import importlib

    module = {"caption_word_repetition": "word_repetition",
              "random_number_addition": "number_addition",
              "deid_marker_removal": "deid_markers",
              "deid_marker_randomization": "deid_markers"}[name]
    mod = importlib.import_module(f"diffmem.mitigate.{module}")
    seen, orig = [], mod.text_hook

    def spy(adapter, transform, *, name, seed):
        def wrapped(text, rng):
            seen.append(transform(text, rng))
            return seen[-1]
        return orig(adapter, wrapped, name=name, seed=seed)

    mod.text_hook = spy
    try:
        model.sample([prompt], n_per_prompt=n, steps=1, seed=0,
                     hooks=mitigation_hooks(name, model, strength, seed=0))
    finally:
        mod.text_hook = orig
    return seen


def test_caption_word_repetition_repeats_prompt_words(model):
    prompt = "Stable small left pleural effusion."
    for text in _texts(model, "caption_word_repetition", 4, prompt):
        words, orig = text.split(), prompt.split()
        assert len(words) == len(orig) + 4 and set(words) == set(orig)


def test_random_number_addition_inserts_numbers(model):
    prompt = "Stable small left pleural effusion."
    texts = _texts(model, "random_number_addition", 2, prompt)
    assert len(set(texts)) == 3  # each generation its own numbers
    for text in texts:
        extra = [w for w in text.split() if w not in prompt.split()]
        assert len(extra) == 2 and all(w.isdigit() and int(w) <= 10**6 for w in extra)


def test_deid_marker_removal_and_randomization(model):
    prompt = "Dr. ___ was notified by phone at ___."
    assert _texts(model, "deid_marker_removal", 1.0, prompt)[0] == \
        "Dr. was notified by phone at."
    for text in _texts(model, "deid_marker_randomization", 1.0, prompt):
        assert "___" not in text and text.startswith("Dr. ") and text.endswith(".")
        assert len(text.split()) == len(prompt.split())
    assert _texts(model, "deid_marker_removal", 1.0, "No acute process.") == \
        ["No acute process."] * 3


def test_random_token_insertion_adds_vocabulary_tokens(model):
    from diffmem.mitigate import token_insertion

    captured = {}
    orig = model.encode_tokens

    def spy(ids, mask=None):
        captured["ids"], captured["mask"] = ids.clone(), mask.clone()
        return orig(ids, mask)

    hooks = token_insertion.build(model, 4, params={}, seed=0)
    cond, uncond = model.encode_prompt(PROMPTS[1:])
    model.encode_tokens = spy
    try:
        gens = [torch.Generator().manual_seed(5)]
        hooks.prompt_embeds(cond, uncond, PROMPTS[1:], gens)
    finally:
        model.encode_tokens = orig
    before = model.tokenize(PROMPTS[1:])
    n = int(before["attention_mask"].sum())
    assert int(captured["mask"].sum()) == n + 4
    new = captured["ids"][0, :n + 4].tolist()
    old = before["input_ids"][0, :n].tolist()
    assert new[0] == old[0] and new[-1] == old[-1]  # BOS and EOS kept
    special = set(model.tokenizer.all_special_ids)
    inserted = list(new[1:-1])
    for tok in old[1:-1]:
        inserted.remove(tok)
    assert len(inserted) == 4 and not set(inserted) & special


def test_attention_rescaling_scales_the_bos_logit_and_masks_beyond_the_prompt(model):
    seen = []

    def before(logits, ctx):
        seen.append(("in", logits.clone(), ctx))
        return logits

    def after(logits, ctx):
        seen.append(("out", logits.clone(), ctx))
        return logits

    probs = []
    hooks = combine_hooks(SamplingHooks(attention_logits=before),
                          mitigation_hooks("attention_rescaling", model),
                          SamplingHooks(attention_logits=after,
                                        attention_probs=lambda p, c: probs.append((p.clone(), c))))
    model.sample(PROMPTS, n_per_prompt=1, steps=1, seed=0, hooks=hooks)
    assert seen and len(seen) % 2 == 0
    for (_, x, ctx), (_, y, _) in zip(seen[::2], seen[1::2]):
        rows = ctx.conditional_rows
        torch.testing.assert_close(y[rows, :, 0], 1.25 * x[rows, :, 0])  # c1 = 1.25
        pad = ctx.per_head(ctx.token_mask) == 0
        assert pad[rows].any()
        assert torch.isinf(y[rows][pad[rows][:, None, :].expand_as(y[rows])]).all()
        keep = ~pad[rows]
        assert torch.equal(y[rows][:, :, 1:][keep[:, 1:][:, None, :].expand_as(y[rows][:, :, 1:])],
                           x[rows][:, :, 1:][keep[:, 1:][:, None, :].expand_as(x[rows][:, :, 1:])])
        assert torch.equal(y[~rows], x[~rows])  # the unconditional branch is untouched
    for p, ctx in probs:  # masked keys get no attention in the conditional branch
        rows, pad = ctx.conditional_rows, ctx.per_head(ctx.token_mask) == 0
        assert float(p[rows].transpose(1, 2)[pad[rows]].abs().max()) == 0.0


def test_guidance_delay_and_opposite_guidance_schedules(model):
    steps = model._sampling_timesteps(20).tolist()

    def schedule(hooks):
        return [hooks.guidance_scale(i, int(t), 7.5) for i, t in enumerate(steps)]

    delay = schedule(mitigation_hooks("guidance_delay", model))
    assert [s for s, t in zip(delay, steps) if t > 500] == [0.0] * sum(t > 500 for t in steps)
    assert all(s == 7.5 for s, t in zip(delay, steps) if t <= 500)
    opposite = schedule(mitigation_hooks("opposite_guidance", model))
    assert all(s == -2.0 for s, t in zip(opposite, steps) if t > 650)
    assert all(s == 7.5 for s, t in zip(opposite, steps) if t <= 650)


def test_guidance_delay_skips_the_conditional_branch(model):
    seen = []
    hooks = combine_hooks(mitigation_hooks("guidance_delay", model),
                          SamplingHooks(on_step=lambda i, t, x, u, c: seen.append((t, c is None))))
    model.sample(PROMPTS[:1], steps=10, seed=0, hooks=hooks)
    assert [skipped for _, skipped in seen] == [t > 500 for t, _ in seen]


def test_dynamic_guidance_switches_when_the_pull_drops(model):
    hooks = mitigation_hooks("dynamic_opposite_guidance", model, 1.0, drop=0.5)
    d = torch.tensor([4.0, 2.0])
    u = torch.zeros(2, 1)
    assert hooks.guidance_scale(0, 981, 7.5) == -2.0
    hooks.on_step(0, 981, None, u, torch.tensor([[4.0], [2.0]]))
    assert hooks.guidance_scale(1, 900, 7.5) == -2.0
    hooks.on_step(1, 900, None, u, torch.tensor([[1.0], [1.5]]))  # row 1 still above 1.0
    assert hooks.guidance_scale(2, 800, 7.5) == -2.0
    hooks.on_step(2, 800, None, u, torch.tensor([[1.0], [0.9]]))  # both below half: switch
    assert hooks.guidance_scale(3, 700, 7.5) == 7.5
    hooks.on_step(3, 700, None, u, d[:, None] * 10)  # stays switched
    assert hooks.guidance_scale(4, 600, 7.5) == 7.5
    assert hooks.guidance_scale(0, 981, 7.5) == -2.0  # a new batch starts over
    capped = mitigation_hooks("dynamic_opposite_guidance", model, 0.2)
    assert capped.guidance_scale(0, 981, 7.5) == -2.0 and capped.guidance_scale(1, 700, 7.5) == 7.5


def test_prompt_embedding_optimization_lowers_the_noise_magnitude(model):
    from diffmem.detect.scores import noise_magnitude_from_embeddings

    captured = {}

    def probe(cond, uncond, prompts, latents, timesteps):
        captured.update(cond=cond.clone(), uncond=uncond, x=latents.clone(), t=timesteps[0])
        return cond, uncond

    def magnitude(hooks):
        model.sample(PROMPTS, n_per_prompt=1, steps=5, seed=0,
                     hooks=combine_hooks(hooks, SamplingHooks(prompt_embeds=probe)))
        with torch.no_grad():
            return noise_magnitude_from_embeddings(model, captured["cond"], captured["uncond"],
                                                   captured["x"] * 1.0, captured["t"]), \
                captured["cond"]

    before, e0 = magnitude(None)
    after, e1 = magnitude(mitigation_hooks("prompt_embedding_optimization", model, 10))
    assert (after < before).all()
    assert torch.equal(e1[:, 0], e0[:, 0])  # BOS embedding never changes
    assert not torch.equal(e1[:, 1:], e0[:, 1:])
    # stops as soon as the target is reached: a target above the start changes nothing
    stop, e2 = magnitude(mitigation_hooks("prompt_embedding_optimization", model, 10,
                                          target=float(before.max()) + 1))
    assert torch.equal(e2, e0)
    weights = {k: v.clone() for k, v in model.unet.state_dict().items()}
    magnitude(mitigation_hooks("prompt_embedding_optimization", model, 2))
    assert all(torch.equal(weights[k], v) for k, v in model.unet.state_dict().items())
    assert all(p.grad is None for p in model.unet.parameters())


# ---------------------------------------------------------------------------- neurons and pruning
# NeMo neuron deactivation (Hintersdorf et al., NeurIPS 2024) and magnitude pruning of the
# cross-attention projections: deactivated neurons output exactly zero, pruning matches
# torch.nn.utils.prune, and NeMo's search on a known answer.
REFERENCE = ["Small left effusion.", "Heart size is normal.", "Lungs are clear."]


def _capture(name: str, store: list) -> SamplingHooks:
    def hook(module, inputs, output):
        store.append(output.detach().clone())
    return SamplingHooks(module_hooks={name: hook})


@pytest.mark.parametrize("name,params", [
    ("nemo_deactivation", {"reference_prompts": REFERENCE}),
    ("nemo_deactivation", {"neurons": {"mid_block.attentions.0.transformer_blocks.0.attn2.to_v":
                                       [1]}}),
    ("magnitude_pruning", {})])
def test_neuron_methods_at_strength_zero_are_the_plain_pipeline(model, plain, name, params):
    result = model.sample(PROMPTS, **SAMPLE, hooks=mitigation_hooks(name, model, 0, **params))
    assert np.array_equal(result.images, plain.images)


def test_deactivated_neurons_output_exactly_zero(model, plain):
    layer = nemo.value_layers(model)[0]
    off = [0, 5, 17]
    seen_plain, seen_off, seen_half = [], [], []
    model.sample(PROMPTS, **SAMPLE, hooks=_capture(layer, seen_plain))
    for strength, store in ((1.0, seen_off), (0.5, seen_half)):
        hooks = mitigation_hooks("nemo_deactivation", model, strength, neurons={layer: off})
        result = model.sample(PROMPTS, **SAMPLE, hooks=combine_hooks(hooks,
                                                                     _capture(layer, store)))
    assert len(seen_off) == len(seen_plain) == SAMPLE["steps"]  # every UNet pass
    for a, b, h in zip(seen_plain, seen_off, seen_half):
        assert torch.all(b[..., off] == 0) and torch.all(a[..., off] != 0)
        keep = [i for i in range(a.shape[-1]) if i not in off]
        assert torch.equal(a[..., keep], b[..., keep])
        assert torch.allclose(h[..., off], 0.5 * a[..., off])
    assert not np.array_equal(result.images, plain.images)
    with pytest.raises(ConfigError, match="neurons must map each to_v layer"):
        mitigation_hooks("nemo_deactivation", model, 1.0, neurons={layer: "0"})
    with pytest.raises(ConfigError, match="needs either neurons"):
        mitigation_hooks("nemo_deactivation", model, 1.0)


def test_unknown_module_names_are_refused(model):
    with pytest.raises(Exception, match="not a submodule of this UNet"):
        model.sample(PROMPTS[:1], steps=1, hooks=nemo.deactivation_hooks({"nope.to_v": [0]}))


def test_pruning_matches_torch_prune_and_zeroes_the_ratio(model, plain):
    hooks = mitigation_hooks("magnitude_pruning", model, 0.3)
    assert len(hooks.module_hooks) == 2 * len(nemo.value_layers(model))  # to_k and to_v
    modules = dict(model.unet.named_modules())
    x = torch.randn(2, 7, modules[nemo.value_layers(model)[0]].in_features,
                    generator=torch.Generator().manual_seed(0))
    for name, hook in hooks.module_hooks.items():
        module = modules[name]
        reference = copy.deepcopy(module)
        prune.l1_unstructured(reference, "weight", amount=0.3)
        n = module.weight.numel()
        assert int((reference.weight == 0).sum()) == round(0.3 * n)
        with torch.no_grad():
            assert torch.allclose(hook(module, (x,), module(x)), reference(x), atol=1e-6)
    assert not np.array_equal(model.sample(PROMPTS, **SAMPLE, hooks=hooks).images,
                              plain.images)
    with pytest.raises(ConfigError, match="projections=.*choose from to_q, to_k, to_v"):
        mitigation_hooks("magnitude_pruning", model, 0.3, projections=["to_out"])


def test_candidate_neurons_hand_computed():
    stats = nemo.ReferenceStatistics({"v": np.zeros(5)}, {"v": np.full(5, 2.0)}, tau=0.5,
                                     prompts=3)
    acts = {"v": np.array([1.0, -9.0, 4.5, 0.0, 12.0])}  # z = 0.5, 4.5, 2.25, 0, 6
    assert nemo.candidate_neurons(acts, stats, 5.0, 0) == {"v": [4]}
    assert nemo.candidate_neurons(acts, stats, 2.0, 0) == {"v": [1, 2, 4]}
    assert nemo.candidate_neurons(acts, stats, 5.0, 2) == {"v": [1, 4]}  # top |a|: 12, -9


def test_search_finds_the_planted_neuron_and_refines_the_rest():
    """An oracle memorization strength: high unless neuron 2 of layer "b" is deactivated.
    Neuron 0 of "a" is more out of distribution (z = 8) but irrelevant: the initial selection
    must lower theta to 3 to reach neuron b/2 (z = 3.5), and refinement must drop a/0."""
    stats = nemo.ReferenceStatistics({"a": np.zeros(3), "b": np.zeros(4)},
                                     {"a": np.ones(3), "b": np.ones(4)}, tau=0.4, prompts=4)
    acts = {"a": np.array([8.0, 0.1, 0.2]), "b": np.array([0.3, 0.0, 3.5, 0.2])}
    calls = []

    def strength(blocked):
        calls.append(blocked)
        return 0.1 if 2 in blocked.get("b", []) else 0.9

    neurons, info = nemo.select_neurons(acts, stats, strength, theta=5.0, theta_step=0.5,
                                        max_k=0)
    assert neurons == {"b": [2]}
    assert info["theta"] == 3.0 and info["initial"] == 2 and info["refined"] == 1
    assert info["mitigated"] and info["strength"] == 0.9 and info["strength_after"] == 0.1
    # not memorized (strength at most tau): nothing is searched
    assert nemo.select_neurons(acts, stats, lambda b: 0.2)[0] == {}


def test_localization_on_a_model_runs_end_to_end(model):
    stats = nemo.reference_statistics(model, REFERENCE, n_seeds=3)
    assert set(stats.mean) == set(nemo.value_layers(model)) and stats.prompts == 3
    assert all(np.all(s > 0) for s in stats.std.values())
    strength = nemo.memorization_strength(model, PROMPTS[0], n_seeds=3)
    assert -1 <= strength <= 1
    stats.tau = strength - 1e-3  # count the prompt as memorized, to run the search
    neurons, info = nemo.localize_neurons(model, PROMPTS[0], stats, n_seeds=3, theta=1.5,
                                          theta_step=0.5, max_k=1)
    assert info["strength"] == pytest.approx(strength) and info["k"] <= 1
    # what it returns, deactivated, gives the strength it reports
    assert nemo.memorization_strength(model, PROMPTS[0], neurons, n_seeds=3) == \
        pytest.approx(info["strength_after"])
    with pytest.raises(ConfigError, match="at least 2 distinct non-memorized"):
        nemo.reference_statistics(model, ["one prompt"])


def test_localized_neurons_are_deactivated_only_in_their_prompts_generations(model, plain,
                                                                             monkeypatch):
    layer = nemo.value_layers(model)[0]
    found = {PROMPTS[0]: {layer: [0, 3]}, PROMPTS[1]: {}}
    # the search itself is tested above; here only which rows get which neurons
    monkeypatch.setattr(nemo, "localize_neurons", lambda adapter, prompt, stats, **kw:
                        (found[prompt], {}))
    seen: list = []
    hooks = mitigation_hooks("nemo_deactivation", model, 1.0, reference_prompts=REFERENCE)
    result = model.sample(PROMPTS, **SAMPLE, hooks=combine_hooks(hooks, _capture(layer, seen)))
    rows = len(PROMPTS) * SAMPLE["n_per_prompt"]
    for out in seen:  # guided passes: [uncond; cond], generations prompt-major
        assert out.shape[0] == 2 * rows
        mine = torch.tensor([True, True, False, False] * 2)
        assert torch.all(out[mine][..., [0, 3]] == 0)
        assert torch.all(out[~mine][..., [0, 3]] != 0)
    assert np.array_equal(result.images[2:], plain.images[2:])  # the other prompt: untouched
    assert not np.array_equal(result.images[:2], plain.images[:2])
