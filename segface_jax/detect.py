"""MediaPipe's FaceLandmarker as a face finder: an alternative to MTCNN (``segface_jax.mtcnn``).

A detector is any ``callable(rgb: (H, W, 3) uint8)`` returning ``Detections`` (boxes, scores,
landmarks), (K, 2) pixel points of one face (K = 5, 68 or 106, see ``segface_jax.landmarks``),
or None for no face. ``FaceParser(..., detector=...)`` calls it for every image that comes
without landmarks: per face, each face it finds is aligned and parsed; with ``faces="none"``
it gives a LaPa model the landmarks of the largest face in the whole image.

``MediaPipeDetector`` (``pip install 'segface-jax[detect]'``) wraps Google's MediaPipe
FaceLandmarker (478-point face mesh) and reduces the mesh to the five points: the two iris
centres, the nose tip and the mouth corners. Its model file is downloaded once into the
segface-jax cache; offline, the message says which file to fetch and where to put it.
"""

from __future__ import annotations

import os
import urllib.request
from pathlib import Path

import numpy as np

from segface_jax.files import atomic_write
from segface_jax.landmarks import LandmarkError

MEDIAPIPE_MODEL_URL = ("https://storage.googleapis.com/mediapipe-models/face_landmarker/"
                       "face_landmarker/float16/latest/face_landmarker.task")
# FaceLandmarker mesh indices: iris centres (refined mesh), nose tip, mouth corners.
_IRIS_CENTRES = (468, 473)
_NOSE_TIP = 1
_MOUTH_CORNERS = (61, 291)


def mesh_to_five(mesh: np.ndarray) -> np.ndarray:
    """(478, 2) FaceLandmarker pixel points -> (5, 2): eyes, nose tip, mouth corners.

    Eyes and mouth corners are ordered left to right in the image, as the LaPa and 68-point
    reductions give them for a frontal face.
    """
    mesh = np.asarray(mesh, np.float32)
    if mesh.shape != (478, 2):
        raise LandmarkError(f"expected a (478, 2) FaceLandmarker mesh, got {mesh.shape}")
    eyes = sorted((mesh[i] for i in _IRIS_CENTRES), key=lambda p: p[0])
    mouth = sorted((mesh[i] for i in _MOUTH_CORNERS), key=lambda p: p[0])
    return np.stack([eyes[0], eyes[1], mesh[_NOSE_TIP], mouth[0], mouth[1]])


def mediapipe_model(path: str | os.PathLike | None = None) -> Path:
    """The FaceLandmarker model file: ``path``, or the cached copy, downloaded once."""
    from segface_jax.hub import cache_dir

    if path is not None:
        if not Path(path).is_file():
            raise LandmarkError(f"{path}: no such MediaPipe model file")
        return Path(path)
    target = cache_dir() / "mediapipe" / "face_landmarker.task"
    if target.is_file():
        return target
    def download(tmp: Path) -> None:
        with urllib.request.urlopen(MEDIAPIPE_MODEL_URL, timeout=30) as r:
            tmp.write_bytes(r.read())

    try:
        atomic_write(target, download)
    except OSError as e:
        raise LandmarkError(
            f"cannot download the MediaPipe face landmark model ({e}); fetch "
            f"{MEDIAPIPE_MODEL_URL} and save it as {target}") from None
    return target


class MediaPipeDetector:
    """Five face landmarks from MediaPipe's FaceLandmarker (the most prominent face)."""

    def __init__(self, model_path: str | os.PathLike | None = None):
        try:
            import mediapipe as mp
            from mediapipe.tasks.python import BaseOptions, vision
        except ModuleNotFoundError:
            raise LandmarkError("automatic landmarks need MediaPipe: pip install "
                                "'segface-jax[detect]'") from None
        self._mp = mp
        options = vision.FaceLandmarkerOptions(
            base_options=BaseOptions(model_asset_path=str(mediapipe_model(model_path))),
            num_faces=1)
        self._landmarker = vision.FaceLandmarker.create_from_options(options)

    def __call__(self, rgb: np.ndarray) -> np.ndarray | None:
        """(H, W, 3) uint8 RGB -> (5, 2) pixel points of the face, or None when there is none."""
        image = self._mp.Image(image_format=self._mp.ImageFormat.SRGB,
                               data=np.ascontiguousarray(rgb))
        faces = self._landmarker.detect(image).face_landmarks
        if not faces:
            return None
        h, w = rgb.shape[:2]
        mesh = np.array([[p.x * w, p.y * h] for p in faces[0]], np.float32)
        return mesh_to_five(mesh)
