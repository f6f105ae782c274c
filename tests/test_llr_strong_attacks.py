"""llr.evaluate's strong attacks on bird-or-bicycle's two classes: APGD on the cross-entropy
and on the margin, and Square, scored at 80% and 100% coverage; DLR attacks are refused."""

import numpy as np
import pytest

from adversarial_logit_pairing.errors import ConfigError
from llr import data, evaluation, hub_model
from tests.llr_builders import write_photo_folder, write_standin_pair

SIZE = 64
EPS = 16


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("llr_strong")
    data_dir = write_photo_folder(str(root / "data"))
    batches = list(data.iterate_split(data_dir, "test", 8, SIZE, shuffle_seed=None))
    images = np.concatenate([b.images for b in batches])
    labels = np.concatenate([b.labels for b in batches])
    latents, linear = write_standin_pair(str(root / "modules"), centre_on=images)
    model = hub_model.load(latents, linear)
    return data_dir, model, images, labels


@pytest.mark.parametrize("name", ["apgdce_16_3", "apgdmargin_16_3", "square_16_30"])
def test_strong_attack_fools_only_within_eps_on_the_true_labels(setup, name):
    data_dir, model, images, labels = setup
    settings = evaluation.EvalSettings(data_dir=data_dir, image_size=SIZE, batch_size=8)
    attack = evaluation.make_attack(name, model, settings)
    x_adv = attack(images, labels, 0)
    again = attack(images, labels, 0)
    np.testing.assert_array_equal(again, x_adv)  # seeded per batch
    assert np.abs(x_adv - images).max() <= EPS / 255 + 1e-6
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    clean = model(images).numpy().argmax(1) == labels
    adversarial = model(x_adv).numpy().argmax(1) == labels
    changed = np.abs(x_adv - images).reshape(len(images), -1).max(1) > 0
    # An image is replaced exactly when the attack fooled the model on a correct point.
    np.testing.assert_array_equal(changed, clean & ~adversarial)
    assert clean.sum() >= 2 and changed.sum() >= 1


def test_strong_attacks_are_scored_at_both_coverages(setup):
    data_dir, model, _, _ = setup
    settings = evaluation.EvalSettings(data_dir=data_dir, image_size=SIZE, batch_size=4)
    names = ["clean", "apgdce_16_3", "apgdmargin_16_3", "square_16_30"]
    results = evaluation.evaluate(model, settings, evaluation.parse_attacks(",".join(names)))
    assert [r.attack for r in results] == names
    clean = results[0]
    for result in results[1:]:
        assert result.num_examples == 8
        assert result.accuracy_at_100 < clean.accuracy_at_100
    assert "apgdmargin_16_3" in evaluation.format_table(results)


@pytest.mark.parametrize("name", ["apgddlr_16", "apgdt_16"])
def test_dlr_attacks_are_refused_for_two_classes(name):
    with pytest.raises(ConfigError, match=f"--attacks: strong attack '{name}' needs >= "):
        evaluation.parse_attacks(f"clean,{name}")
