"""The accelerate trainer: outputs, exact resume after kill -9, two processes, NaN stop, hooks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from diffmem.errors import ConfigError, TrainingError
from diffmem.train import TrainConfig, _batch_indices, train

PROMPTS = [
    "Small left pleural effusion.",
    "No acute cardiopulmonary process.",
    "Dr. ___ was notified at ___ on ___.",
    "Interval placement of right IJ line with tip at ___.",
    "Mild cardiomegaly without edema.",
    "Right lower lobe consolidation, compared to ___.",
]


@pytest.fixture()
def manifest_data(tmp_path: Path) -> Path:
    """Six 48 px RGB images (converted by the loader) with short MIMIC-like prompts."""
    root = tmp_path / "data"
    root.mkdir()
    rng = np.random.default_rng(0)
    rows = ["image,prompt,patient_id,split"]
    for i, prompt in enumerate(PROMPTS):
        arr = (rng.random((48, 48, 3)) * 255).astype(np.uint8)
        Image.fromarray(arr).save(root / f"img{i}.png")
        rows.append(f'img{i}.png,"{prompt}",p{i},train')
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    return root


def _cfg(**kw) -> TrainConfig:
    base = dict(preset="tiny", steps=6, batch_size=4, lr=1e-3, checkpoint_every=2, seed=3)
    base.update(kw)
    return TrainConfig(**base)


def test_train_writes_a_loadable_pipeline_and_card(manifest_data, tmp_path, caplog):
    from diffmem.pipelines import CXRDiffusionPipeline

    out = tmp_path / "model"
    caplog.set_level("INFO", logger="diffmem")
    result = train(manifest_data, out, config=_cfg())
    assert result.steps == 6 and np.isfinite(result.final_loss)
    # the RGB 48 px images are converted, and the log says so once
    assert sum("converted to 32 x 32 grayscale" in r.getMessage() for r in caplog.records) == 1
    pipe = CXRDiffusionPipeline.from_pretrained(out)
    images = pipe(PROMPTS[0], num_inference_steps=2, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 32, 32, 1)
    card = json.loads((out / "model_card.json").read_text())
    assert card["preset"] == "tiny" and card["steps"] == 6 and card["training"]["seed"] == 3
    assert card["data"]["records"] == 6 and len(card["data"]["fingerprint"]) == 16
    assert card["versions"]["torch"] == torch.__version__.split("+")[0] or card["versions"]["torch"]
    log_lines = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log_lines] == [6] or log_lines[-1]["step"] == 6
    # the trained weights differ from the initial ones: training did something
    ckpts = sorted((out / "checkpoints").glob("step-*"))
    assert [p.name for p in ckpts] == ["step-0000004", "step-0000006"]  # keep_checkpoints=2
    assert not list(out.rglob("*.bin")) and not list(out.rglob("*.pkl"))


def test_same_seed_same_weights_and_refuses_overwrite(manifest_data, tmp_path):
    train(manifest_data, tmp_path / "a", config=_cfg(steps=3, checkpoint_every=3))
    train(manifest_data, tmp_path / "b", config=_cfg(steps=3, checkpoint_every=3))
    wa = load_file(str(tmp_path / "a/unet/diffusion_pytorch_model.safetensors"))
    wb = load_file(str(tmp_path / "b/unet/diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    with pytest.raises(TrainingError, match="already holds checkpoints.*--resume"):
        train(manifest_data, tmp_path / "a", config=_cfg(steps=3))


def test_resume_refuses_changed_settings(manifest_data, tmp_path):
    out = tmp_path / "m"
    train(manifest_data, out, config=_cfg(steps=4), stop_after=2)
    with pytest.raises(TrainingError, match="lr: checkpoint 0.001 vs now 0.002"):
        train(manifest_data, out, config=_cfg(steps=4, lr=2e-3), resume=True)


def test_stop_and_resume_equals_uninterrupted(manifest_data, tmp_path):
    full = tmp_path / "full"
    train(manifest_data, full, config=_cfg())
    parts = tmp_path / "parts"
    train(manifest_data, parts, config=_cfg(), stop_after=3)  # checkpoint at 2 and 3
    res = train(manifest_data, parts, config=_cfg(), resume=True)
    assert res.resumed_from == 3
    for comp in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        a, b = load_file(str(full / comp)), load_file(str(parts / comp))
        assert all(torch.equal(a[k], b[k]) for k in a), comp


def test_kill_9_then_resume_matches_uninterrupted(manifest_data, tmp_path):
    """A run killed with SIGKILL mid-training and resumed ends at the same weights (exactly)."""
    full = tmp_path / "full"
    train(manifest_data, full, config=_cfg(steps=40, checkpoint_every=5))
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "diffmem", "-q", "train", "--data", str(manifest_data), "--out",
           str(out), "--preset", "tiny", "--steps", "40", "--batch-size", "4", "--lr", "1e-3",
           "--checkpoint-every", "5", "--seed", "3"]
    env = {**os.environ, "DIFFMEM_NO_PROGRESS": "1"}
    errlog = tmp_path / "stderr.txt"
    with open(errlog, "wb") as err:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if list((out / "checkpoints").glob("step-0000010")):
                break
            time.sleep(0.02)
        alive = proc.poll() is None
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert alive, "the run finished before it could be killed: " + errlog.read_text()
    assert not (out / "model_index.json").exists()
    resumed = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    # the training log has each step once, even those the killed run logged past its checkpoint
    steps = [json.loads(x)["step"] for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 40
    for comp in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        a, b = load_file(str(full / comp)), load_file(str(out / comp))
        # same seeds per step, same order of float operations: bit-identical on CPU
        assert all(torch.equal(a[k], b[k]) for k in a), comp


def test_resume_skips_a_truncated_newest_checkpoint(manifest_data, tmp_path, caplog):
    """The newest checkpoint cut short: resume names it, falls back to the one before (the
    result still equals an uninterrupted run) and deletes nothing; none readable: one error."""
    full = tmp_path / "full"
    train(manifest_data, full, config=_cfg())
    out = tmp_path / "m"
    train(manifest_data, out, config=_cfg(), stop_after=4)  # checkpoints at 2 and 4
    bad = out / "checkpoints" / "step-0000004" / "model.safetensors"
    with open(bad, "r+b") as f:
        f.truncate(bad.stat().st_size // 2)
    caplog.set_level("WARNING", logger="diffmem")
    res = train(manifest_data, out, config=_cfg(), resume=True)
    assert res.resumed_from == 2
    said = " ".join(r.getMessage() for r in caplog.records)
    assert f"{bad.parent} (model.safetensors:" in said and "step-0000002" in said
    for comp in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        a, b = load_file(str(full / comp)), load_file(str(out / comp))
        assert all(torch.equal(a[k], b[k]) for k in a), comp

    only = tmp_path / "only"
    train(manifest_data, only, config=_cfg(), stop_after=2)
    state = only / "checkpoints" / "step-0000002" / "state.json"
    state.write_text(state.read_text()[:20])
    before = sorted(p.relative_to(only) for p in only.rglob("*"))
    with pytest.raises(TrainingError, match=r"no checkpoint can be read \(.*step-0000002 "
                                            r"\(state.json: .*nothing was deleted"):
        train(manifest_data, only, config=_cfg(), resume=True)
    assert sorted(p.relative_to(only) for p in only.rglob("*")) == before


def test_full_disk_at_a_checkpoint_is_one_error_and_resume_finishes(manifest_data, tmp_path,
                                                                    monkeypatch):
    """The disk fills while a checkpoint is written (a wrapper around the real safetensors
    save_file writes the file, then fails as safetensors does on ENOSPC): one OutputError naming
    the folder, no half checkpoint (.tmp-step-*) left, and --resume then finishes."""
    import safetensors.torch
    from safetensors import SafetensorError

    from diffmem.errors import OutputError

    real_save, calls = safetensors.torch.save_file, []

    def save_file(tensors, filename, *args, **kwargs):
        real_save(tensors, filename, *args, **kwargs)
        calls.append(filename)
        if len(calls) == 3:  # the second checkpoint's model weights
            raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: '
                                  'StorageFull, message: "No space left on device" })')

    out = tmp_path / "m"
    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    with pytest.raises(OutputError, match=r"the disk holding '.*checkpoints' is full"):
        train(manifest_data, out, config=_cfg())
    monkeypatch.undo()
    assert [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(("step", ".tmp"))
            ] == ["step-0000002"]
    assert train(manifest_data, out, config=_cfg(), resume=True).resumed_from == 2


def test_unreadable_image_fails_before_writing_and_without_skip_advice(manifest_data, tmp_path,
                                                                       capsys):
    """train takes no --on-error: an unreadable image is one error naming it that does not
    suggest --on-error skip, and nothing (no checkpoints/tokenizer) is left in --out."""
    from diffmem.cli import main

    (manifest_data / "img2.png").write_bytes(b"not a png at all")
    out = tmp_path / "model"
    assert main(["train", "--data", str(manifest_data), "--out", str(out), "--preset", "tiny",
                 "--steps", "2", "--batch-size", "4"]) == 2
    err = capsys.readouterr().err
    assert "img2.png" in err and "Traceback" not in err
    assert "use --on-error skip" not in err and "skips none" in err
    assert not out.exists()


def test_nan_loss_stops_with_error_and_keeps_checkpoint(manifest_data, tmp_path):
    out = tmp_path / "nan"
    with pytest.raises(TrainingError, match="loss became .* at step .*last good checkpoint"):
        # an absurd learning rate blows the output layer up to inf within a few steps
        train(manifest_data, out, config=_cfg(steps=50, lr=1e30, grad_clip=0.0, checkpoint_every=1))
    assert list((out / "checkpoints").glob("step-*"))
    assert not (out / "model_index.json").exists()


def test_hooks_caption_transform_and_loss_filter(manifest_data, tmp_path):
    seen = []

    def shout(prompt, study, generator):
        seen.append(prompt)
        return prompt.upper()

    def drop_all_but_first(batch):
        keep = torch.zeros_like(batch.losses, dtype=torch.bool)
        keep[0] = True
        assert batch.eps_uncond().shape == batch.eps_pred.shape
        return keep

    res = train(manifest_data, tmp_path / "h", config=_cfg(steps=2, checkpoint_every=2),
                caption_transform=shout, loss_filter=drop_all_but_first)
    assert len(seen) == 8 and set(seen) <= set(PROMPTS)
    assert res.filtered_samples == 6


def test_bad_settings():
    with pytest.raises(ConfigError, match="caption_dropout=1.5 is out of range"):
        TrainConfig(caption_dropout=1.5).resolved({"lr": 1e-3, "steps": 1, "batch_size": 1})
    with pytest.raises(ConfigError, match="lr=0 is out of range"):
        TrainConfig(lr=0).resolved({"steps": 1, "batch_size": 1, "caption_dropout": 0})


def test_batches_cover_each_epoch():
    n, bs = 10, 4
    seen = sum((_batch_indices(n, bs, 0, s) for s in range(5)), [])
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))


def test_two_processes_match_one(manifest_data, tmp_path):
    """``accelerate launch`` with 2 CPU processes: same global batch, same gradients, same weights."""
    one = tmp_path / "one"
    train(manifest_data, one, config=_cfg(steps=5, seed=1, checkpoint_every=5))
    two = tmp_path / "two"
    launcher = Path(sys.executable).with_name("accelerate")
    # accelerate's launcher spawns several processes through torch.distributed.run only with
    # --multi_gpu; without GPUs the processes run on the CPU and talk over gloo
    cmd = [str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "diffmem", "-q", "train",
           "--data", str(manifest_data), "--out", str(two), "--preset", "tiny", "--steps", "5",
           "--batch-size", "4", "--lr", "1e-3", "--seed", "1", "--checkpoint-every", "5"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "DIFFMEM_NO_PROGRESS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    state = json.loads((two / "checkpoints/step-0000005/state.json").read_text())
    assert state["batch_size"] == 4 and state["num_processes"] == 2
    for comp in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        a, b = load_file(str(one / comp)), load_file(str(two / comp))
        # gradients are averaged across processes: equal up to float reduction order
        worst = max(float((a[k] - b[k]).abs().max()) for k in a)
        assert worst < 1e-4, (comp, worst)
