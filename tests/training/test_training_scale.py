"""Training on a large pool is bounded by documented subsampling; a pool below the caps trains as before."""

from __future__ import annotations

import numpy as np

from cspml_flows.learning.features import Standardizer
from cspml_flows.learning.pairs import sample_pairs


def test_group_cap_bounds_the_partners_and_leaves_small_groups_alone(template_index):
    index = template_index
    std = Standardizer(index.stats, index.role_props)
    rows = np.arange(len(index))
    biggest = max(len(m) for m in index.by_anon.values())
    plain = sample_pairs(index, rows, rows, std, seed=3)
    roomy = sample_pairs(index, rows, rows, std, seed=3, max_group=biggest)
    assert all(np.array_equal(a, b) for a, b in zip(plain, roomy, strict=True))  # the cap does not bite
    cap = max(2, biggest // 4)
    a, t = sample_pairs(index, rows, rows, std, seed=3, max_group=cap)
    assert len(a) > 0
    for members in index.by_anon.values():
        if len(members) <= cap:
            continue
        partners = np.unique(t[np.isin(a, members)])
        assert len(partners) <= cap  # every anchor of the group drew from one sample of at most `cap`
    again = sample_pairs(index, rows, rows, std, seed=3, max_group=cap)
    assert all(np.array_equal(x, y) for x, y in zip((a, t), again, strict=True))  # seeded: reproducible
