"""CLIPMem (Wang et al., ICLR 2025): the S_S/S_C/S_I/S_E split, alignment under augmentations
against hand-computed values, f = g gives zero, the resumable end-to-end run and the CLI."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from diffmem.clipmem import (clipmem_score, dataset_alignment, pair_alignment, run_clipmem,
                             score_pairs, split_pairs)
from diffmem.clipmem.run import COLUMNS
from diffmem.data import CXRDataset, Study
from diffmem.embed import load_encoder
from diffmem.errors import ConfigError, DataError, TrainingError


class KnownEncoder:
    """A tiny model with known embeddings: image -> (mean, 1 - mean) normalized, or one fixed
    vector (``constant``); prompt -> a fixed vector per prompt."""

    image_size = 16

    def __init__(self, texts: dict[str, list[float]], constant: list[float] | None = None):
        self.texts, self.constant = texts, constant

    def embed_images(self, x):
        x = np.asarray(x, dtype=np.float64)
        if self.constant is not None:
            e = np.tile(self.constant, (len(x), 1))
        else:
            m = x.mean(axis=(1, 2))
            e = np.stack([m, 1 - m], axis=1)
        return e / np.linalg.norm(e, axis=1, keepdims=True)

    def embed_texts(self, prompts):
        e = np.array([self.texts[p] for p in prompts], dtype=np.float64)
        return e / np.linalg.norm(e, axis=1, keepdims=True)


# ---------------------------------------------------------------------------------- alignment
def test_alignment_hand_computed_plain_pairs():
    enc = KnownEncoder({"a": [1.0, 0.0], "b": [1.0, 1.0]})
    imgs = np.stack([np.full((16, 16), 0.25), np.full((16, 16), 0.75)]).astype(np.float32)
    got = pair_alignment(enc, imgs, ["a", "b"], views=0)
    # image 1: (0.25, 0.75)/|.| . (1, 0) = 0.25 / sqrt(0.625); image 2: (0.75, 0.25) . (1, 1)/√2
    want = [0.25 / np.sqrt(0.25**2 + 0.75**2), (0.75 + 0.25) / np.sqrt(0.625) / np.sqrt(2)]
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_alignment_is_the_mean_over_views():
    # with an image embedding that ignores the pixels every view has the same cosine: 3/5
    enc = KnownEncoder({"a": [1.0, 0.0]}, constant=[3.0, 4.0])
    imgs = np.random.default_rng(0).random((3, 16, 16)).astype(np.float32)
    np.testing.assert_allclose(pair_alignment(enc, imgs, ["a"] * 3, views=5), [0.6] * 3)
    # with a pixel-dependent embedding the views move the value, reproducibly per seed
    enc = KnownEncoder({"a": [1.0, 0.0]})
    plain = pair_alignment(enc, imgs, ["a"] * 3, views=0)
    v0 = pair_alignment(enc, imgs, ["a"] * 3, views=4, seed=0)
    assert not np.allclose(plain, v0)
    np.testing.assert_array_equal(v0, pair_alignment(enc, imgs, ["a"] * 3, views=4, seed=0))
    assert not np.allclose(v0, pair_alignment(enc, imgs, ["a"] * 3, views=4, seed=1))


def test_alignment_rejects_mismatched_inputs():
    enc = KnownEncoder({"a": [1.0, 0.0]})
    with pytest.raises(DataError, match="2 images, 1 prompts"):
        pair_alignment(enc, np.zeros((2, 16, 16), np.float32), ["a"])
    with pytest.raises(ConfigError, match="views=-1"):
        pair_alignment(enc, np.zeros((1, 16, 16), np.float32), ["a"], views=-1)
    with pytest.raises(DataError, match="alignment_f has shape"):
        clipmem_score(np.zeros(2), np.zeros(3))


def test_alignment_does_not_depend_on_batching(dataset, encoder):
    enc = load_encoder(encoder)
    idx = list(range(0, len(dataset), 3))[:7]
    a = dataset_alignment(enc, dataset, idx, views=2, seed=3, batch_size=1)
    b = dataset_alignment(enc, dataset, idx, views=2, seed=3, batch_size=5)
    np.testing.assert_allclose(a, b, atol=1e-6)
    assert np.all(np.abs(a) <= 1 + 1e-6) and np.ptp(a) > 0


def test_f_equals_g_gives_zero_for_every_pair(dataset, encoder):
    f = load_encoder(encoder)
    g = load_encoder(encoder)  # a separate copy of the same weights
    res = score_pairs(f, g, dataset, split="train", views=3)
    assert len(res.rows) == len(dataset.subset(split="train"))
    scores = np.array([r["clipmem"] for r in res.rows])
    np.testing.assert_allclose(scores, 0.0, atol=1e-6)
    assert np.ptp([r["alignment_f"] for r in res.rows]) > 0  # the alignments themselves vary


# -------------------------------------------------------------------------------------- split
def _records(n_patients: int, per: int = 2, held_out: int = 0) -> CXRDataset:
    recs = [Study(f"s{p}{k}", f"p{p}", f"/x/{p}-{k}.jpg", "", f"prompt {p}",
                  split="train" if p < n_patients - held_out else "test")
            for p in range(n_patients) for k in range(per)]
    return CXRDataset(recs, root="/x", format="manifest")


def test_split_is_by_patient_seeded_and_complete():
    ds = _records(60, held_out=10)
    a = split_pairs(ds, seed=1, candidates=0.2, independent=0.3)
    parts = [a.shared, a.candidate, a.independent, a.evaluation]
    flat = sorted(i for p in parts for i in p)
    assert flat == list(range(len(ds)))                      # disjoint and complete
    assert {ds[i].split for i in a.evaluation} == {"test"}
    owner = {ds[i].patient_id: k for k, p in enumerate(parts) for i in p}
    assert all(owner[ds[i].patient_id] == k for k, p in enumerate(parts) for i in p)
    assert abs(len(a.candidate) - 20) <= 2 and abs(len(a.independent) - 30) <= 2
    assert a == split_pairs(ds, seed=1, candidates=0.2, independent=0.3)
    assert a.candidate != split_pairs(ds, seed=2, candidates=0.2, independent=0.3).candidate
    assert set(a.f_train) == set(a.shared) | set(a.candidate)
    assert set(a.g_train) == set(a.shared) | set(a.independent)


def test_split_errors_name_the_fix():
    with pytest.raises(ConfigError, match="leaves no shared pairs"):
        split_pairs(_records(20), candidates=0.5, independent=0.5)
    with pytest.raises(ConfigError, match="candidates=0"):
        split_pairs(_records(20), candidates=0)
    with pytest.raises(DataError, match="too few for a CLIPMem split"):
        split_pairs(_records(2, per=1))


# ---------------------------------------------------------------------------------- end to end
def test_run_clipmem_writes_and_resumes(data, dataset, tmp_path):
    out = tmp_path / "cm"
    res = run_clipmem(data, out, preset="tiny", steps=2, views=1, seeds=1)
    with open(out / "clipmem.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert tuple(rows[0]) == COLUMNS and len(rows) == res.summary["scored_pairs"] > 0
    assert res.summary["runs"][0]["status"] == {"f": "trained", "g": "trained"}
    assert (out / "clipmem.png").is_file()
    split = json.loads((out / "runs" / "seed-0" / "split.json").read_text())
    with open(out / "runs" / "seed-0" / "alignments.csv", newline="", encoding="utf-8") as fh:
        scored = {int(r["row"]) for r in csv.DictReader(fh)}
    assert scored == set(split["candidate"]) | set(split["independent"])
    # the run's alignments are those of dataset_alignment under the trained encoders
    f = load_encoder(out / "runs" / "seed-0" / "f")
    cand = sorted(split["candidate"])[:4]
    with open(out / "runs" / "seed-0" / "alignments.csv", newline="", encoding="utf-8") as fh:
        a_f = {int(r["row"]): float(r["alignment_f"]) for r in csv.DictReader(fh)}
    np.testing.assert_allclose([a_f[i] for i in cand],
                               dataset_alignment(f, dataset, cand, views=1, seed=0),
                               atol=1e-5)
    # the tower table: 3 variants x 2 space maps; "full" is ordinary CLIPMem
    towers = res.summary["towers"]
    assert [(r["variant"], r["space_map"]) for r in towers["table"]] == [
        (v, m) for v in ("full", "text_from_f", "image_from_f") for m in ("none", "procrustes")]
    full = towers["table"][0]
    assert full["clipmem_mean_all"] == pytest.approx(np.mean([r["clipmem"] for r in res.rows]),
                                                     abs=1e-5)
    assert "contributes more" in towers["finding"] or "neither" in towers["finding"]
    assert (out / "clipmem_towers.csv").is_file()
    assert set(res.summary["runs"][0]["space_check"]) >= {"text_cos_none", "text_cos_procrustes"}
    again = run_clipmem(data, out, preset="tiny", steps=2, views=1, seeds=1)
    assert again.summary["runs"][0]["status"] == {"f": "loaded", "g": "loaded"}
    assert again.summary["towers"]["table"] == towers["table"]
    assert [r["clipmem"] for r in again.rows] == [r["clipmem"] for r in res.rows]
    with pytest.raises(TrainingError, match="trained otherwise"):
        run_clipmem(data, out, preset="tiny", steps=3, views=1, seeds=1)


def test_run_clipmem_refuses_out_inside_data(data):
    from diffmem.errors import OutputError

    with pytest.raises(OutputError, match="lies inside the input"):
        run_clipmem(data, Path(data) / "cm", preset="tiny", steps=1)


# ------------------------------------------------------------------------- which tower memorizes
def _perturbed(encoder_dir, tower: str, seed: int = 0):
    """A copy of the encoder with one tower's output projection perturbed."""
    import torch

    enc = load_encoder(encoder_dir)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        proj = enc.model.text_projection if tower == "text" else \
            getattr(enc.model.visual, "proj", None)
        if proj is None:  # a ResNet image tower: perturb its attention-pool projection
            proj = enc.model.visual.attnpool.c_proj.weight
        proj.add_(0.5 * torch.randn(proj.shape, generator=gen) * proj.abs().mean())
    return enc


@pytest.mark.parametrize("tower", ["text", "image"])
def test_tower_swap_moves_only_the_perturbed_towers_variant(dataset, encoder, tower):
    """f = g except one tower: CLIPMem of the variant that takes f's *other* tower is exactly 0,
    the variant that takes the perturbed tower equals full CLIPMem."""
    from diffmem.clipmem.alignment import dataset_embeddings
    from diffmem.clipmem.towers import tower_alignments

    g = load_encoder(encoder)
    f = _perturbed(encoder, tower)
    idx = list(range(0, len(dataset), 4))[:8]
    emb_f = dataset_embeddings(f, dataset, idx, views=2, seed=1)
    emb_g = dataset_embeddings(g, dataset, idx, views=2, seed=1)
    res = tower_alignments(emb_f, emb_g, np.eye(emb_f[1].shape[1]))
    full = res[("full", "none")][2]
    moved, still = (("text_from_f", "image_from_f") if tower == "text"
                    else ("image_from_f", "text_from_f"))
    assert np.abs(full).max() > 1e-3
    np.testing.assert_allclose(res[(moved, "none")][2], full, atol=1e-6)
    np.testing.assert_allclose(res[(still, "none")][2], 0.0, atol=1e-6)



def test_models_embeddings_equal_one_model_at_a_time(dataset, encoder):
    """f and g embedded from one read of each image and one draw of its views (what the run
    scores with) give exactly what embedding each model on its own gives."""
    from diffmem.clipmem.alignment import dataset_embeddings, models_embeddings

    f, g = _perturbed(encoder, "image"), _perturbed(encoder, "text", seed=1)
    idx = list(range(0, len(dataset), 3))[:7]
    for views in (0, 3):
        together = models_embeddings((f, g), dataset, idx, views=views, seed=2, batch_size=4)
        for model, (img, txt) in zip((f, g), together):
            one_img, one_txt = dataset_embeddings(model, dataset, idx, views=views, seed=2)
            assert img.shape == (len(idx), max(views, 1), f.dim)
            np.testing.assert_allclose(img, one_img, atol=1e-6)
            np.testing.assert_allclose(txt, one_txt, atol=1e-6)
        assert not np.allclose(together[0][0], together[1][0])  # the models differ

def test_procrustes_map_undoes_a_rotation_of_one_model():
    """g = f rotated: unmapped tower swaps see mismatched spaces; the map fitted on shared pairs
    recovers CLIPMem 0 for every variant."""
    from diffmem.clipmem.towers import fit_space_map, space_check, tower_alignments

    rng = np.random.default_rng(0)
    rot = np.linalg.qr(rng.normal(size=(6, 6)))[0]
    f_shared = (rng.normal(size=(30, 1, 6)), rng.normal(size=(30, 6)))
    g_shared = (f_shared[0] @ rot, f_shared[1] @ rot)
    R = fit_space_map(f_shared, g_shared)
    np.testing.assert_allclose(R, rot, atol=1e-8)
    check = space_check(f_shared, g_shared, R)
    assert check["text_cos_procrustes"] == pytest.approx(1.0) and check["text_cos_none"] < 0.9
    f_c = (rng.normal(size=(5, 3, 6)), rng.normal(size=(5, 6)))
    res = tower_alignments(f_c, (f_c[0] @ rot, f_c[1] @ rot), R)
    for variant in ("full", "text_from_f", "image_from_f"):
        np.testing.assert_allclose(res[(variant, "procrustes")][2], 0.0, atol=1e-9)
    assert np.abs(res[("text_from_f", "none")][2]).max() > 0.05


def test_tower_finding_is_measured():
    from diffmem.clipmem.towers import tower_finding

    def table(t, i):
        return [{"variant": v, "space_map": "procrustes", "positives": 0,
                 "clipmem_mean_positive": None, "clipmem_mean_all": x, "auc": None}
                for v, x in (("text_from_f", t), ("image_from_f", i))]

    assert tower_finding(table(0.1, 0.3)).startswith("f's image tower contributes more")
    assert "all scored pairs +0.1000" in tower_finding(table(0.1, 0.3))
    assert tower_finding(table(0.3, 0.1)).startswith("f's text tower contributes more")


# ---------------------------------------------------------------------------------------- CLI
def test_cli_given_f_and_g_and_argument_errors(data, encoder, tmp_path, capsys):
    from diffmem.cli import main

    out = tmp_path / "given"
    assert main(["clipmem", "--data", str(data), "--out", str(out), "--f", str(encoder),
                 "--g", str(encoder), "--views", "1", "--split", "train"]) == 0
    printed = capsys.readouterr().out
    assert "mean CLIPMem +0.0000" in printed and "clipmem.csv" in printed
    with open(out / "clipmem.csv", newline="", encoding="utf-8") as fh:
        assert all(abs(float(r["clipmem"])) < 1e-6 for r in csv.DictReader(fh))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["f"] == summary["g"] == str(encoder)
    with pytest.raises(SystemExit) as err:
        main(["clipmem", "--data", str(data), "--out", str(tmp_path / "x"), "--f", str(encoder)])
    assert err.value.code == 2
    assert "--f and --g go together" in capsys.readouterr().err
    assert main(["clipmem", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "y")]) == 2
    assert "clipmem: error:" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()


def test_cli_trains_and_scores(data, tmp_path, capsys):
    from diffmem.cli import main

    out = tmp_path / "run"
    assert main(["clipmem", "--data", str(data), "--out", str(out), "--preset", "tiny",
                 "--steps", "2", "--views", "0"]) == 0
    assert "scored" in capsys.readouterr().out
    assert (out / "runs" / "seed-0" / "f" / "encoder_config.json").is_file()
    assert (out / "runs" / "seed-0" / "g" / "encoder_config.json").is_file()


# ------------------------------------------------------------------ a user's own open_clip model
TINY_OPEN_CLIP = {"embed_dim": 16,
                  "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16,
                                 "head_width": 16},
                  "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 32,
                               "heads": 2, "layers": 1}}


def _open_clip_folder(path: Path, seed: int) -> Path:
    """An open_clip export folder (open_clip_config.json + open_clip_model.safetensors)."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = open_clip.CLIP(**TINY_OPEN_CLIP)
    path.mkdir()
    (path / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": TINY_OPEN_CLIP,
        "preprocess_cfg": {"size": 32, "mean": [0.48, 0.46, 0.41], "std": [0.27, 0.26, 0.28]}}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(path / "open_clip_model.safetensors"))
    return path


def test_a_users_open_clip_models_score_like_ours(dataset, tmp_path):
    from diffmem.clipmem import OpenClipEncoder, as_pair_encoder, load_open_clip
    from diffmem.errors import ModelError

    f_dir = _open_clip_folder(tmp_path / "f", seed=0)
    g_dir = _open_clip_folder(tmp_path / "g", seed=1)
    f = as_pair_encoder(str(f_dir))
    assert isinstance(f, OpenClipEncoder) and f.image_size == 32 and f.std == (0.27, 0.26, 0.28)
    emb = f.embed_images(np.random.default_rng(0).random((3, 40, 40)).astype(np.float32))
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    same = score_pairs(f, load_open_clip(f_dir), dataset, split="train", views=1)
    np.testing.assert_allclose([r["clipmem"] for r in same.rows], 0.0, atol=1e-6)
    other = score_pairs(str(f_dir), str(g_dir), dataset, split="train", views=1)
    assert np.ptp([r["clipmem"] for r in other.rows]) > 0
    (tmp_path / "bare").mkdir()
    with pytest.raises(ModelError, match="neither a diffmem encoder folder"):
        as_pair_encoder(tmp_path / "bare")
    (g_dir / "open_clip_model.safetensors").unlink()
    with pytest.raises(ModelError, match="but no weights"):
        load_open_clip(g_dir)
    with pytest.raises(ModelError, match="needs its trained weights"):
        load_open_clip("RN50", checkpoint=tmp_path / "missing.pt")
    with pytest.raises(ModelError, match="neither a folder nor a built-in"):
        load_open_clip("no-such-net", checkpoint=tmp_path / "missing.pt")


@pytest.mark.slow
def test_clipmem_ranks_miscaptioned_pairs_on_the_clipmem_preset(tmp_path):
    """End to end with the demo encoder preset (tens of CPU-minutes): the planted mis-captioned
    pairs get a higher CLIPMem than ordinary pairs. The answer is designed into the data."""
    from diffmem.data.synth import synthesize

    data = synthesize(tmp_path / "data", preset="clipmem", seed=0)
    res = run_clipmem(data, tmp_path / "cm", preset="demo", steps=150, views=4, seeds=1)
    kinds = res.summary["by_kind"]
    assert kinds["miscaptioned"]["pairs"] >= 10
    assert kinds["miscaptioned"]["mean_clipmem"] > kinds["none"]["mean_clipmem"]
    assert res.summary["auc"] > 0.5
    # which tower memorizes: every variant scored, in both spaces, with a finding sentence
    towers = res.summary["towers"]
    variants = {(r["variant"], r["space_map"]) for r in towers["table"]}
    assert variants == {(v, m) for v in ("full", "text_from_f", "image_from_f")
                        for m in ("none", "procrustes")}
    assert all(r["pairs"] == res.summary["scored_pairs"] for r in towers["table"])
    assert "tower contributes more" in towers["finding"]


# ---------------------------------------------------------------------------------- mitigations
def test_mitigations_retrain_f_on_the_same_split_and_resume(data, tmp_path):
    from diffmem.clipmem.mitigate import MITIGATION_COLUMNS, run_mitigations

    out = tmp_path / "mit"
    kw = dict(preset="tiny", steps=2, views=0, drop=0.5, noise=0.5, remove=0.2)
    mit = run_mitigations(data, out, **kw)
    rows = {r["method"]: r for r in mit["rows"]}
    assert list(rows) == ["none", "caption_augment", "text_noise", "remove_top", "multi_report"]
    with open(out / "mitigations.csv", newline="", encoding="utf-8") as fh:
        assert tuple(next(csv.reader(fh))) == MITIGATION_COLUMNS
    assert (out / "mitigations.png").is_file()
    assert json.loads((out / "summary.json").read_text())["mitigations"]["rows"] == mit["rows"]
    split = json.loads((out / "runs" / "seed-0" / "split.json").read_text())
    n_cand = len(split["candidate"])
    assert rows["remove_top"]["removed"] == max(1, round(0.2 * n_cand))
    assert rows["none"]["removed"] == rows["text_noise"]["removed"] == 0
    for r in (rows[m] for m in ("none", "caption_augment", "text_noise", "remove_top")):
        assert r["status"] == "measured" and 0.0 <= r["utility"] <= 1.0
        assert r["recall_at_1"] <= r["recall_at_5"] <= r["recall_at_10"]
    assert rows["multi_report"]["status"] == "not applicable"
    assert any(r["pareto"] for r in mit["rows"])
    # each mitigated f records its hook and trained on the same split (or it minus the removed)
    cfg = {m: json.loads((out / "mitigations" / m / "f" / "encoder_config.json").read_text())
           for m in ("caption_augment", "text_noise", "remove_top")}
    assert cfg["caption_augment"]["training"]["caption_augment"] == {"shuffle": True, "drop": 0.5}
    assert cfg["text_noise"]["training"]["text_noise"] == 0.5
    base = json.loads((out / "runs" / "seed-0" / "f" / "encoder_config.json").read_text())
    assert cfg["text_noise"]["data"]["records"] == base["data"]["records"]
    assert cfg["remove_top"]["data"]["records"] == base["data"]["records"] - \
        rows["remove_top"]["removed"]
    # the hooks change training: same seed, same data, other weights
    fps = {m: load_encoder(out / "mitigations" / m / "f").fingerprint()
           for m in ("caption_augment", "text_noise")}
    fps["none"] = load_encoder(out / "runs" / "seed-0" / "f").fingerprint()
    assert len(set(fps.values())) == 3
    again = run_mitigations(data, out, **kw)
    assert [r["clipmem_mean_all"] for r in again["rows"]] == \
        [r["clipmem_mean_all"] for r in mit["rows"]]
    with pytest.raises(ConfigError, match="unknown CLIPMem mitigation"):
        run_mitigations(data, out, methods=["dropout"], **kw)


def test_caption_augment_rejects_bad_settings():
    from diffmem.embed.training import CaptionAugment

    with pytest.raises(ConfigError, match="drop=1.0"):
        CaptionAugment(drop=1.0)
