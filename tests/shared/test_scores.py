from __future__ import annotations

import pytest

from shared.db.models import Laterality, View
from shared.scores import ViewScore, breast_scores, exam_score

L, R = Laterality.LEFT, Laterality.RIGHT


def test_breast_is_the_mean_of_its_views_and_the_exam_the_worse_breast() -> None:
    breasts = breast_scores(
        [ViewScore(L, View.CC, 0.2), ViewScore(L, View.MLO, 0.4), ViewScore(R, View.CC, 0.9)]
    )
    assert [(b.laterality, b.views) for b in breasts] == [(L, (View.CC, View.MLO)), (R, (View.CC,))]
    assert breasts[0].score == pytest.approx(0.3)
    assert breasts[1].score == pytest.approx(0.9)  # one view missing: the one that is there
    assert exam_score(breasts) == pytest.approx(0.9)


def test_a_repeated_view_does_not_outweigh_the_other() -> None:
    (left,) = breast_scores(
        [ViewScore(L, View.CC, 0.0), ViewScore(L, View.CC, 0.2), ViewScore(L, View.MLO, 0.8)]
    )
    assert left.score == pytest.approx((0.1 + 0.8) / 2)


def test_nothing_scored_gives_no_exam_score() -> None:
    assert breast_scores([]) == []
    assert exam_score([]) is None


def test_roc_auc_counts_pairs_and_ties() -> None:
    from shared.scores import roc_auc

    assert roc_auc([0.1, 0.2, 0.8, 0.9], [False, False, True, True]) == 1.0
    assert roc_auc([0.9, 0.8, 0.2, 0.1], [False, False, True, True]) == 0.0
    assert roc_auc([0.5, 0.5], [True, False]) == 0.5
    # 2 positives x 2 negatives: (0.7 > 0.3, 0.7 > 0.6, 0.4 > 0.3, 0.4 < 0.6) = 3 of 4
    assert roc_auc([0.7, 0.4, 0.3, 0.6], [True, True, False, False]) == 0.75
    with pytest.raises(ValueError, match="positive and one negative"):
        roc_auc([0.1], [True])
