"""What evaluation samples: labels whose class mix follows the test split."""

import torch

from fedrun.evaluation.sampling import eval_labels


def test_eval_labels_follow_the_test_split():
    test_labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    assert torch.bincount(eval_labels(test_labels, 3, 100)).tolist() == [50, 30, 20]
    assert torch.bincount(eval_labels(test_labels, 3, 10)).tolist() == [5, 3, 2]
    labels = eval_labels(test_labels, 3, 7)
    assert len(labels) == 7 and torch.all(labels[1:] >= labels[:-1])  # class order
    assert torch.bincount(labels).tolist() == [4, 2, 1]  # largest remainders: 3.5, 2.1, 1.4
