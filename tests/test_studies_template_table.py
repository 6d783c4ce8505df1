"""The template table study on the shipped toy CLIP, through the real scorer."""

import numpy as np
import pytest

from lmbbo_jax.studies import template_table
from lmbbo_jax.templates import PHOTO
from lmbbo_jax.toyworld.captions import GENERIC_TEMPLATES


def test_template_table_on_the_shipped_model():
  templates = list(GENERIC_TEMPLATES[:3]) + ["a drawing of a {}."]
  (r,) = template_table.run("toyclip", ["sketch_dark"], [1, 2], 1, templates=templates)
  assert r["test_images"] == 1000 and len(r["templates"]) == 4
  photo = next(row for row in r["templates"] if row["template"] == PHOTO)
  assert photo["test_acc"] == r["photo_acc"] and photo["diff_vs_photo"] == 0
  drawing = next(row for row in r["templates"] if row["template"] == "a drawing of a {}.")
  assert drawing["diff_vs_photo"] == pytest.approx(drawing["test_acc"] - r["photo_acc"], abs=2e-4)
  assert drawing["test_acc"] != r["photo_acc"]  # The wording changes the reading.
  assert 0 < drawing["diff_se"] < 0.05  # Paired over 1,000 images.
  assert r["best"]["test_acc"] == max(row["test_acc"] for row in r["templates"])
  picked = r["train_picked"]["per_seed"]
  assert [p["seed"] for p in picked] == [1, 2]
  for p in picked:  # Each pick's test accuracy is its row's.
    row = next(x for x in r["templates"] if x["template"] == p["template"])
    assert p["test_acc"] == row["test_acc"]
    assert p["gain_vs_photo"] == pytest.approx(row["test_acc"] - r["photo_acc"], abs=2e-4)
  assert r["photo_acc"] > 0.2  # Far above chance (0.1) even on the hardest style.
  md = template_table.markdown([r])
  assert "sketch_dark" in md and "a drawing of a {}." in md


def test_mean_se():
  assert template_table.mean_se([1.0, 3.0]) == pytest.approx((2.0, 1.0))
  assert np.isnan(template_table.mean_se([1.0])[1])
