"""The L-BFGS probe solves the same convex problem as scikit-learn's logistic regression."""

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from torch import nn

from thaw.training.probe import fit_logistic, regularisation_path


def _blobs(n=300, dim=20, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    centres = rng.normal(0, 1.5, (classes, dim))
    features = centres[labels] + rng.normal(0, 1.0, (n, dim))
    return features.astype(np.float32), labels


@pytest.mark.parametrize("l2", [1e-1, 1e-3])
def test_fit_matches_sklearn_multinomial_logistic_regression(l2):
    features, labels = _blobs()
    head = nn.Linear(features.shape[1], 3)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    fit_logistic(head, torch.from_numpy(features), torch.from_numpy(labels),
                 nn.CrossEntropyLoss(), l2)
    # sklearn minimises C * sum(CE) + ||W||^2 / 2, i.e. mean(CE) + ||W||^2 / (2 C n).
    reference = LogisticRegression(C=1 / (l2 * len(labels)), tol=1e-10, max_iter=5000)
    reference.fit(features, labels)
    with torch.no_grad():
        ours = head(torch.from_numpy(features)).softmax(1).numpy()
    np.testing.assert_allclose(ours, reference.predict_proba(features), atol=2e-3)
    # Softmax weights are defined up to a shift shared by all classes; compare centred ones.
    weight = head.weight.detach().numpy()
    np.testing.assert_allclose(weight - weight.mean(0), reference.coef_ - reference.coef_.mean(0),
                               atol=5e-3)


def test_regularisation_path_runs_from_strong_to_weak():
    path = regularisation_path(5)
    assert path[0] == pytest.approx(1e-1) and path[-1] == pytest.approx(1e-5)
    assert path == sorted(path, reverse=True)
    assert regularisation_path(1) == [1e-3]
