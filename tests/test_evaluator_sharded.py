"""Sharded over 8 simulated CPU devices == one device (image features and scores).

XLA_FLAGS must be set before JAX initialises, so the comparison runs in a
subprocess with its own environment.
"""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, "tests")
    import jax, numpy as np
    from lmbbo_jax.data.task import FewShotTask, Item
    from lmbbo_jax.evaluator import features as features_lib, sharding
    from lmbbo_jax.evaluator.scorer import PromptScorer
    from evaluator_helpers import CLASS_NAMES, make_clip, plain_features, random_images

    assert len(jax.devices()) == 8, jax.devices()
    clip = make_clip()
    meshes = {"one": sharding.make_mesh(jax.devices()[:1]), "eight": sharding.make_mesh()}

    def image(i):
      return np.random.default_rng(i).integers(0, 256, (40, 36, 3), dtype=np.uint8)
    items = [Item(f"img-{i}", i % len(CLASS_NAMES)) for i in range(13)]
    task = FewShotTask("fake", CLASS_NAMES, items, [], [], shots=1, seed=0,
                       loader=lambda it: image(int(it.ref.split("-")[1])))
    text = plain_features(clip, "a photo of a {}.", CLASS_NAMES)
    images, labels = random_images(len(CLASS_NAMES), 3, clip.embed_dim, seed=5, text=text)
    templates = ["a photo of a {}.", "many {}s.", "{} in the wild.", "a{} thing"]
    out = {}
    for name, mesh in meshes.items():
      feats = features_lib.encode_split(clip, task, "train", mesh=mesh, batch_size=4,
                                        progress=False)
      valid = feats.labels >= 0
      scorer = PromptScorer(clip, {"train": images[::2], "test": images[1::2]},
                            {"train": labels[::2], "test": labels[1::2]}, CLASS_NAMES,
                            mesh=mesh, rows_per_call=8)
      scores = scorer.score(templates)
      ens = scorer.score_ensemble([templates[:2]])
      out[name] = {
          "image_shards": len(feats.features.sharding.device_set),
          "features": np.asarray(feats.features)[valid].tolist(),
          "labels": feats.labels[valid].tolist(),
          "accuracy": [s.accuracy for s in scores + ens],
          "logprob": [s.logprob for s in scores + ens],
          "text": scorer.text_features(templates).tolist(),
      }
    print("RESULT" + json.dumps(out))
""")


@pytest.mark.slow
def test_eight_devices_equal_one_device():
  from lmbbo_jax.tools.multihost_bench import with_devices
  env = with_devices(dict(os.environ, JAX_PLATFORMS="cpu"), 8)
  proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT"))
  out = json.loads(line[len("RESULT"):])
  one, eight = out["one"], out["eight"]
  assert one["image_shards"] == 1 and eight["image_shards"] == 8
  assert one["labels"] == eight["labels"] and len(one["labels"]) == 13
  assert max(abs(a - b) for ra, rb in zip(one["features"], eight["features"])
             for a, b in zip(ra, rb)) <= 1e-6
  assert max(abs(a - b) for ta, tb in zip(one["text"], eight["text"])
             for ra, rb in zip(ta, tb) for a, b in zip(ra, rb)) <= 1e-6
  assert one["accuracy"] == eight["accuracy"]
  for a, b in zip(one["logprob"], eight["logprob"]):
    assert a.keys() == b.keys() and all(abs(a[k] - b[k]) <= 1e-5 for k in a)
