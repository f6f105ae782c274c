"""llr.hub_model: loading the LLR TF1 Hub pair and computing what the challenge submission did.

Stand-in modules are real TF1 Hub modules (TF1 SavedModel, empty tag set, signature 'default',
tfhub_module.pb) with a tiny conv + BN network; the reference is a TF1 graph and session fed
with a hand-written (numpy) version of the submission's preprocessing.
"""

import hashlib
import os
import socket
import tarfile

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2

from llr import hub_model, tf1_hub_format
from tests.llr_builders import (
    load_folder_images,
    write_decay_rate_probe,
    write_photo_folder,
    write_standin_pair,
)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    data_dir = write_photo_folder(str(tmp_path_factory.mktemp("photos")))
    images, labels = load_folder_images(data_dir)
    return images, labels


@pytest.fixture(scope="module")
def modules(tmp_path_factory, photos):
    images, _ = photos
    centre = np.stack([img[:96, :96] for img in images])
    return write_standin_pair(str(tmp_path_factory.mktemp("modules")), centre_on=centre)


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to resolve a host name or open a connection fails at once."""

    def refuse(*args, **kwargs):
        raise OSError("network disabled by the test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


# ---- the hand-written TF1-style reference -------------------------------------------------

def reference_preprocess(image: np.ndarray) -> np.ndarray:
    """Central crop 0.875 then TF1 resize_bilinear(align_corners=False) to 224, to [-1, 1]."""
    h, w = image.shape[:2]
    top, left = int((h - h * 0.875) / 2), int((w - w * 0.875) / 2)
    crop = image[top:h - top, left:w - left].astype(np.float64)
    ih, iw = crop.shape[:2]
    # TF1 maps output pixel i to input coordinate i * in/out (no half-pixel centres), in
    # float32: at 299 pixels the coordinates' rounding alone moves values by ~5e-5.
    ys = np.arange(224, dtype=np.float32) * np.float32(ih / 224)
    xs = np.arange(224, dtype=np.float32) * np.float32(iw / 224)
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    y1, x1 = np.minimum(y0 + 1, ih - 1), np.minimum(x0 + 1, iw - 1)
    fy = (ys - y0).astype(np.float64)[:, None, None]
    fx = (xs - x0).astype(np.float64)[None, :, None]
    top_row = crop[y0][:, x0] * (1 - fx) + crop[y0][:, x1] * fx
    bottom_row = crop[y1][:, x0] * (1 - fx) + crop[y1][:, x1] * fx
    return ((top_row * (1 - fy) + bottom_row * fy) - 0.5) * 2.0


def reference_submission(latents_dir, linear_dir, images):
    """The challenge submission in a TF1 graph: two-class logits and P(bird) per image."""
    batch = np.stack([reference_preprocess(image) for image in images]).astype(np.float32)
    v1 = tf.compat.v1
    graph = tf.Graph()
    with graph.as_default(), v1.Session(graph=graph) as sess:
        names = {}
        for scope, path in (("latents", latents_dir), ("linear", linear_dir)):
            meta_graph = v1.saved_model.loader.load(sess, [], path, import_scope=scope)
            signature = meta_graph.signature_def["default"]
            names[scope] = {key: f"{scope}/{info.name}"
                            for key, info in [*signature.inputs.items(),
                                              *signature.outputs.items()]}
        latents = sess.run(names["latents"]["default"], {
            names["latents"]["inputs"]: batch, names["latents"]["decay_rate"]: 0.1})
        logits = sess.run(names["linear"]["default"], {names["linear"]["inputs"]: latents})
    bird = logits.reshape(len(images), -1)[:, 1].astype(np.float64)
    two_class = np.stack([np.maximum(-bird, 0), np.maximum(bird, 0)], axis=1)
    return two_class, 1.0 / (1.0 + np.exp(-bird))


# ---- the stand-ins are the TF1 Hub format --------------------------------------------------

def test_standin_modules_are_tf1_hub_modules_with_empty_tags_and_default_signature(modules):
    latents_dir, linear_dir = modules
    expected_inputs = {latents_dir: {"inputs", "decay_rate"}, linear_dir: {"inputs"}}
    ops = {}
    for path, inputs in expected_inputs.items():
        with open(os.path.join(path, "tfhub_module.pb"), "rb") as f:
            assert tf1_hub_format.read_module_format(f.read()) == 3
        saved_model = saved_model_pb2.SavedModel()
        with open(os.path.join(path, "saved_model.pb"), "rb") as f:
            saved_model.ParseFromString(f.read())
        (meta_graph,) = saved_model.meta_graphs
        assert list(meta_graph.meta_info_def.tags) == []
        assert set(meta_graph.signature_def) == {"default"}
        signature = meta_graph.signature_def["default"]
        assert set(signature.inputs) == inputs
        assert set(signature.outputs) == {"default"}
        assert os.path.isdir(os.path.join(path, "variables"))
        ops[path] = {(node.op, node.name) for node in meta_graph.graph_def.node}
    # The latents network is a real convolutional network with batch norm (moving statistics,
    # normalisation by rsqrt of the variance).
    latents_ops = {op for op, _ in ops[latents_dir]}
    latents_names = {name for _, name in ops[latents_dir]}
    assert {"Conv2D", "Rsqrt"} <= latents_ops
    assert any(name.endswith("BatchNorm/moving_variance") for name in latents_names)


# ---- the pipeline against the reference ----------------------------------------------------

def test_preprocess_matches_hand_written_crop_and_tf1_bilinear_resize():
    rng = np.random.default_rng(3)
    for shape in ((37, 53), (224, 224), (299, 299), (131, 90)):
        image = rng.uniform(size=(*shape, 3)).astype(np.float32)
        got = hub_model.LLRModel.preprocess(image[None]).numpy()[0]
        np.testing.assert_allclose(got, reference_preprocess(image), atol=2e-6)


def test_logits_and_p_bird_match_tf1_reference_by_local_path(modules, photos):
    images, _ = photos
    model = hub_model.load(*modules)
    want_logits, want_p = reference_submission(*modules, images)
    for index, image in enumerate(images):  # one by one: the photos differ in size
        np.testing.assert_allclose(model(image[None]).numpy()[0], want_logits[index],
                                   rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(model.p_bird(image[None]).numpy()[0], want_p[index],
                                   rtol=1e-4, atol=1e-6)
    assert len(set(np.sign(want_logits[:, 1] - want_logits[:, 0]))) == 2, \
        "the centred stand-in should predict both classes"


def test_two_class_logits_are_relu_of_minus_and_plus_bird_logit(modules, photos):
    images, _ = photos
    model = hub_model.load(*modules)
    batch = np.stack([img[:96, :96] for img in images])
    bird = model.raw_logits(batch).numpy()[:, 0, 0, 1]
    np.testing.assert_allclose(model(batch).numpy(),
                               np.stack([np.maximum(-bird, 0), np.maximum(bird, 0)], 1),
                               atol=1e-6)
    np.testing.assert_allclose(model.p_bird(batch).numpy(), 1 / (1 + np.exp(-bird)), atol=1e-6)


def test_gradient_wrt_input_matches_finite_differences(modules, photos):
    images, _ = photos
    model = hub_model.load(*modules)
    x = tf.constant(np.stack([img[:96, :96] for img in images[:2]]))
    direction = tf.constant(np.random.default_rng(0).normal(size=x.shape), tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(x)
        value = tf.reduce_sum(model.p_bird(x))
    grad = tape.gradient(value, x)
    assert float(tf.reduce_max(tf.abs(grad))) > 0
    h = 1e-3
    numeric = (tf.reduce_sum(model.p_bird(x + h * direction))
               - tf.reduce_sum(model.p_bird(x - h * direction))) / (2 * h)
    analytic = tf.reduce_sum(grad * direction)
    np.testing.assert_allclose(float(analytic), float(numeric), rtol=2e-2, atol=1e-4)


def test_model_works_in_tf_function_with_free_batch_and_image_size(modules, photos):
    images, _ = photos
    model = hub_model.load(*modules)

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)])
    def logits_and_grad(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            logits = model(x)
            bird = logits[:, 1]
        return logits, tape.gradient(bird, x)

    for batch in (np.stack([img[:96, :96] for img in images[:1]]),
                  np.stack([img[:80, :64] for img in images[:3]])):
        logits, grad = logits_and_grad(tf.constant(batch))
        np.testing.assert_allclose(logits.numpy(), model(batch).numpy(), rtol=1e-5, atol=1e-6)
        assert grad.shape == batch.shape
    assert logits_and_grad.experimental_get_tracing_count() == 1


def test_decay_rate_reaches_the_latents_module_and_does_not_change_inference(tmp_path, modules,
                                                                            photos):
    images, _ = photos
    batch = np.stack([img[:96, :96] for img in images])
    # A probe in place of the latents module: its output shifts by decay_rate * shift, so the
    # value load() was given is the value the module received.
    shift = np.linspace(1.0, 2.0, 8)
    probe = write_decay_rate_probe(str(tmp_path / "probe"), (224, 224, 3),
                                   np.ones((3, 8)), shift)
    low = hub_model.load(probe, modules[1], decay_rate=0.1).latents(batch).numpy()
    high = hub_model.load(probe, modules[1], decay_rate=0.9).latents(batch).numpy()
    np.testing.assert_allclose(high - low, np.broadcast_to(0.8 * shift, low.shape), atol=1e-5)
    # The real structure (batch norm whose moving-average update, the only use of decay_rate,
    # sits outside the signature's output): the decay rate does not change the outputs.
    a = hub_model.load(*modules, decay_rate=0.1)(batch).numpy()
    b = hub_model.load(*modules, decay_rate=0.9)(batch).numpy()
    np.testing.assert_array_equal(a, b)


def test_linear_module_with_a_decay_rate_input_is_fed_by_keyword(tmp_path, modules, photos):
    """Positional arguments would bind alphabetically: decay_rate first, then inputs."""
    images, _ = photos
    linear = tf1_hub_format.write_linear_standin(str(tmp_path / "linear"), seed=1,
                                                 with_decay_rate=True)
    with_decay = hub_model.load(modules[0], linear)
    plain = hub_model.load(modules[0], tf1_hub_format.write_linear_standin(
        str(tmp_path / "plain"), seed=1))
    batch = np.stack([img[:96, :96] for img in images])
    np.testing.assert_allclose(with_decay(batch).numpy(), plain(batch).numpy(), atol=1e-6)
    # A linear module whose logits move with decay_rate: each input gets its own value.
    weights = np.random.default_rng(2).normal(0.0, 1.0, (8, 2))
    probe = write_decay_rate_probe(str(tmp_path / "probe"), (1, 1, 8), weights,
                                   np.array([0.0, 10.0]))
    model = hub_model.load(modules[0], probe, decay_rate=0.25)
    latents = plain.latents(batch).numpy().reshape(len(batch), 8)
    expected = latents @ weights + np.array([0.0, 2.5])
    np.testing.assert_allclose(model.raw_logits(batch).numpy().reshape(len(batch), 2),
                               expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(model.bird_logit(batch).numpy(), expected[:, 1],
                               rtol=1e-5, atol=1e-5)


# ---- handles: tfhub.dev URLs from a seeded cache, archives ---------------------------------

def test_default_tfhub_urls_load_from_seeded_cache_without_network(tmp_path, monkeypatch,
                                                                   modules, photos, no_network):
    images, _ = photos
    cache = tmp_path / "tfhub_cache"
    tf1_hub_format.seed_hub_cache(str(cache), hub_model.DEFAULT_LATENTS_HANDLE, modules[0])
    tf1_hub_format.seed_hub_cache(str(cache), hub_model.DEFAULT_LINEAR_HANDLE, modules[1])
    # tensorflow_hub reads TFHUB_CACHE_DIR at each resolution, not at import.
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(cache))
    assert sorted(p for p in os.listdir(cache) if not p.endswith(".txt")) == sorted(
        hashlib.sha1(url.encode("utf8")).hexdigest()
        for url in (hub_model.DEFAULT_LATENTS_HANDLE, hub_model.DEFAULT_LINEAR_HANDLE))
    from_cache = hub_model.load()
    batch = np.stack([img[:96, :96] for img in images])
    np.testing.assert_allclose(from_cache(batch).numpy(),
                               hub_model.load(*modules)(batch).numpy(), atol=1e-6)


def test_uncached_url_without_network_names_the_cache_directory(tmp_path, monkeypatch,
                                                                no_network):
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(tmp_path / "empty_cache"))
    with pytest.raises(hub_model.HubModuleNotFoundError) as info:
        hub_model.load()
    message = str(info.value)
    assert message.startswith(f"latents module '{hub_model.DEFAULT_LATENTS_HANDLE}'")
    assert os.path.join(str(tmp_path / "empty_cache"),
                        tf1_hub_format.cache_key(hub_model.DEFAULT_LATENTS_HANDLE)) in message
    assert isinstance(info.value, FileNotFoundError)
    assert not [p for p in os.listdir(tmp_path / "empty_cache") if p.endswith(".lock")]


def test_tar_gz_archive_of_a_module_is_unpacked_and_loaded(tmp_path, monkeypatch, modules,
                                                           photos):
    images, _ = photos
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(tmp_path / "cache"))
    archives = []
    for path in modules:
        archive = str(tmp_path / (os.path.basename(path) + ".tar.gz"))
        with tarfile.open(archive, "w:gz") as tar:
            for name in os.listdir(path):
                tar.add(os.path.join(path, name), arcname=name)
        archives.append(archive)
    batch = np.stack([img[:96, :96] for img in images])
    np.testing.assert_allclose(hub_model.load(*archives)(batch).numpy(),
                               hub_model.load(*modules)(batch).numpy(), atol=1e-6)


# ---- clear errors ---------------------------------------------------------------------------

def test_missing_local_directory_is_a_file_not_found_error_naming_it(tmp_path, modules):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"latents module '.*nowhere': no such file"):
        hub_model.load(missing, modules[1])
    with pytest.raises(hub_model.HubModuleNotFoundError, match=r"^linear module"):
        hub_model.load(modules[0], missing)


def test_tf2_saved_model_is_rejected_as_not_a_tf1_hub_module(tmp_path, modules):
    module = tf.Module()
    module.v = tf.Variable(1.0)
    module.f = tf.function(lambda x: x * module.v,
                           input_signature=[tf.TensorSpec([None], tf.float32)])
    tf.saved_model.save(module, str(tmp_path / "tf2"))
    with pytest.raises(hub_model.HubModuleError,
                       match=r"a TF2 SavedModel without tfhub_module.pb, not a TF1 Hub module"):
        hub_model.load(str(tmp_path / "tf2"), modules[1])


def test_unsupported_marker_format_is_rejected(tmp_path, modules):
    odd = tf1_hub_format.write_linear_standin(str(tmp_path / "odd"))
    with open(os.path.join(odd, "tfhub_module.pb"), "wb") as f:
        f.write(tf1_hub_format.module_def_bytes(7))
    with pytest.raises(hub_model.HubModuleError, match="module format 7"):
        hub_model.load(modules[0], odd)


def test_wrong_signature_inputs_are_rejected(tmp_path, modules):
    wrong = tf1_hub_format.write_tf1_hub_module(
        str(tmp_path / "wrong"), lambda inputs: inputs["images"] * 2.0,
        {"images": tf.TensorSpec([None, 224, 224, 3], tf.float32)})
    with pytest.raises(hub_model.HubModuleError,
                       match=r"takes inputs \['images'\]; expected \['inputs'\]"):
        hub_model.load(wrong, modules[1])


def test_swapped_modules_are_rejected_by_their_shapes(modules):
    latents, linear = modules
    with pytest.raises(hub_model.HubModuleError, match=r"latents module .*preprocessing feeds"):
        hub_model.load(linear, latents)


def test_model_rejects_integer_images(modules):
    model = hub_model.load(*modules)
    with pytest.raises(ValueError, match="divide by 255"):
        model(np.zeros([1, 32, 32, 3], np.uint8))
