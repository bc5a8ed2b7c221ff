"""evaluate: AUC against scikit-learn, TPR at low FPR on a hand-computed case, and errors."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from diffmem.detect.evaluate import evaluate, tpr_at_fpr
from diffmem.errors import DataError


def test_auc_equals_scikit_learn_with_ties():
    rng = np.random.default_rng(0)
    labels = rng.random(300) < 0.3
    scores = np.round(rng.normal(size=300) + 1.2 * labels, 1)  # rounded: many ties
    ev = evaluate(scores, labels)
    assert ev.auc == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert 0.75 < ev.auc < 1.0
    assert (ev.n_pos, ev.n_neg) == (int(labels.sum()), int((~labels).sum()))
    fpr, tpr = ev.roc
    assert fpr[0] == 0 and tpr[-1] == 1 and (np.diff(fpr) >= 0).all()


def test_tpr_at_low_fpr_on_a_hand_case(caplog):
    # 100 negatives scored 0..99; positives 99.5, 98.5, 50, 10.
    # FPR <= 1 %: at most one negative (99) above the threshold -> flag >= 98.5 -> TPR 2/4.
    # FPR <= 0.1 %: no negative -> flag >= 99.5 -> TPR 1/4.
    scores = np.concatenate([np.arange(100.0), [99.5, 98.5, 50.0, 10.0]])
    labels = np.r_[np.zeros(100, int), np.ones(4, int)]
    with caplog.at_level(logging.INFO, logger="diffmem"):
        ev = evaluate(scores, labels)
    assert ev.tpr_at_1pct_fpr == 0.5
    assert ev.tpr_at_0_1pct_fpr == 0.25
    # 100 negatives cannot resolve 0.1 %: said so; 1 % is fine
    assert len(ev.notes) == 1 and "0.1%" in ev.notes[0] and "1000" in ev.notes[0]
    assert "only 100 negatives" in caplog.text
    # by hand from the ROC points too
    fpr = np.array([0.0, 0.0, 0.01, 0.01, 0.02, 1.0])
    tpr = np.array([0.0, 0.25, 0.25, 0.5, 0.5, 1.0])
    assert tpr_at_fpr(fpr, tpr, 0.01) == 0.5 and tpr_at_fpr(fpr, tpr, 0.005) == 0.25


def test_perfect_separation_and_json():
    ev = evaluate([0.9, 0.8, 0.1, 0.2, 0.3], [True, True, False, False, False])
    assert ev.auc == 1.0 and ev.tpr_at_1pct_fpr == 1.0 and ev.tpr_at_0_1pct_fpr == 1.0
    d = ev.to_dict()
    json.dumps(d, allow_nan=False)  # the infinite first ROC threshold becomes null
    assert d["roc"]["thresholds"][0] is None and "roc" not in ev.to_dict(curve=False)
    assert len(d["notes"]) == 2


def test_bad_inputs_are_errors():
    with pytest.raises(DataError, match="only positives"):
        evaluate([0.1, 0.2], [1, 1])
    with pytest.raises(DataError, match="only negatives"):
        evaluate([0.1, 0.2], [False, False])
    with pytest.raises(DataError, match="1 NaN"):
        evaluate([0.1, np.nan], [0, 1])
    with pytest.raises(DataError, match="scores has 3 values but labels has 2"):
        evaluate([0.1, 0.2, 0.3], [0, 1])
    with pytest.raises(DataError, match="0/1 or bool"):
        evaluate([0.1, 0.2, 0.3], [0, 1, 2])
    with pytest.raises(DataError, match="1-D"):
        evaluate([[0.1, 0.2]], [[0, 1]])
