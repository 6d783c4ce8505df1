"""Shipped class-name lists and OpenAI templates."""

import json

import pytest

from lmbbo_jax import templates
from lmbbo_jax.data import DATASETS, DatasetError, class_names, hand_templates
from lmbbo_jax.data import classnames as classnames_lib
from lmbbo_jax.data.resources import third_party_path

EXPECTED_COUNTS = {
    "imagenet": 1000, "caltech101": 100, "oxford_pets": 37, "stanford_cars": 196,
    "oxford_flowers": 102, "food101": 101, "fgvc_aircraft": 100, "sun397": 397,
    "dtd": 47, "eurosat": 10, "ucf101": 101,
}


def test_shipped_file_parses_with_coop_counts():
  path = third_party_path("coop_classnames", "classnames.json")
  with open(path, encoding="utf-8") as f:
    data = json.load(f)
  assert {k: len(v) for k, v in data.items()} == EXPECTED_COUNTS
  for name, names in data.items():
    assert all(isinstance(n, str) and n and n == n.strip() for n in names), name
    assert len(set(names)) == len(names), f"{name} has duplicate class names"


@pytest.mark.parametrize("dataset", sorted(EXPECTED_COUNTS))
def test_class_names_match_registry(dataset):
  names = class_names(dataset)
  assert len(names) == EXPECTED_COUNTS[dataset] == DATASETS[dataset].num_classes


def test_coop_specific_renamings():
  caltech = class_names("caltech101")
  assert caltech[:5] == ["face", "leopard", "motorbike", "accordion", "airplane"]
  assert "background" not in caltech and "centered face" not in caltech
  assert "head of a  crocodile" in caltech  # OpenAI's double space is kept verbatim.
  imagenet = class_names("imagenet")
  assert (imagenet[27], imagenet[638], imagenet[744], imagenet[836]) == (
      "eft", "maillot", "projectile", "sunglass")
  assert class_names("oxford_pets")[:2] == ["abyssinian", "american bulldog"]
  assert class_names("eurosat")[0] == "annual crop land"
  assert class_names("sun397")[8] == "apartment building outdoor"
  ucf = class_names("ucf101")
  assert ucf[ucf.index("Hammer Throw") + 1] == "Hammering"
  assert "Hand Stand Pushups" in ucf
  assert not any("_" in n for d in EXPECTED_COUNTS for n in class_names(d))


def test_aliases_resolve_to_same_list():
  assert class_names("oxford_iiit_pet") == class_names("oxford_pets")
  assert class_names("caltech-101") == class_names("Caltech101")
  assert class_names("cars196") == class_names("stanford_cars")
  with pytest.raises(DatasetError, match="no shipped class names"):
    class_names("cifar10")


def test_class_names_returns_a_copy():
  names = class_names("dtd")
  names.append("mutated")
  assert len(class_names("dtd")) == 47


def test_imagenet_wnids():
  wnids = classnames_lib.imagenet_wnids()
  assert len(wnids) == 1000 == len(set(wnids))
  assert list(wnids) == sorted(wnids) and all(w.startswith("n") for w in wnids)


@pytest.mark.parametrize("dataset", sorted(EXPECTED_COUNTS))
def test_hand_templates_are_valid(dataset):
  found = hand_templates(dataset)
  assert found
  for t in found:
    assert templates.invalid_reason(t) is None, t
    assert "{c}" not in t
  filled = templates.fill(found[0], "brace {} 'q'")
  assert "brace {} 'q'" in filled


def test_hand_template_counts():
  counts = {d: len(hand_templates(d)) for d in EXPECTED_COUNTS}
  assert counts == {"imagenet": 80, "caltech101": 34, "oxford_pets": 1, "stanford_cars": 8,
                    "oxford_flowers": 1, "food101": 1, "fgvc_aircraft": 2, "sun397": 2,
                    "dtd": 8, "eurosat": 3, "ucf101": 48}


def test_third_party_folders_have_readmes():
  root = third_party_path()
  for sub in ("coop_classnames", "openai_clip_templates"):
    text = (root / sub / "README.md").read_text(encoding="utf-8")
    assert "MIT" in text or "Apache" in text
  assert (root / "__init__.py").exists()
