"""The kernels' autotuning key (``lightning_mqsp/kernels/tuning.py``): lengths enter as powers of two, so that a run
tunes once per length class and every rank of a group at the same calls."""

from __future__ import annotations

from lightning_mqsp.kernels.tuning import AUTOTUNE_KEY, tuning_buckets


def test_lengths_enter_the_key_as_powers_of_two() -> None:
    assert tuning_buckets(1000, 3000) == (1024, 4096)
    assert tuning_buckets(1024, 4096) == (1024, 4096)
    assert tuning_buckets(1, 1) == (1, 1)
    # Rows of a sparse step differ between ranks (n segments), the rows per segment do not: the key holds those.
    assert "M" not in AUTOTUNE_KEY and "N" not in AUTOTUNE_KEY
    assert {"ROWS_BUCKET", "KEYS_BUCKET"} <= set(AUTOTUNE_KEY)
