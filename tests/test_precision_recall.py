"""Improved precision and recall (Kynkaanniemi et al. 2019) on point sets whose answers are worked out by hand."""
import pytest
import torch

from ldm.errors import LdmError
from ldm.eval.precision_recall import knn_radii, manifold_coverage, precision_recall


def _points(*xs):
    """1-d points as an `n 1` feature matrix."""
    return torch.tensor([[float(x)] for x in xs])


def test_knn_radius_is_the_distance_to_the_kth_other_point():
    # On 0, 1, 3, 7, 15: the 1st/2nd/3rd nearest others of 0 lie at 1, 3, 7; of 7 at 4, 6, 7; of 15 at 8, 12, 14.
    feats = _points(0, 1, 3, 7, 15)
    assert knn_radii(feats, k=1).tolist() == [1, 1, 2, 4, 8]
    assert knn_radii(feats, k=3).tolist() == [7, 6, 4, 7, 14]
    assert knn_radii(feats, k=3, block=2).tolist() == [7, 6, 4, 7, 14]  # blocks change nothing


def test_coverage_counts_queries_inside_any_ball_boundary_included():
    manifold, radii = _points(0, 10), torch.tensor([1.0, 2.0])
    # 1 is on the first ball's boundary (inside), 5 in neither, 12 on the second's boundary, 12.5 outside.
    assert manifold_coverage(manifold, radii, _points(1, 5, 12, 12.5)) == 0.5


def test_precision_and_recall_of_hand_made_sets():
    real = _points(0, 1, 2, 3)  # k=3 radii: 3, 2, 2, 3; the real manifold is [-3, 6]
    fake = _points(1.5, 5.5, 100, 101)  # k=3 radii: 98.5, 94.5, 95.5, 95.5: the fake manifold covers 0..3
    precision, recall = precision_recall(real, fake, k=3)
    assert precision == 0.5  # 1.5 and 5.5 lie in the real manifold, 100 and 101 do not
    assert recall == 1.0


def test_identical_sets_score_one_and_far_apart_sets_zero():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(50, 8, generator=gen)
    assert precision_recall(a, a.clone()) == (1.0, 1.0)
    assert precision_recall(a, a + 100.0) == (0.0, 0.0)


def test_mode_collapse_keeps_precision_and_loses_recall():
    gen = torch.Generator().manual_seed(1)
    real = torch.randn(400, 2, generator=gen)
    collapsed = 0.05 * torch.randn(400, 2, generator=gen)  # every sample near the mode
    precision, recall = precision_recall(real, collapsed)
    assert precision > 0.9 and recall < 0.2  # (the balls cover most, not all, of the dense centre)


def test_too_few_points_and_unlike_dimensions_are_errors():
    with pytest.raises(LdmError, match="more than 3 points"):
        precision_recall(_points(0, 1, 2), _points(0, 1, 2, 3))
    with pytest.raises(LdmError, match="dimensions differ"):
        precision_recall(torch.zeros(5, 2), torch.zeros(5, 3))
