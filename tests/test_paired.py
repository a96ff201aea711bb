"""Paired differences between a sweep's settings, checked on known numbers."""

import math

import pandas as pd
import pytest

from sweeps.paired import paired, paired_table, t_quantile


@pytest.mark.parametrize(
    "df, value", [(1, 12.7062047), (2, 4.3026527), (4, 2.7764451), (10, 2.2281389), (30, 2.0422725)]
)
def test_t_quantile_matches_published_values(df, value):
    assert t_quantile(0.975, df) == pytest.approx(value, abs=1e-5)
    assert t_quantile(0.95, 4) == pytest.approx(2.1318468, abs=1e-5)
    with pytest.raises(ValueError):
        t_quantile(0.3, 4)


def test_paired_statistics_on_known_differences():
    out = paired([1.0, 2.0, 3.0, 4.0, 5.0])  # mean 3, sd sqrt(2.5), se sqrt(0.5)
    assert out["pairs"] == 5 and out["mean_diff"] == 3.0
    assert out["se"] == pytest.approx(math.sqrt(0.5))
    assert out["ci_low"] == pytest.approx(3 - 2.7764451 * math.sqrt(0.5), abs=1e-5)
    assert out["ci_high"] == pytest.approx(3 + 2.7764451 * math.sqrt(0.5), abs=1e-5)
    one = paired([2.0])
    assert one["mean_diff"] == 2.0 and math.isnan(one["se"]) and math.isnan(one["ci_low"])


def test_each_setting_against_the_first_on_the_seeds_both_finished():
    nan = math.nan
    table = pd.DataFrame(
        [
            # norm, lr, seed, status, final, last3, last5
            ("dyt", 0.003, 0, "finished", 60.0, 59.0, nan),
            ("dyt", 0.003, 1, "finished", 58.0, 57.5, nan),
            ("dyt", 0.003, 2, "finished", 59.0, 58.0, nan),
            ("ln", 0.003, 0, "finished", 57.0, 57.0, nan),
            ("ln", 0.003, 1, "finished", 56.0, 55.5, nan),
            ("ln", 0.003, 2, "unfinished", 20.0, nan, nan),  # not a pair: only finished runs count
            ("ln", 0.001, 1, "finished", 59.0, 58.5, nan),
        ],
        columns=["norm", "lr", "seed", "status", "final_acc", "last3_acc", "last5_acc"],
    )
    pairs = paired_table(table, ["norm", "lr", "seed"])
    assert list(pairs["setting"]) == ["norm=ln"] * 2 + ["norm=ln, lr=0.001"] * 2  # what each changes
    assert set(pairs["against"]) == {"norm=dyt, lr=0.003"} and "last5_acc" not in set(pairs["score"])
    final = pairs.iloc[0]
    assert final["score"] == "final_acc" and final["pairs"] == 2 and final["differences"] == "-3.00 -2.00"
    assert final["mean_diff"] == -2.5 and final["se"] == pytest.approx(0.5)
    assert final["ci_low"] == pytest.approx(-2.5 - 12.7062047 * 0.5, abs=1e-4)
    last3 = pairs.iloc[1]
    assert last3["differences"] == "-2.00 -2.00" and last3["se"] == 0.0
    lone = pairs.iloc[2]
    assert lone["pairs"] == 1 and lone["differences"] == "+1.00" and math.isnan(lone["se"])
    against_ln = paired_table(table, ["norm", "lr", "seed"], reference="norm=ln, lr=0.003")
    assert against_ln.iloc[0]["setting"] == "norm=dyt" and against_ln.iloc[0]["mean_diff"] == 2.5
    assert paired_table(table, ["norm", "lr"]).empty  # no seeds: nothing is paired
