"""Column selection is reproducible everywhere and differs between layers."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from paca.selection import random_columns, select_columns, validate_indices


def test_same_seed_and_name_same_columns_and_sorted_distinct():
    a = random_columns(4096, 16, seed=3, key="model.layers.0.self_attn.q_proj")
    b = random_columns(4096, 16, seed=3, key="model.layers.0.self_attn.q_proj")
    assert torch.equal(a, b)
    assert a.tolist() == sorted(set(a.tolist())) and len(a) == 16
    assert int(a.min()) >= 0 and int(a.max()) < 4096


def test_different_layers_and_seeds_differ():
    q = random_columns(4096, 16, seed=0, key="layers.0.q_proj")
    k = random_columns(4096, 16, seed=0, key="layers.0.k_proj")
    q1 = random_columns(4096, 16, seed=1, key="layers.0.q_proj")
    assert not torch.equal(q, k) and not torch.equal(q, q1)


def test_full_rank_is_a_permutation_of_everything():
    assert random_columns(10, 10, 0, "x").tolist() == list(range(10))


def test_reproducible_across_processes():
    code = (
        "from paca.selection import random_columns;"
        "print(random_columns(1000, 8, 7, 'blocks.3.mlp.up_proj').tolist())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    here = random_columns(1000, 8, 7, "blocks.3.mlp.up_proj").tolist()
    assert out == str(here)


def test_frozen_expected_values_guard_against_silent_algorithm_changes():
    # Saved adapters store their indices, but configs that only store the seed rely on
    # this exact sequence. If this test fails, the selection algorithm changed.
    assert random_columns(100, 5, 0, "q_proj").tolist() == [18, 28, 37, 46, 88]


@pytest.mark.parametrize("r", [0, 11, -1])
def test_rank_out_of_range(r):
    with pytest.raises(ValueError, match=r"choose 1 <= r <= 10"):
        random_columns(10, r, 0, "layer")


def test_user_indices_are_validated():
    assert validate_indices([5, 1, 3], 8, "m").tolist() == [1, 3, 5]
    with pytest.raises(ValueError, match="distinct"):
        validate_indices([1, 1], 8, "m")
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        validate_indices([9], 8, "m")
    with pytest.raises(ValueError, match="unknown PaCA selection strategy 'best'"):
        select_columns("best", "m", None, 2, 0, 8)
