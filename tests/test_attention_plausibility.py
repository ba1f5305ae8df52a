"""The demo model looks where bone age is read: Grad-CAM mass on the hand and its bones.

Uses the embedded demo bundle's fused ONNX ``cam`` output (exactly what the guard compares) on
freshly generated phantoms with ground-truth masks, and compares the CAM mass inside each mask with
the mask's area fraction (what a map spread uniformly would put there: chance).
"""

import numpy as np
import pytest

from gamguard.runtime import bundle
from gamguard.runtime.demo import phantoms
from gamguard.runtime.engines import create_engine
from gamguard.runtime.preprocess import preprocess_batch, resize_image

SEED = 424242  # not used by training or calibration


@pytest.fixture(scope="module")
def cams_and_masks():
    d = bundle.default_bundle_dir()
    manifest = bundle.load_manifest(d)
    spec = bundle.InputSpec.from_manifest(manifest["input"])
    engine = create_engine(d, manifest, providers="cpu")
    items = list(phantoms.iter_phantoms(25, SEED))
    out = engine.run(preprocess_batch([p.image for p in items], spec))
    correct = out.logits.argmax(1) == np.array([p.stage for p in items])
    assert correct.mean() >= 0.9, f"demo model accuracy on fresh phantoms {correct.mean():.2f}"

    def mask(p, *names):
        m = np.zeros_like(p.masks[names[0]], dtype=np.float32)
        for n in names:
            m = np.maximum(m, p.masks[n].astype(np.float32))
        return resize_image(m, spec.height, spec.width) >= 0.5

    return [(out.cam[i], mask(p, "hand"), mask(p, "bone", "growth_plate")) for i, p in enumerate(items) if correct[i]]


def _mass_and_area(cams_and_masks, which):
    mass = np.array([cam[m[which]].sum() / cam.sum() for cam, *m in cams_and_masks])
    area = np.array([m[which].mean() for _, *m in cams_and_masks])
    return mass, area


def test_most_cam_mass_lies_on_the_hand(cams_and_masks):
    mass, area = _mass_and_area(cams_and_masks, 0)
    print(f"hand: CAM mass {mass.mean():.3f} vs area {area.mean():.3f}")
    assert mass.mean() > 0.5
    assert mass.mean() > 1.5 * area.mean()


def test_cam_mass_concentrates_on_bone_and_growth_plates(cams_and_masks):
    mass, area = _mass_and_area(cams_and_masks, 1)
    print(f"bone+growth plate: CAM mass {mass.mean():.3f} vs area {area.mean():.3f}")
    assert mass.mean() > 2.0 * area.mean()
    assert np.mean(mass > area) > 0.8  # per image, not just on average
