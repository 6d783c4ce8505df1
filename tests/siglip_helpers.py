"""Tiny SigLIP checkpoints for tests: transformers' `SiglipModel` with random weights and a
tokenizer trained here (SentencePiece for SigLIP, a Gemma-style tokenizer.json for SigLIP 2
FixRes), saved with save_pretrained as a hub repo holds them."""

from __future__ import annotations

import json
import os

import numpy as np
import torch

import models_helpers as helpers

TEXT_LENGTH = 32
CORPUS = [
    "a photo of a dog", "a photo of a cat", "a blurry photo of the golden retriever",
    "an image of a sea lion in the wild", "itap of my airplane", "a drawing of a t-shirt",
    "a close-up photo of a zebra", "the origami of a small bird", "a bright photo of a car",
    "many dogs and cats on a sunny day", "a painting of the large red house",
] * 8


def train_sentencepiece(directory: str, vocab_size: int = 96) -> str:
  """A unigram SentencePiece model with SigLIP's special ids (pad 0, eos 1, unk 2, no bos)."""
  import sentencepiece as spm
  prefix = os.path.join(directory, "spm")
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(CORPUS), model_prefix=prefix, vocab_size=vocab_size,
      model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0,
      hard_vocab_limit=False, minloglevel=2)
  return prefix + ".model"


def gemma_style_tokenizer(directory: str):
  """A Gemma-layout tokenizer (pad 0, eos 1, bos 2, unk 3; BPE over '▁'-joined text,
  byte fallback), trained with `tokenizers` and wrapped as transformers' GemmaTokenizer."""
  from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
  from transformers import GemmaTokenizer
  specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
  backend = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True, byte_fallback=True))
  backend.normalizer = normalizers.Replace(" ", "▁")
  backend.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
  backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                       decoders.Fuse()])
  trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=specials, show_progress=False)
  backend.train_from_iterator([t.replace(" ", "▁") for t in CORPUS], trainer)
  path = os.path.join(directory, "raw_tokenizer.json")
  backend.save(path)
  vocab = backend.get_vocab()
  merges = json.load(open(path, encoding="utf-8"))["model"]["merges"]
  return GemmaTokenizer(vocab=vocab, merges=[tuple(m) if isinstance(m, list) else
                                             tuple(m.split(" ")) for m in merges],
                        add_bos_token=False, add_eos_token=True)


def hf_siglip(vocab_size: int, seed: int = 0):
  """A tiny transformers SiglipModel, every parameter random (LayerNorms near 1/0)."""
  from transformers import SiglipConfig, SiglipModel
  torch.manual_seed(seed)
  config = SiglipConfig(
      text_config=dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=4,
                       max_position_embeddings=TEXT_LENGTH),
      vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, image_size=32, patch_size=8))
  model = helpers.randomize_(SiglipModel(config), seed)
  with torch.no_grad():  # A logit scale and bias of SigLIP's size, not the helper's CLIP one.
    model.logit_scale.fill_(float(np.log(10.0)))
    model.logit_bias.fill_(-3.0)
  return model


def save_siglip(directory: str, *, gemma: bool = False, seed: int = 0):
  """(model, tokenizer) saved to `directory` as a SigLIP (or SigLIP 2 FixRes) hub repo."""
  from transformers import SiglipTokenizer
  os.makedirs(directory, exist_ok=True)
  if gemma:
    tok = gemma_style_tokenizer(directory)
  else:
    tok = SiglipTokenizer(vocab_file=train_sentencepiece(directory),
                          model_max_length=TEXT_LENGTH)
  model = hf_siglip(len(tok), seed)
  model.save_pretrained(directory)
  tok.save_pretrained(directory)
  return model, tok


def hf_ids(tok, texts) -> np.ndarray:
  """The ids transformers feeds SiglipModel: padded right to the text length, no mask."""
  tok.padding_side = "right"
  return np.asarray(tok(list(texts), padding="max_length", max_length=TEXT_LENGTH)["input_ids"])


@torch.no_grad()
def hf_outputs(model, ids: np.ndarray, pixels: np.ndarray):
  """(text features, image features, logits_per_image) of a transformers SiglipModel."""
  t_ids = torch.from_numpy(np.asarray(ids, np.int64))
  t_px = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()
  logits = model(input_ids=t_ids, pixel_values=t_px).logits_per_image  # (its embeds: unit)
  text = model.get_text_features(input_ids=t_ids).pooler_output
  image = model.get_image_features(pixel_values=t_px).pooler_output
  return text.numpy(), image.numpy(), logits.numpy()
