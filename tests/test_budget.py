"""Property tests for the budget arithmetic shared by every method."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from masa.budget import atoms_for_ratio, lowrank_params, rank_for_ratio, shared_params, shared_ratio

dims = st.integers(min_value=4, max_value=4096)
ratios = st.floats(min_value=0.01, max_value=0.99)


@given(n=st.integers(1, 64), d_out=dims, d_in=dims, ratio=ratios)
def test_atoms_are_the_closest_feasible_choice(n, d_out, d_in, ratio):
    try:
        s = atoms_for_ratio(n, d_out, d_in, ratio)
    except ValueError as err:
        assert "at least one atom" in str(err)
        assert n * d_out * d_in * (1 - ratio) / (d_out * d_in + n) < 0.5
        return
    assert 1 <= s <= n
    if s < n:  # no other atom count is closer to the requested ratio
        for other in (s - 1, s + 1):
            if 1 <= other <= n:
                assert abs(shared_ratio(n, d_out, d_in, s) - ratio) <= abs(
                    shared_ratio(n, d_out, d_in, other) - ratio
                )


@given(n=st.integers(1, 64), d=dims, s=st.integers(1, 64))
def test_shared_ratio_matches_its_definition(n, d, s):
    s = min(s, n)
    assert shared_params(n, d, d, s) == s * d * d + s * n
    assert shared_ratio(n, d, d, s) == pytest.approx(1 - (s * d * d + s * n) / (n * d * d))


@given(d_out=dims, d_in=dims, ratio=ratios)
def test_rank_never_exceeds_the_budget(d_out, d_in, ratio):
    try:
        r = rank_for_ratio(d_out, d_in, ratio)
    except ValueError as err:
        assert "rank" in str(err)
        return
    assert 1 <= r <= min(d_out, d_in)
    assert lowrank_params(d_out, d_in, r) <= d_out * d_in * (1 - ratio) + 1e-6
    if r < min(d_out, d_in):
        assert lowrank_params(d_out, d_in, r + 1) > d_out * d_in * (1 - ratio)


@pytest.mark.parametrize("bad", [0, 1, -0.5, 1.5, float("nan"), "0.5", True])
def test_ratios_outside_the_open_interval_are_refused(bad):
    with pytest.raises(ValueError, match=r"outside \(0, 1\)"):
        rank_for_ratio(64, 64, bad)


def test_paper_configuration():
    # 12 blocks, d = 768, S = L/3 = 4 atoms: about two thirds of the attention weights removed
    assert atoms_for_ratio(12, 768, 768, 2 / 3) == 4
    assert shared_ratio(12, 768, 768, 4) == pytest.approx(0.6666, abs=1e-3)
