"""The MTCNN pipeline's host steps against torch's area interpolation and torchvision's NMS."""

from __future__ import annotations

import numpy as np
import pytest

from segface_jax.mtcnn import area_resize, nms, nms_min

torch = pytest.importorskip("torch", reason="the references are torch's and torchvision's ops")
torchvision = pytest.importorskip("torchvision", reason="the NMS reference is torchvision's")


@pytest.mark.parametrize("src,dst", [((480, 640), (241, 321)), ((37, 53), (24, 24)),
                                     ((20, 30), (48, 48)), ((13, 7), (24, 24)),
                                     ((512, 512), (12, 12))])
def test_area_resize_matches_torch(src, dst):
    """Pyramid levels (int(h * scale + 1)), crops shrunk and enlarged to 24 / 48 px."""
    img = np.random.default_rng(sum(src)).uniform(0, 255, (*src, 3)).astype(np.float32)
    want = torch.nn.functional.interpolate(torch.from_numpy(img.transpose(2, 0, 1))[None],
                                           size=dst, mode="area")[0].numpy().transpose(1, 2, 0)
    # ours rounds a float64 average once; torch sums each window in float32, up to 43x43
    # pixels of <= 255 here (512 -> 12), measured 2.7e-4 from ours there and <= 3e-5 for the
    # smaller windows. 1e-3 (4e-6 of the range, 8e-6 after MTCNN's / 128) is far below what
    # moves a detection, and a wrong window is off by whole pixel values
    np.testing.assert_allclose(area_resize(img, dst), want, rtol=0, atol=1e-3)


def _random_boxes(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 200, (n, 2))
    wh = rng.uniform(5, 60, (n, 2))
    return np.concatenate([xy, xy + wh], 1).astype(np.float32), rng.random(n).astype(np.float32)


@pytest.mark.parametrize("iou", [0.5, 0.7])
def test_nms_matches_torchvision(iou):
    boxes, scores = _random_boxes(300, int(iou * 10))
    groups = np.random.default_rng(1).integers(0, 3, len(boxes))
    want = torchvision.ops.nms(torch.from_numpy(boxes), torch.from_numpy(scores), iou).numpy()
    np.testing.assert_array_equal(nms(boxes, scores, iou), want)
    want = torchvision.ops.batched_nms(torch.from_numpy(boxes), torch.from_numpy(scores),
                                       torch.from_numpy(groups), iou).numpy()
    np.testing.assert_array_equal(nms(boxes, scores, iou, groups), want)
    assert len(want) < len(boxes)  # the boxes overlap: something was suppressed


def test_nms_min_suppresses_boxes_inside_a_better_one():
    """A box inside a higher-scoring one overlaps it by 100% of its own area, though their IoU
    is small: "Min" drops it, IoU keeps it; the +1 makes touching boxes overlap by one pixel."""
    boxes = np.array([[0, 0, 99, 99], [10, 10, 29, 29], [99, 0, 198, 99], [300, 0, 309, 9]],
                     np.float32)
    scores = np.array([0.9, 0.8, 0.7, 0.6], np.float32)
    np.testing.assert_array_equal(nms_min(boxes, scores, 0.7), [0, 2, 3])
    np.testing.assert_array_equal(nms(boxes, scores, 0.7), [0, 1, 2, 3])
    # with the +1, boxes 0 and 2 share the column x = 99: 100 pixels, 1% of the smaller box
    np.testing.assert_array_equal(nms_min(boxes, scores, 0.005), [0, 3])
    # groups keep images apart
    np.testing.assert_array_equal(nms_min(boxes, scores, 0.7, np.array([0, 1, 0, 0])),
                                  [0, 1, 2, 3])


def test_nms_min_matches_facenet_pytorch():
    try:
        from facenet_pytorch.models.utils.detect_face import batched_nms_numpy
    except ImportError:
        pytest.skip("facenet-pytorch is not installed; it pins torch<2.3, so install it with "
                    "pip install --no-deps facenet-pytorch==2.6.0")
    boxes, scores = _random_boxes(300, 3)
    groups = np.random.default_rng(2).integers(0, 3, len(boxes))
    want = batched_nms_numpy(torch.from_numpy(boxes), torch.from_numpy(scores),
                             torch.from_numpy(groups), 0.7, "Min").numpy()
    np.testing.assert_array_equal(nms_min(boxes, scores, 0.7, groups), want)


@pytest.mark.parametrize("faces", [1, 2, 4, 6])
def test_detector_matches_facenet_pytorch(faces):
    """The whole detector (pyramid, three networks, NMS, regression, landmarks) against
    facenet-pytorch's ``MTCNN.detect`` with the pretrained files, on the astronaut and on
    composites with its head pasted at other scales, rotations (up to 30 degrees) and mirrored:
    the same faces (every one found), boxes and landmarks within 1 px (measured 6.1e-5),
    scores within 1e-4 (measured equal)."""
    try:
        import facenet_pytorch
    except ImportError:
        pytest.skip("facenet-pytorch is not installed; it pins torch<2.3, so install it with "
                    "pip install --no-deps facenet-pytorch==2.6.0")
    import importlib.resources

    from segface_jax.convert.detector import convert_network, load_network_file, load_networks
    from segface_jax.examples import group_photo
    from segface_jax.mtcnn import MTCNN

    data = importlib.resources.files("facenet_pytorch") / "data"
    ours = MTCNN(load_networks({n: convert_network(n, load_network_file(data / f"{n}.pt"))
                                for n in ("pnet", "rnet", "onet")}))
    image = group_photo(faces)
    got = ours(image)
    boxes, scores, points = (np.asarray(a, np.float64) for a in  # object arrays in facenet
                             facenet_pytorch.MTCNN(device="cpu").detect(image, landmarks=True))
    assert len(got) == len(boxes) == faces
    np.testing.assert_allclose(got.boxes, boxes, rtol=0, atol=1.0)
    np.testing.assert_allclose(got.landmarks, points, rtol=0, atol=1.0)
    np.testing.assert_allclose(got.scores, scores, rtol=0, atol=1e-4)


def test_group_photo_refuses_impossible_counts():
    from segface_jax.examples import group_photo

    with pytest.raises(ValueError, match="1 to 6 faces"):
        group_photo(7)
