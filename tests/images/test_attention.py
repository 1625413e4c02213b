"""The one attention renderer."""

import numpy as np

from dplg_tf.images import attention


def test_the_overlay_is_hottest_where_the_attention_is():
    a = np.zeros((4, 6))
    a[1, 4] = 1.0
    image = np.full((40, 60, 3), 128, np.uint8)
    out = attention.overlay(image, a)
    assert out.shape == (40, 60, 3) and 0 <= out.min() and out.max() <= 1
    red = out[..., 0] - out[..., 2]
    y, x = np.unravel_index(np.argmax(red), red.shape)
    assert 5 <= y <= 20 and 35 <= x <= 55     # the cell (1, 4) of a 4 x 6 grid
    np.testing.assert_allclose(attention.colour([0.0, 1.0])[:, :], [[0, 0, 0.5], [0.5, 0, 0]])


def test_side_by_side_and_text():
    images = np.random.default_rng(0).uniform(0, 255, (2, 16, 24, 3))
    maps = np.random.default_rng(1).random((2, 2, 3))
    pair = attention.side_by_side(images, maps)
    assert pair.shape == (2, 16, 48, 3)
    np.testing.assert_allclose(pair[:, :, :24], images / 255.0)
    text = attention.ascii_map([[0.0, 0.5], [1.0, 0.25]]).splitlines()
    assert text == [" =", "@:"]
