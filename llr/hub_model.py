"""DeepMind's LLR bird-or-bicycle model from its two TF1 Hub modules, callable in TF2.

The model was published as ``deepmind/llr-pretrain-adv/latents/1`` (a ResNet-152 mapping
[N,224,224,3] images in [-1,1] to latents) and ``.../linear/1`` (latents -> logits [N,1,1,2]).
In TF2 ``hub.Module`` is gone and ``hub.load`` returns a non-callable object whose
``signatures['default']`` must be called with keywords. :func:`load` hides that and
reproduces the Unrestricted Adversarial Examples challenge submission:

    images in [0,1], any size -> central crop 0.875 -> bilinear resize to 224 (TF1 kernel)
    -> (x - 0.5) * 2 -> latents -> linear -> l = logits[:, 1]
    -> two-class logits [relu(-l), relu(l)]  (order [bicycle, bird]),  P(bird) = sigmoid(l)

The returned :class:`LLRModel` is differentiable with respect to its input, works inside
``tf.function`` and takes any batch size.
"""

from __future__ import annotations

import os
import shutil
import tarfile
from typing import Any

import tensorflow as tf

from adversarial_logit_pairing import atomic_files
from adversarial_logit_pairing.errors import CheckpointError, MissingCheckpointError
from llr import tf1_hub_format

DEFAULT_LATENTS_HANDLE = "https://tfhub.dev/deepmind/llr-pretrain-adv/latents/1"
DEFAULT_LINEAR_HANDLE = "https://tfhub.dev/deepmind/llr-pretrain-adv/linear/1"
IMAGE_SIZE = 224
CENTRAL_FRACTION = 0.875
# The value the published examples feed; it only drives BN moving averages, unused at inference.
DECAY_RATE = 0.1
BICYCLE, BIRD = 0, 1
CLASS_NAMES = ("bicycle", "bird")

_OPTIONAL_INPUTS = ("decay_rate",)


class HubModuleError(CheckpointError):
    """A module handle does not lead to a usable TF1 Hub module of the expected interface.

    A Hub module is the model's stored weights, as a checkpoint is for ``eval.py``: the same
    :class:`CheckpointError` (a ValueError), printed by ``llr-evaluate`` as one line naming the
    ``--latents_module`` or ``--linear_module`` flag.
    """

    def __init__(self, role: str, handle: str, message: str):
        super().__init__(f"{role} module {handle!r}: {message}")
        self.role = role
        self.handle = handle
        self.detail = message


class HubModuleNotFoundError(HubModuleError, MissingCheckpointError):
    """A module handle cannot be resolved: missing path, or no network and no cached copy.

    A :class:`MissingCheckpointError`, hence also a FileNotFoundError.
    """


def _is_url(handle: str) -> bool:
    return handle.startswith(("http://", "https://", "gs://"))


def _hub_cache_dir() -> str:
    from tensorflow_hub import resolver

    return resolver.tfhub_cache_dir(use_temp=True)


def _unpack_archive(role: str, archive: str) -> str:
    """Unpacks a local ``.tar.gz`` module (as downloaded by hand) into the Hub cache.

    ``tensorflow_hub`` unpacks archives only when it downloads them; a local archive path is
    otherwise treated as a (missing) directory.
    """
    stat = os.stat(archive)
    key = tf1_hub_format.cache_key(f"file://{os.path.abspath(archive)}#{stat.st_size}"
                                   f"#{stat.st_mtime_ns}")
    target = os.path.join(_hub_cache_dir(), key)
    if os.path.isdir(target) and os.listdir(target):
        return target
    os.makedirs(os.path.dirname(target), exist_ok=True)
    try:
        with atomic_files.staged(target, overwrite=False) as staging:
            os.makedirs(staging)
            with tarfile.open(archive, "r:*") as tar:
                for member in tar.getmembers():
                    name = os.path.normpath(member.name)
                    if os.path.isabs(name) or name.startswith(".."):
                        raise HubModuleError(role, archive, f"archive member {member.name!r} "
                                             "points outside the archive")
                    if not (member.isfile() or member.isdir()):
                        raise HubModuleError(role, archive, f"archive member {member.name!r} "
                                             "is not a regular file or directory")
                if hasattr(tarfile, "data_filter"):
                    tar.extractall(staging, filter="data")
                else:  # Python < 3.11.4: the members were checked above
                    tar.extractall(staging)
            entries = os.listdir(staging)
            # Hand-made archives often wrap the module in one top-level directory: unwrap it.
            if len(entries) == 1 and os.path.isdir(os.path.join(staging, entries[0])):
                wrapper = atomic_files.sibling_name(target)
                os.rename(staging, wrapper)
                os.rename(os.path.join(wrapper, entries[0]), staging)
                shutil.rmtree(wrapper)
    except (tarfile.TarError, OSError, tf.errors.OpError) as exc:
        if os.path.isdir(target) and os.listdir(target):
            return target  # another process unpacked the same archive meanwhile
        raise HubModuleError(role, archive, f"cannot unpack the archive: {exc}") from None
    return target


def resolve_handle(handle: str, role: str = "hub") -> str:
    """Turns a module handle into a local module directory.

    Handles: a tfhub.dev (or other http/https/gs) URL, resolved through ``tensorflow_hub``'s
    cache ``$TFHUB_CACHE_DIR/<sha1 of the URL>`` (a seeded cache works with no network); a
    local directory; a local ``.tar.gz``/``.tgz`` archive of a module (unpacked into the cache).

    Raises:
      HubModuleNotFoundError: (a FileNotFoundError) the path does not exist, or the URL is
        neither cached nor downloadable.
      HubModuleError: the archive cannot be unpacked.
    """
    if not handle:
        raise HubModuleNotFoundError(role, handle, "empty module handle")
    if _is_url(handle):
        import tensorflow_hub as hub

        try:
            return hub.resolve(handle)
        except (OSError, ValueError, tf.errors.OpError) as exc:
            cached = os.path.join(_hub_cache_dir(), tf1_hub_format.cache_key(handle))
            raise HubModuleNotFoundError(
                role, handle,
                f"cannot download it and it is not cached ({type(exc).__name__}: {exc}). "
                f"Offline, put the unpacked module in {cached} (TFHUB_CACHE_DIR/<sha1 of the "
                "URL>) or pass a local module directory",
            ) from None
    if not os.path.exists(handle):
        raise HubModuleNotFoundError(role, handle, "no such file or directory")
    if os.path.isfile(handle):
        if handle.endswith((".tar.gz", ".tgz", ".tar")):
            return _unpack_archive(role, handle)
        raise HubModuleError(role, handle, "is a file; expected a module directory, a "
                             ".tar.gz archive of one, or a URL")
    return handle


def _check_tf1_hub_format(role: str, handle: str, module_dir: str) -> None:
    marker = os.path.join(module_dir, tf1_hub_format.MARKER_FILENAME)
    has_saved_model = any(
        os.path.exists(os.path.join(module_dir, name))
        for name in ("saved_model.pb", "saved_model.pbtxt")
    )
    if not os.path.exists(marker):
        what = "a TF2 SavedModel" if has_saved_model else "a directory"
        raise HubModuleError(
            role, handle,
            f"{module_dir} is {what} without {tf1_hub_format.MARKER_FILENAME}, not a TF1 Hub "
            "module; the LLR modules are TF1 Hub format (deepmind/llr-pretrain-adv/*/1)",
        )
    with open(marker, "rb") as f:
        try:
            module_format = tf1_hub_format.read_module_format(f.read())
        except ValueError as exc:
            raise HubModuleError(role, handle, f"unreadable {marker}: {exc}") from None
    if module_format != tf1_hub_format.FORMAT_V3:
        raise HubModuleError(role, handle, f"{marker} declares module format {module_format}; "
                             f"only the TF1 Hub format {tf1_hub_format.FORMAT_V3} is supported")
    if not has_saved_model:
        raise HubModuleError(role, handle, f"{module_dir} has no saved_model.pb")


def _load_signature(role: str, handle: str, required_inputs: tuple[str, ...]):
    """Loads a module and returns (loaded object, its 'default' signature, its input specs)."""
    import tensorflow_hub as hub

    module_dir = resolve_handle(handle, role)
    _check_tf1_hub_format(role, handle, module_dir)
    try:
        obj = hub.load(module_dir)
    except (ValueError, OSError, RuntimeError, tf.errors.OpError) as exc:
        raise HubModuleError(role, handle, f"cannot be loaded as a TF1 SavedModel with the "
                             f"empty tag set: {exc}") from None
    signatures = getattr(obj, "signatures", {})
    if "default" not in signatures:
        raise HubModuleError(role, handle, "has no signature 'default' (it has: "
                             f"{', '.join(sorted(signatures)) or 'none'})")
    fn = signatures["default"]
    _, specs = fn.structured_input_signature
    missing = [name for name in required_inputs if name not in specs]
    unexpected = [n for n in specs if n not in required_inputs and n not in _OPTIONAL_INPUTS]
    if missing or unexpected:
        raise HubModuleError(
            role, handle,
            f"signature 'default' takes inputs {sorted(specs)}; expected "
            f"{list(required_inputs)} (and optionally {list(_OPTIONAL_INPUTS)})",
        )
    if "default" not in fn.structured_outputs:
        raise HubModuleError(role, handle, "signature 'default' has outputs "
                             f"{sorted(fn.structured_outputs)}, not 'default'")
    if specs["inputs"].dtype != tf.float32:
        raise HubModuleError(role, handle,
                             f"input 'inputs' is {specs['inputs'].dtype.name}, not float32")
    return obj, fn, specs


class LLRModel(tf.Module):
    """The LLR bird-or-bicycle classifier on images in [0, 1] of any size.

    Calling the model returns the challenge's two-class logits [N, 2] (order [bicycle, bird]);
    :meth:`p_bird` returns ``P(bird) = sigmoid(logits[:, 1])`` of the linear module.
    """

    def __init__(self, latents_module: Any, linear_module: Any, *, latents_handle: str,
                 linear_handle: str, decay_rate: float = DECAY_RATE):
        super().__init__(name="llr")
        # The loaded objects own the variables the signatures capture: keep them alive.
        self._latents_module = latents_module
        self._linear_module = linear_module
        self._latents_fn = latents_module.signatures["default"]
        self._linear_fn = linear_module.signatures["default"]
        self._latents_inputs = set(self._latents_fn.structured_input_signature[1])
        self._linear_inputs = set(self._linear_fn.structured_input_signature[1])
        self.latents_handle = latents_handle
        self.linear_handle = linear_handle
        self.decay_rate = float(decay_rate)

    @staticmethod
    def preprocess(images: tf.Tensor) -> tf.Tensor:
        """The submission's preprocessing: [0,1] images of any size -> [N,224,224,3] in [-1,1].

        Raises:
          ValueError: images of an integer type or not of rank 4.
        """
        images = tf.convert_to_tensor(images)
        if images.dtype.is_integer:
            raise ValueError(f"LLR expects float images in [0, 1], got {images.dtype.name} "
                             "(divide by 255 first)")
        images = tf.cast(images, tf.float32)
        if images.shape.rank is not None and images.shape.rank != 4:
            raise ValueError(f"LLR expects a batch of images [N, H, W, 3], got shape "
                             f"{images.shape}")
        images = tf.image.central_crop(images, CENTRAL_FRACTION)
        # TF1's tf.image.resize_bilinear(align_corners=False) had no half-pixel centres; TF2's
        # tf.image.resize has them, and would shift every pixel of the resized image.
        images = tf.raw_ops.ResizeBilinear(
            images=images, size=[IMAGE_SIZE, IMAGE_SIZE], align_corners=False,
            half_pixel_centers=False,
        )
        return (images - 0.5) * 2.0

    def _call(self, fn, accepted: set, inputs: tf.Tensor) -> tf.Tensor:
        kwargs = {"inputs": inputs}
        if "decay_rate" in accepted:
            kwargs["decay_rate"] = tf.constant(self.decay_rate, tf.float32)
        # Keywords: a TF1 signature binds positional arguments in alphabetical order.
        return fn(**kwargs)["default"]

    def latents(self, images: tf.Tensor) -> tf.Tensor:
        """Latents of the ``latents`` module for [0,1] images."""
        return self._call(self._latents_fn, self._latents_inputs, self.preprocess(images))

    def raw_logits(self, images: tf.Tensor) -> tf.Tensor:
        """The ``linear`` module's output [N, 1, 1, 2] for [0,1] images."""
        return self._call(self._linear_fn, self._linear_inputs, self.latents(images))

    def bird_logit(self, images: tf.Tensor) -> tf.Tensor:
        """``l = logits[:, 1]`` [N], the only meaningful logit of the linear module."""
        logits = self.raw_logits(images)
        logits = tf.reshape(logits, [tf.shape(logits)[0], -1])
        return logits[:, BIRD]

    def two_class_logits(self, images: tf.Tensor) -> tf.Tensor:
        """Two-class logits [N, 2] = [relu(-l), relu(l)], as the challenge submission made them."""
        return two_class_logits_from_bird_logit(self.bird_logit(images))

    def p_bird(self, images: tf.Tensor) -> tf.Tensor:
        """``P(bird) = sigmoid(l)`` [N]."""
        return tf.sigmoid(self.bird_logit(images))

    def __call__(self, images: tf.Tensor) -> tf.Tensor:
        return self.two_class_logits(images)


def two_class_logits_from_bird_logit(bird_logit: tf.Tensor) -> tf.Tensor:
    """[relu(-l), relu(l)]: a confident bicycle has a large first logit, a bird the second."""
    return tf.stack([tf.nn.relu(-bird_logit), tf.nn.relu(bird_logit)], axis=1)


def load(
    latents_handle: str = DEFAULT_LATENTS_HANDLE,
    linear_handle: str = DEFAULT_LINEAR_HANDLE,
    *,
    decay_rate: float = DECAY_RATE,
) -> LLRModel:
    """Loads the LLR module pair as one model (see the module docstring for what it computes).

    Args:
      latents_handle: URL, local directory or ``.tar.gz`` of the ``latents`` module.
      linear_handle: URL, local directory or ``.tar.gz`` of the ``linear`` module.
      decay_rate: fed to modules whose signature has a ``decay_rate`` input (it drives BN
        moving averages only; inference outputs do not depend on it).

    Returns:
      An :class:`LLRModel`.

    Raises:
      HubModuleNotFoundError: a handle cannot be resolved (missing path; URL with no network
        and no cached copy).
      HubModuleError: a handle is not a TF1 Hub module, lacks the 'default' signature, or its
        inputs/outputs do not fit the latents -> linear -> [N,1,1,2] interface.
    """
    latents_obj, latents_fn, latents_specs = _load_signature(
        "latents", latents_handle, ("inputs",))
    linear_obj, linear_fn, linear_specs = _load_signature("linear", linear_handle, ("inputs",))

    image_shape = latents_specs["inputs"].shape
    expected = tf.TensorShape([None, IMAGE_SIZE, IMAGE_SIZE, 3])
    if not image_shape.is_compatible_with(expected):
        raise HubModuleError("latents", latents_handle,
                             f"input 'inputs' has shape {image_shape}; the challenge's "
                             f"preprocessing feeds {expected}")
    latents_shape = latents_fn.structured_outputs["default"].shape
    if not linear_specs["inputs"].shape.is_compatible_with(latents_shape):
        raise HubModuleError("linear", linear_handle,
                             f"input 'inputs' has shape {linear_specs['inputs'].shape}, which "
                             f"does not fit the latents module's output {latents_shape}")
    logits_shape = linear_fn.structured_outputs["default"].shape
    fits = logits_shape.rank in (2, 4) and (
        logits_shape.rank == 2 or logits_shape[1:3].is_compatible_with([1, 1]))
    if not fits or (logits_shape[-1] is not None and logits_shape[-1] < 2):
        raise HubModuleError("linear", linear_handle,
                             f"output 'default' has shape {logits_shape}; expected logits "
                             "[N, 1, 1, 2]")
    return LLRModel(latents_obj, linear_obj, latents_handle=latents_handle,
                    linear_handle=linear_handle, decay_rate=decay_rate)
