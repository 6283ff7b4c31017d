"""The noise rules' stored Marchenko–Pastur tables are the law's own values."""

import numpy as np

from clair_jax import _marchenko_pastur as mp, tuning


def test_stored_tables_are_the_quantile_function_value_for_value():
    median, bulk = mp.compute()
    assert median == mp.MEDIAN and bulk == mp.BULK
    assert len(mp.MEDIAN) == mp.MEDIAN_GRID[2]
    assert np.asarray(mp.BULK).shape == (mp.BULK_GRID[2], len(tuning.BULK_LEVELS))


def test_stored_median_is_the_median_of_simulated_noise():
    # An independent check of the law itself: squared singular values of a 200 × 400
    # Gaussian matrix over n, median at β = 0.5 (β on the stored grid).
    rng = np.random.default_rng(0)
    betas = np.linspace(*mp.MEDIAN_GRID)
    i = int(np.argmin(np.abs(betas - 0.5)))
    draws = [np.median(np.linalg.svd(rng.standard_normal((200, 400)), compute_uv=False) ** 2 / 400) for _ in range(4)]
    assert abs(np.mean(draws) - mp.MEDIAN[i]) < 0.02 * mp.MEDIAN[i]
