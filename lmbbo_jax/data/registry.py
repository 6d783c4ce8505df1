"""The paper's 11 benchmarks: names, aliases, class counts, TFDS, CoOp and wds locations,
and the metric the CLIP paper reports for each."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """Where one benchmark lives in each source.

  Attributes:
    name: canonical key (also the key of the shipped class-name and template lists).
    num_classes: number of classes under the CoOp protocol.
    coop_dir: folder name inside CoOp's `DATA/` root.
    coop_split_file: the paper's (CoOp's) split file, or None when CoOp reads the
      dataset's own split files (FGVC-Aircraft) or folders (ImageNet).
    coop_image_dir: image folder relative to `coop_dir` that split paths are relative to.
    tfds_name: TFDS dataset (with config) or None when TFDS cannot serve it.
    tfds_train: TFDS split used as CoOp's train pool.
    tfds_val: TFDS split used as the val pool, or None (val shots are then drawn from the
      train pool, disjoint from the train shots).
    tfds_test: TFDS split used as test, or None (then the train split is divided per class
      50/20/30 like CoOp's own splits, with a seed-independent key).
    tfds_note: how the TFDS splits differ from CoOp's.
    aliases: other accepted spellings (TFDS names, CoOp folder and class names).
    lead_metric: the metric the CLIP paper reports for the benchmark (its Table 9 note:
      mean per-class recall for FGVC-Aircraft, Oxford Pets, Caltech101 and Flowers102,
      accuracy for the others); a `Score` metric name (`evaluator.types.METRICS`).
    wds_repo: CLIP_benchmark's webdataset copy on the hub (`--dataset=wds:hf:<repo>`),
      or None when it publishes none.
    wds_note: how the wds copy differs from CoOp's splits and class names.
  """
  name: str
  num_classes: int
  coop_dir: str
  coop_split_file: str | None
  coop_image_dir: str
  tfds_name: str | None
  tfds_train: str = "train"
  tfds_val: str | None = None
  tfds_test: str | None = "test"
  tfds_note: str = ""
  aliases: tuple[str, ...] = ()
  lead_metric: str = "accuracy"
  wds_repo: str | None = None
  wds_note: str = ""


_PER_CLASS = "mean_per_class_recall"
_VTAB_NOTE = ("VTAB's splits (1000-image train) and CLIP_benchmark's class names, not "
              "CoOp's; test = VTAB's test")
_INFOS = (
    DatasetInfo(
        "imagenet", 1000, "imagenet", None, "images", "imagenet2012",
        tfds_test="validation",
        tfds_note=("manual download (ILSVRC2012_img_{train,val}.tar in the manual dir); "
                   "test = ImageNet val as in CoOp; val shots come from train"),
        aliases=("imagenet2012", "imagenet1k", "ImageNet"),
        wds_repo="clip-benchmark/wds_imagenet1k",
        wds_note="test = ImageNet val (as CoOp); OpenAI's class names; val shots from train"),
    DatasetInfo(
        "caltech101", 100, "caltech-101", "split_zhou_Caltech101.json",
        "101_ObjectCategories", "caltech101",
        tfds_note=("TFDS split is 30 images/class train + rest test (CoOp: 50/20/30 "
                   "split_zhou); BACKGROUND_Google and Faces_easy are dropped as in CoOp; "
                   "val shots come from train"),
        aliases=("caltech-101", "Caltech101"), lead_metric=_PER_CLASS,
        wds_repo="clip-benchmark/wds_vtab-caltech101", wds_note=_VTAB_NOTE),
    DatasetInfo(
        "oxford_pets", 37, "oxford_pets", "split_zhou_OxfordPets.json", "images",
        "oxford_iiit_pet",
        tfds_note=("test = official test (same images as CoOp); CoOp's val is a random "
                   "20% of trainval, here val shots come from train"),
        aliases=("oxford_iiit_pet", "pets", "OxfordPets"), lead_metric=_PER_CLASS,
        wds_repo="clip-benchmark/wds_vtab-pets", wds_note=_VTAB_NOTE),
    DatasetInfo(
        "stanford_cars", 196, "stanford_cars", "split_zhou_StanfordCars.json", "",
        "cars196",
        tfds_note=("test = official test (same images as CoOp); val shots come from "
                   "train; the TFDS download URL is dead (prepare it manually)"),
        aliases=("cars196", "cars", "StanfordCars"),
        wds_repo="clip-benchmark/wds_cars",
        wds_note="official train/test (same test images as CoOp); val shots from train"),
    DatasetInfo(
        "oxford_flowers", 102, "oxford_flowers", "split_zhou_OxfordFlowers.json", "jpg",
        "oxford_flowers102", tfds_val="validation",
        tfds_note=("official 10/class train + 10/class val + rest test (CoOp: its own "
                   "50/20/30 split)"),
        aliases=("oxford_flowers102", "flowers", "flowers102", "OxfordFlowers"),
        lead_metric=_PER_CLASS, wds_repo="clip-benchmark/wds_vtab-flowers",
        wds_note=_VTAB_NOTE),
    DatasetInfo(
        "food101", 101, "food-101", "split_zhou_Food101.json", "images", "food101",
        tfds_test="validation",
        tfds_note=("official 750/class train + 250/class test (TFDS 'validation'); CoOp "
                   "re-splits all images 50/20/30; val shots come from train"),
        aliases=("food-101", "food", "Food101")),
    DatasetInfo(
        "fgvc_aircraft", 100, "fgvc_aircraft", None, "images", None,
        tfds_note="TFDS has only a downsampled Visual Decathlon version",
        aliases=("aircraft", "fgvc-aircraft", "FGVCAircraft"), lead_metric=_PER_CLASS,
        wds_repo="clip-benchmark/wds_fgvc_aircraft",
        wds_note="official test (as CoOp); val shots from train unless the repo has val/"),
    DatasetInfo(
        "sun397", 397, "sun397", "split_zhou_SUN397.json", "SUN397", "sun397/tfds",
        tfds_val="validation",
        tfds_note=("TFDS 'tfds' config random train/validation/test (CoOp: Training_01/"
                   "Testing_01 with 20% of train as val); the source URL is dead"),
        aliases=("SUN397",),
        wds_repo="clip-benchmark/wds_sun397",
        wds_note="CLIP_benchmark's own train/test split of SUN397 (CoOp: Training_01/Testing_01)"),
    DatasetInfo(
        "dtd", 47, "dtd", "split_zhou_DescribableTextures.json", "images", "dtd",
        tfds_val="validation",
        tfds_note="official split1 train/val/test (CoOp: its own 50/20/30 split)",
        aliases=("describable_textures", "DescribableTextures"),
        wds_repo="clip-benchmark/wds_vtab-dtd", wds_note=_VTAB_NOTE),
    DatasetInfo(
        "eurosat", 10, "eurosat", "split_zhou_EuroSAT.json", "2750", "eurosat/rgb",
        tfds_test=None,
        tfds_note=("TFDS has one 27k 'train' split; it is divided per class 50/20/30 "
                   "(CoOp's ratios, not CoOp's images)"),
        aliases=("eurosat/rgb", "EuroSAT"),
        wds_repo="clip-benchmark/wds_vtab-eurosat", wds_note=_VTAB_NOTE),
    DatasetInfo(
        "ucf101", 101, "ucf101", "split_zhou_UCF101.json", "UCF-101-midframes", None,
        tfds_note="TFDS has videos only; CoOp uses its middle-frame images",
        aliases=("UCF101",)),
)

DATASETS: dict[str, DatasetInfo] = {info.name: info for info in _INFOS}

_BY_ALIAS: dict[str, DatasetInfo] = {}
for _info in _INFOS:
  for _key in (_info.name, _info.coop_dir, *_info.aliases):
    _BY_ALIAS[_key.lower()] = _info
  if _info.tfds_name:
    _BY_ALIAS[_info.tfds_name.lower()] = _info


def lookup(name: str) -> DatasetInfo | None:
  """The benchmark called `name` (canonical, TFDS or CoOp spelling), or None."""
  return _BY_ALIAS.get(name.strip().lower())


_BY_WDS_NAME: dict[str, DatasetInfo] = {
    info.wds_repo.rsplit("/", 1)[-1].lower(): info for info in _INFOS if info.wds_repo}


def for_dataset(dataset: str) -> DatasetInfo | None:
  """The benchmark a `--dataset` value reads, or None (a plain folder, the toy world).

  Knows the benchmark names and aliases, `tfds:NAME`, `coop:NAME` and `coop:PATH`
  (its last folder), and `wds:hf:OWNER/wds_<name>` or `wds:PATH` (a folder named like
  CLIP_benchmark's repos, e.g. `wds_cars`, or like a benchmark).
  """
  spec = dataset.strip()
  kind, sep, rest = spec.partition(":")
  if not sep:
    return lookup(spec)
  if kind == "wds":
    base = rest.removeprefix("hf:").rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1]
    return _BY_WDS_NAME.get(base.lower()) or lookup(base.lower().removeprefix("wds_"))
  if kind in ("tfds", "coop"):
    return lookup(rest.rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1])
  return None


def lead_metric(dataset: str) -> str:
  """The metric a report leads with for `dataset` (`DatasetInfo.lead_metric`; accuracy
  for datasets outside the registry)."""
  info = for_dataset(dataset)
  return info.lead_metric if info is not None else "accuracy"
