"""Training studies: the score-matching toy (Wu et al., COLT 2025), learning-rate sweeps and
training-time mitigations on chest X-ray models.

* :func:`run_toy_study` (:mod:`diffmem.study.score_matching`): memorization against the SGD
  learning rate for two-layer ReLU score networks in 1-D / 2-D;
* :func:`run_lr_study` and :func:`run_train_mitigation_study` (:mod:`diffmem.study.cxr`): train
  one CXR model per setting and seed (resumable trainer folders), measure both kinds of copying
  (:mod:`diffmem.study.measure`) and the in-domain FID, and pool the seeds (mean and 95%
  t-interval, :func:`diffmem.study.seeds.pool_seeds`); the lr sweep also measures every run
  at matched training loss;
* :func:`run_checkpoint_study` (:mod:`diffmem.study.checkpoints`): memorization over training
  at every checkpoint of one run, and the last step before copying begins;
* :func:`run_lora_study` (:mod:`diffmem.study.lora`): full fine-tuning against LoRA (``peft``)
  at several ranks from one pretrained base, over seeds (mean and 95% t-interval);
* :func:`run_prune_study` (:mod:`diffmem.study.prune`): magnitude pruning and NeMo neuron
  deactivation of one trained model (through the mitigation registry), with the Pareto front;
* :mod:`diffmem.study.training`: the training-time mitigations as trainer hooks
  (caption randomization, de-id marker randomization, Wen et al.'s loss filter, de-duplication).

Every study returns a :class:`StudyResult` and writes ``study.json`` (see
:mod:`diffmem.study.results`). Importing this package is cheap: torch loads on first use.
"""

from diffmem._lazy import lazy_getattr
from diffmem.study.results import StudyResult, write_study

_LAZY = {
    "run_toy_study": "diffmem.study.score_matching",
    "ToyConfig": "diffmem.study.score_matching",
    "run_lr_study": "diffmem.study.cxr",
    "run_train_mitigation_study": "diffmem.study.cxr",
    "run_checkpoint_study": "diffmem.study.checkpoints",
    "recommend_stop": "diffmem.study.checkpoints",
    "run_lora_study": "diffmem.study.lora",
    "LoraAdapter": "diffmem.study.lora",
    "run_prune_study": "diffmem.study.prune",
    "pool_seeds": "diffmem.study.seeds",
    "parse_seeds": "diffmem.study.seeds",
    "MeasureConfig": "diffmem.study.measure",
    "Measurement": "diffmem.study.measure",
    "measure_model": "diffmem.study.measure",
    "TrainingMitigation": "diffmem.study.training",
    "get_training_mitigation": "diffmem.study.training",
    "list_training_mitigations": "diffmem.study.training",
}


__getattr__ = lazy_getattr(__name__, _LAZY)


__all__ = sorted(["StudyResult", "write_study", *_LAZY])
