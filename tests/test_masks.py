"""jattn.masks helpers against masks built position by position in tests/reference.py."""

import numpy as np
import pytest

from jattn.core import masks
from reference import allowed_mask

T, S = 5, 11


@pytest.mark.parametrize("offset", [0, S - T, -2])
def test_causal_mask(offset):
    ref = allowed_mask(1, 1, T, S, is_causal=True, offset=offset)[0, 0]
    np.testing.assert_array_equal(masks.causal_mask(T, S, offset=offset), ref)


@pytest.mark.parametrize("window, pair", [(2, (2, 2)), ((3, 0), (3, 0)), ((0, 4), (0, 4))])
def test_local_window_mask(window, pair):
    ref = allowed_mask(1, 1, T, S, window=pair, offset=1)[0, 0]
    np.testing.assert_array_equal(masks.local_window_mask(T, S, window, offset=1), ref)


def test_padding_and_segment_masks_and_combine():
    q_len = np.array([2, 5, 0])
    kv_len = np.array([11, 3, 7])
    rng = np.random.default_rng(0)
    q_seg = rng.integers(0, 3, (3, T))
    kv_seg = rng.integers(0, 3, (3, S))
    ref = allowed_mask(3, 1, T, S, q_lengths=q_len, kv_lengths=kv_len,
                       q_segment_ids=q_seg, kv_segment_ids=kv_seg, is_causal=True)[:, 0]
    combined = masks.combine_masks(
        masks.padding_mask(T, S, q_len, kv_len), masks.segment_mask(q_seg, kv_seg), masks.causal_mask(T, S)
    )
    np.testing.assert_array_equal(combined, ref)
    np.testing.assert_array_equal(masks.padding_mask(T, S, kv_lengths=kv_len),
                                  allowed_mask(3, 1, T, S, kv_lengths=kv_len)[:, 0])
    assert masks.combine_masks(None, None) is None


def test_structured_tile_equals_dense_slice():
    rng = np.random.default_rng(1)
    q_seg = rng.integers(0, 2, T)
    kv_seg = rng.integers(0, 2, S)
    spec = masks.StructuredMask(True, S - T, (3, 1), 4, 9, q_seg, kv_seg)
    full = spec.tile(np.arange(T), np.arange(S))
    ref = allowed_mask(1, 1, T, S, is_causal=True, offset=S - T, window=(3, 1), q_lengths=[4],
                       kv_lengths=[9], q_segment_ids=q_seg[None], kv_segment_ids=kv_seg[None])[0, 0]
    np.testing.assert_array_equal(full, ref)
    np.testing.assert_array_equal(spec.tile(np.arange(1, 4), np.arange(5, 11)), ref[1:4, 5:11])
    assert masks.StructuredMask().tile(np.arange(T), np.arange(S)) is None
