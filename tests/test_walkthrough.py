import numpy as np

from jattn import walkthrough


def test_walkthrough_matches_seed_numpy(capsys):
    worst = walkthrough.main(seed=3)
    printed = capsys.readouterr().out
    assert worst < 1e-5
    for step in ("Queries", "Keys", "Values", "Scores", "Attention weights", "Output", "MATCH"):
        assert step in printed


def test_seed_numpy_rows_are_distributions():
    rng = np.random.default_rng(0)
    W = [rng.random((4, 2)) for _ in range(3)]
    *_, weights, out = walkthrough.seed_numpy(walkthrough.X, *W)
    np.testing.assert_allclose(weights.sum(axis=1), 1.0)
    assert out.shape == (3, 2)
