"""Issue 18 item 11, second bar: the report's blurred pictures of training images must not
re-identify their patient (embedded re-ID model, threshold calibrated on held-out patients as
``detect --methods ...,reid`` calibrates it), while the pictures themselves all do."""

from __future__ import annotations

import numpy as np

from diffmem.reid.verdicts import prepare_reid
from diffmem.report.images import obscure

REPORT_SIZE = 160  # side of the report's patient pictures


def test_blurred_training_pictures_do_not_reidentify_their_patient(dataset):
    train = dataset.subset(split="train")
    setup = prepare_reid(None, dataset, heldout=dataset.subset(split=["validate", "test"]))
    images = np.stack([train.load_image(i, size=REPORT_SIZE) for i in range(len(train))])
    own = [s.patient_id for s in train]

    def reidentified(batch):
        scores, rows = setup.search(batch)
        return np.asarray(setup.judge(scores), bool) & np.array(
            [setup.index.patient_ids[r] == p for r, p in zip(rows, own)])

    assert reidentified(images).all()            # the re-ID model knows every training picture
    assert not reidentified(np.stack([obscure(x) for x in images])).any()
