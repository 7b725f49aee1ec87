"""placement.estimate.layer_devices: llama.cpp's layer-to-device rule, hand-computed cases."""

from __future__ import annotations

import pytest

from inference_node.placement.estimate import HOST, layer_devices

H = HOST


@pytest.mark.parametrize(
    ("n_layer", "n_devices", "ngl", "split", "expected"),
    [
        # 9 layers (8 + output) over 1:3 -> cumulative 0.25: il/9 < 0.25 for il = 0, 1, 2
        (8, 2, -1, (1, 3), [0, 0, 0, 1, 1, 1, 1, 1, 1]),
        # -ngl above the layer count offloads everything, same as -1
        (8, 2, 99, (1, 3), [0, 0, 0, 1, 1, 1, 1, 1, 1]),
        # -ngl below: the last 4 of 9 layers (output included) are offloaded
        (8, 1, 4, (), [H, H, H, H, H, 0, 0, 0, 0]),
        # -ngl == n_layer keeps layer 0 on the CPU and offloads the output layer
        (8, 1, 8, (), [H, 0, 0, 0, 0, 0, 0, 0, 0]),
        (8, 1, 0, (), [H] * 9),
        # uneven split over three devices: cumulative 0.5, 0.75, 1 over 8 layers
        (7, 3, -1, (2, 1, 1), [0, 0, 0, 0, 1, 1, 2, 2]),
        # partial offload with a split: 5 offloaded layers, (il-4)/5 against 0.5
        (8, 2, 5, (1, 1), [H, H, H, H, 0, 0, 0, 1, 1]),
        # a proportion equal to il/n goes to the next device (upper bound), in float32
        (2, 2, -1, (1, 2), [0, 1, 1]),
        # whole-number splits give exactly those layer counts
        (31, 3, -1, (10, 12, 10), [0] * 10 + [1] * 12 + [2] * 10),
        # no split given: equal shares
        (3, 2, -1, (), [0, 0, 1, 1]),
        # a zero share gets nothing
        (3, 3, -1, (1, 0, 1), [0, 0, 2, 2]),
        # no devices at all: everything on the host
        (4, 0, -1, (), [H] * 5),
    ],
)
def test_layer_devices(n_layer: int, n_devices: int, ngl: int, split: tuple[float, ...],
                       expected: list[int]) -> None:
    assert layer_devices(n_layer, n_devices, ngl, split) == expected
