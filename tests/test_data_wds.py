"""`wds:` sources: CLIP_benchmark webdataset shards generated here (a local folder, and the
hub through a loopback stand-in of its HTTP endpoints), corrupt samples, templates."""

from __future__ import annotations

import hashlib
import http.server
import json
import logging
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile
import threading

import numpy as np
import pytest

from lmbbo_jax.data import DatasetError, build_task, hand_templates, registry, wds

from data_helpers import WDS_CLASSES as CLASSES
from data_helpers import make_wds, write_tar

REPO = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wds_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("data") / "wds_cars"
  good = make_wds(root, {"train": 6, "test": 3})
  return root, good


def test_a_wds_folder_builds_the_task(wds_dir, caplog):
  root, good = wds_dir
  wds._INDEX_CACHE.clear()
  with caplog.at_level(logging.WARNING):
    task = build_task(f"wds:{root}", shots=2, seed=1)
  assert task.name == f"wds:{root}" and task.source == "wds"
  assert task.class_names == CLASSES
  # {c} -> {} by replacement; lines that are no valid template (no slot, a format field)
  # and repeats are dropped; surrounding spaces are stripped as CLIP_benchmark does.
  assert task.dataset_templates == ["a photo of a {}.", "itap of my {}!", "a {} with spaces."]
  # Two shots and two val images per class from train, disjoint; every test sample.
  for split, size in (("train", 2), ("val", 2)):
    items = getattr(task, split)
    assert np.bincount([it.label for it in items]).tolist() == [size] * len(CLASSES)
  assert not {it.ref for it in task.train} & {it.ref for it in task.val}
  assert {it.ref for it in task.test} == set(good["test"])
  for split in ("train", "val", "test"):
    for it in getattr(task, split):
      label, pixels = good["test" if split == "test" else "train"][it.ref]
      assert it.label == label
      image = task.load_image(it)
      assert image.shape == (9, 12, 3)
      if pixels is not None:  # PNG and lossless WEBP come back exactly
        assert np.array_equal(image, pixels)
  # The corrupt samples: counted by reason, one warning line. The bad bytes in train
  # count when drawn as a shot (then another is drawn), the bad test image always.
  skipped = dict(task.info["skipped"])
  bad_drawn = skipped.pop("unreadable image") - 1
  assert bad_drawn in (0, 1)
  assert skipped == {"label out of range": 1, "no .cls label": 1, "no image": 1,
                     "unparsable label": 1}
  assert "train/0.tar/bad_bytes" not in {it.ref for it in task.train + task.val}
  warnings = [r.getMessage() for r in caplog.records if "unusable" in r.getMessage()]
  assert len(warnings) == 1 and f"skipped {5 + bad_drawn} unusable sample(s)" in warnings[0]
  # Indexed pools: the bad-bytes samples have a label and an image member.
  assert task.info["pool_sizes"] == {"train": 31, "val": None, "test": 16}


def test_an_unreadable_drawn_shot_is_replaced(tmp_path):
  root = tmp_path / "wds_small"
  make_wds(root, {"train": 2, "test": 1}, corrupt=False)
  shard = root / "train" / "0.tar"
  # Class 0 gets a third candidate with broken bytes; with 3 shots it is always drawn.
  with tarfile.open(shard) as tar:
    members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
  write_tar(shard, members + [("broken.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 40),
                              ("broken.cls", b"0")])
  task = build_task(f"wds:{root}", shots=3, seed=1)
  assert "train/0.tar/broken" not in {it.ref for it in task.train}
  assert [it.label for it in task.train].count(0) == 2
  assert task.info["skipped"] == {"unreadable image": 1}


def test_sampling_is_seeded_and_machine_independent(wds_dir, tmp_path, monkeypatch):
  root, _ = wds_dir
  calls = []
  real = wds._index_shard
  monkeypatch.setattr(wds, "_index_shard", lambda *a: calls.append(a[0]) or real(*a))
  wds._INDEX_CACHE.clear()
  a, b = (build_task(f"wds:{root}", shots=2, seed=1) for _ in range(2))
  assert len(calls) == 3  # one task per seed reads each shard once: 2 train + 1 test
  other_seeds = [build_task(f"wds:{root}", shots=2, seed=s) for s in (2, 3)]
  refs = lambda t: [it.ref for it in t.train + t.val]
  assert refs(a) == refs(b)
  assert any(refs(t) != refs(a) for t in other_seeds)
  # A copy elsewhere (same folder name) draws the same images.
  copy = tmp_path / "elsewhere" / root.name
  shutil.copytree(root, copy)
  assert refs(build_task(f"wds:{copy}", shots=2, seed=1)) == refs(a)
  capped = build_task(f"wds:{root}", shots=1, seed=1, max_test_per_class=1)
  assert np.bincount([it.label for it in capped.test]).tolist() == [1] * len(CLASSES)


def test_a_val_split_and_a_truncated_shard(tmp_path, caplog):
  root = tmp_path / "wds_val"
  good = make_wds(root, {"train": 2, "val": 2, "test": 2}, corrupt=False, templates=False)
  task = build_task(f"wds:{root}", shots=1, seed=1)
  assert {it.ref for it in task.val} <= set(good["val"])
  assert task.dataset_templates == []
  # Cut the test shard inside its last image: that sample is skipped, the others are kept.
  shard = root / "test" / "0.tar"
  with tarfile.open(shard) as tar:
    last_image = [m for m in tar.getmembers() if not m.name.endswith(".cls")][-1]
  with open(shard, "r+b") as f:
    f.truncate(last_image.offset_data + 3)
  with caplog.at_level(logging.WARNING):
    cut = build_task(f"wds:{root}", shots=1, seed=1)
  assert len(cut.test) == len(task.test) - 1
  assert cut.info["skipped"] == {"truncated member": 1}


@pytest.mark.parametrize("damage,message", [
    ("no_test", "has no test split"),
    ("missing_shard", "lacks 1 of its 2 shards"),
    ("bad_nshards", "not a shard count"),
    ("retrieval", "'retrieval' dataset"),
    ("no_classnames", "classnames.txt"),
    ("not_a_tar", "is not a tar archive"),
])
def test_broken_folders_are_one_line_errors(tmp_path, damage, message):
  root = tmp_path / "wds_broken"
  make_wds(root, {"train": 1, "test": 1}, corrupt=False)
  if damage == "no_test":
    shutil.rmtree(root / "test")
  elif damage == "missing_shard":
    (root / "train" / "1.tar").unlink()
  elif damage == "bad_nshards":
    (root / "train" / "nshards.txt").write_text("two")
  elif damage == "retrieval":
    (root / "dataset_type.txt").write_text("retrieval")
  elif damage == "no_classnames":
    (root / "classnames.txt").unlink()
  elif damage == "not_a_tar":
    (root / "test" / "0.tar").write_bytes(b"\x1f\x8b" + b"gzip?" * 200)
  with pytest.raises(DatasetError, match=message) as err:
    build_task(f"wds:{root}", shots=1, seed=1)
  assert "\n" not in str(err.value)
  with pytest.raises(DatasetError, match="not a directory"):
    build_task(f"wds:{tmp_path / 'nope'}", shots=1, seed=1)
  with pytest.raises(DatasetError, match="not a hub dataset id"):
    build_task("wds:hf:just-a-name", shots=1, seed=1)


def test_registry_knows_wds_repos_and_lead_metrics():
  assert registry.for_dataset("wds:hf:clip-benchmark/wds_cars").name == "stanford_cars"
  assert registry.for_dataset("wds:/data/wds_fgvc_aircraft/").name == "fgvc_aircraft"
  assert registry.for_dataset("wds:/data/wds_vtab-pets").name == "oxford_pets"
  assert registry.for_dataset("wds:/data/sun397").name == "sun397"
  assert registry.for_dataset("coop:/data/DATA/caltech-101").name == "caltech101"
  assert registry.for_dataset("tfds:oxford_iiit_pet").name == "oxford_pets"
  assert registry.for_dataset("folder:/x") is None and registry.for_dataset("toy:x") is None
  assert registry.lead_metric("wds:hf:clip-benchmark/wds_fgvc_aircraft") == "mean_per_class_recall"
  assert registry.lead_metric("flowers") == "mean_per_class_recall"
  assert registry.lead_metric("stanford_cars") == "accuracy"
  assert registry.lead_metric("toy:blurry_noisy") == "accuracy"
  # CLIP's hand-engineered templates follow the benchmark a source reads.
  assert hand_templates("wds:hf:clip-benchmark/wds_cars") == hand_templates("stanford_cars")
  assert hand_templates("coop:/data/DATA/fgvc_aircraft") == hand_templates("fgvc_aircraft")
  repos = {i.wds_repo for i in registry.DATASETS.values() if i.wds_repo}
  assert all(r.startswith("clip-benchmark/wds_") for r in repos) and len(repos) == 9


# -- the hub ------------------------------------------------------------------------------
class FakeHub(http.server.ThreadingHTTPServer):
  """The hub endpoints `snapshot_download` uses for one dataset repo, on 127.0.0.1."""

  SHA = "0123456789abcdef0123456789abcdef01234567"

  def __init__(self, repo_id: str, files: dict[str, bytes]):
    self.repo_id, self.files, self.requests = repo_id, files, []
    super().__init__(("127.0.0.1", 0), _HubHandler)
    self.thread = threading.Thread(target=self.serve_forever, daemon=True)

  @property
  def url(self) -> str:
    return f"http://127.0.0.1:{self.server_address[1]}"

  def __enter__(self):
    self.thread.start()
    return self

  def __exit__(self, *exc):
    self.shutdown()
    self.server_close()
    self.thread.join(5)


class _HubHandler(http.server.BaseHTTPRequestHandler):
  server: FakeHub

  def log_message(self, *args):  # quiet
    pass

  def _send(self, status: int, body: bytes = b"", headers: dict | None = None) -> None:
    self.send_response(status)
    for k, v in (headers or {}).items():
      self.send_header(k, v)
    self.send_header("Content-Length", str(len(body)))
    self.end_headers()
    if self.command != "HEAD":
      self.wfile.write(body)

  def _route(self) -> None:
    hub = self.server
    path = self.path.split("?", 1)[0]
    hub.requests.append((self.command, path))
    api = f"/api/datasets/{hub.repo_id}"
    if path == f"{api}/revision/main":
      body = {"id": hub.repo_id, "sha": hub.SHA,
              "siblings": [{"rfilename": name} for name in hub.files]}
      return self._send(200, json.dumps(body).encode(), {"Content-Type": "application/json"})
    if path == f"{api}/tree/{hub.SHA}":
      body = [{"type": "file", "path": n, "size": len(d),
               "oid": hashlib.sha1(d).hexdigest()} for n, d in hub.files.items()]
      return self._send(200, json.dumps(body).encode(), {"Content-Type": "application/json"})
    prefix = f"/datasets/{hub.repo_id}/resolve/"
    if path.startswith(prefix):
      revision, _, name = path[len(prefix):].partition("/")
      data = hub.files.get(name)
      if data is not None and revision in ("main", hub.SHA):
        return self._send(200, data, {"X-Repo-Commit": hub.SHA,
                                      "ETag": f'"{hashlib.sha1(data).hexdigest()}"'})
      return self._send(404, b"", {"X-Error-Code": "EntryNotFound"})
    return self._send(404, b"", {"X-Error-Code": "RepoNotFound"})

  do_GET = do_HEAD = _route


def _build_in_child(env: dict, spec: str) -> subprocess.CompletedProcess:
  """build_task in a fresh process: huggingface_hub reads HF_* when imported."""
  code = ("import json, sys\nfrom lmbbo_jax.data import DatasetError, build_task\n"
          "try:\n  t = build_task(sys.argv[1], shots=1, seed=1)\nexcept DatasetError as e:\n"
          "  print('error: ' + str(e)); sys.exit(1)\n"
          "print(json.dumps({'classes': t.class_names, 'templates': t.dataset_templates,"
          " 'train': [i.ref for i in t.train], 'test': len(t.test),"
          " 'pixels': int(t.load_image(t.test[0]).sum())}))\n")
  return subprocess.run([sys.executable, "-c", code, spec], env=env, capture_output=True,
                        text=True, timeout=120, cwd=REPO)


def test_the_hub_path_downloads_the_needed_files_once_then_works_offline(tmp_path):
  local = tmp_path / "wds_cars"
  make_wds(local, {"train": 2, "test": 1}, corrupt=False)
  files = {str(p.relative_to(local)).replace(os.sep, "/"): p.read_bytes()
           for p in local.rglob("*") if p.is_file()}
  files["README.md"] = b"# card"
  files["extra/unused.bin"] = b"\0" * 1000  # not a split: never fetched
  env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_DISABLE_PROGRESS_BARS": "1",
         "HF_HUB_DISABLE_TELEMETRY": "1", "PYTHONPATH": str(REPO)}
  env.pop("HF_HUB_OFFLINE", None)
  env.pop("HF_TOKEN", None)
  spec = "wds:hf:clip-benchmark/wds_cars"
  with FakeHub("clip-benchmark/wds_cars", files) as hub:
    env["HF_ENDPOINT"] = hub.url
    first = _build_in_child(env, spec)
    assert first.returncode == 0, first.stdout + first.stderr
    fetched = {p.rsplit("/resolve/", 1)[1].split("/", 1)[1] for m, p in hub.requests
               if "/resolve/" in p and m == "GET"}
    assert fetched == set(files) - {"README.md", "extra/unused.bin"}
  online = json.loads(first.stdout.splitlines()[-1])
  assert online["classes"] == CLASSES and online["test"] == len(CLASSES)
  assert online["templates"][0] == "a photo of a {}."
  # The same repo from the local copy draws the same shots (same base name).
  local_task = build_task(f"wds:{local}", shots=1, seed=1)
  assert online["train"] == [it.ref for it in local_task.train]
  # The hub is gone: the cached copy serves, unreachable or with HF_HUB_OFFLINE=1.
  for extra in ({}, {"HF_HUB_OFFLINE": "1"}):
    again = _build_in_child({**env, **extra}, spec)
    assert again.returncode == 0, again.stdout + again.stderr
    assert json.loads(again.stdout.splitlines()[-1]) == online
  # A repo never downloaded: one line saying how to get it.
  missing = _build_in_child({**env, "HF_HUB_OFFLINE": "1"}, "wds:hf:clip-benchmark/wds_nope")
  assert missing.returncode == 1
  assert missing.stdout.startswith("error: hub dataset 'clip-benchmark/wds_nope' is not in")
