"""Causal-LM objectives in the graph (prompted classification, response-only loss) and generation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from _gguf_fixture import tiny_llama_gguf

from fwdfleet.bundle import Bundle
from fwdfleet.cli.main import main
from fwdfleet.device_runtime.data import PromptTemplate, RawData, dataset_for_bundle, load_tokenizer
from fwdfleet.device_runtime.generate import GenerationSettings, generate
from fwdfleet.device_runtime.session import BundleSession
from fwdfleet.errors import DataError, ExportError
from fwdfleet.export.causal_lm import CausalLmExport, export_causal_lm
from fwdfleet.export.hf import LoraSettings
from fwdfleet.export.rebuild import torch_twin_from_bundle

TEMPLATE = "Topic of the news: {text}\nAnswer:"
WORDS = (" the", " a", " to", " of")  # one token each in the fixture's byte-level BPE
TEXTS = ["Oil prices fall as stocks rally on the news", "The team won the final match of the season",
         "A new phone chip is faster", "Leaders met to discuss the treaty " * 6]


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture(scope="module")
def prompted(source: Path, tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    cfg = CausalLmExport(source=source, lora=LoraSettings(rank=4, alpha=8), max_length=40, objective="prompted-cls",
                         template=TEMPLATE, label_words=WORDS, labels=("world", "sports", "business", "tech"))
    return export_causal_lm(cfg, tmp_path_factory.mktemp("out") / "prompted").bundle


def _moved(bundle: Bundle, path: Path) -> Bundle:
    rng = np.random.default_rng(3)
    return bundle.save_as(path, {t.name: (0.2 * rng.standard_normal(t.shape)).astype(np.float32)
                                 for t in bundle.manifest.trainables})


def test_prompted_classification_scores_label_words_at_the_answer(prompted: Bundle, tmp_path: Path) -> None:
    m = prompted.manifest
    assert m.labels == ("world", "sports", "business", "tech")
    assert [o.name for o in m.graph("model").outputs] == ["logits", "loss", "next_token_logits"]
    moved = _moved(prompted, tmp_path / "moved")
    data = dataset_for_bundle(RawData(source="t", texts=tuple(TEXTS), labels=np.array([0, 1, 3, 2])), moved)
    batch = data.take(np.arange(4))
    tok = load_tokenizer(moved)
    tail = tok.encode("\nAnswer:", add_special_tokens=False).ids
    for row in range(4):  # every prompt fits the bundle and ends with the answer cue, long texts cut
        n = int(batch["attention_mask"][row].sum())
        assert n <= 40 and list(batch["input_ids"][row, n - len(tail): n]) == tail
    assert batch["attention_mask"][3].sum() == 40  # the long text was cut to fit exactly
    out = BundleSession(moved).run(moved.load_trainables(), batch, ("logits", "loss", "next_token_logits"))
    ids = m.settings["label_token_ids"]
    np.testing.assert_allclose(out["logits"], out["next_token_logits"][:, ids], rtol=1e-5, atol=1e-5)
    logp = out["logits"] - np.log(np.exp(out["logits"]).sum(axis=1, keepdims=True))
    np.testing.assert_allclose(out["loss"], -logp[np.arange(4), batch["labels"]], rtol=1e-4, atol=1e-5)
    twin = torch_twin_from_bundle(moved)  # the same batch through the rebuilt torch model
    with torch.no_grad():
        ref = twin(**{k: torch.from_numpy(v) for k, v in batch.items()}).numpy()
    np.testing.assert_allclose(out["loss"], ref, rtol=1e-4, atol=1e-4)


def test_response_objective_masks_the_prompt(source: Path, tmp_path: Path) -> None:
    cfg = CausalLmExport(source=source, lora=LoraSettings(rank=2, alpha=4), max_length=16, objective="response")
    bundle = export_causal_lm(cfg, tmp_path / "resp").bundle
    assert [t.name for t in bundle.manifest.graph("model").data_inputs] == ["input_ids", "attention_mask", "loss_mask"]
    s = BundleSession(bundle)
    ids = np.random.default_rng(0).integers(3, 290, size=(2, 12))
    base = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    w = bundle.load_trainables()
    everything = s.run(w, {**base, "loss_mask": np.ones_like(ids)}, ("loss", "logits"))
    response = s.run(w, {**base, "loss_mask": (np.arange(12) >= 8).astype(np.int64)[None].repeat(2, 0)},
                     ("loss", "logits"))
    logits = everything["logits"].astype(np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    token_loss = -np.take_along_axis(logp[:, :-1], ids[:, 1:, None], axis=2)[..., 0]  # targets 1..11
    np.testing.assert_allclose(everything["loss"], token_loss.mean(1), rtol=1e-4)
    np.testing.assert_allclose(response["loss"], token_loss[:, 7:].mean(1), rtol=1e-4)  # targets 8..11 only


def test_bad_prompted_exports_say_what_to_do(source: Path, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="one \\{text\\} slot"):
        CausalLmExport(source=source, objective="prompted-cls", template="no slot", label_words=WORDS)
    with pytest.raises(ExportError, match="belong to --objective prompted-cls"):
        CausalLmExport(source=source, template=TEMPLATE)
    cfg = CausalLmExport(source=source, max_length=24, objective="prompted-cls", template=TEMPLATE,
                         label_words=(" the", " Technology"))
    with pytest.raises(ExportError, match=r"label word ' Technology' is .* tokens"):
        export_causal_lm(cfg, tmp_path / "multi")
    assert not (tmp_path / "multi").exists()
    with pytest.raises(DataError, match="one \\{text\\} slot"):
        PromptTemplate("{text} and {text}")


def test_generate_matches_greedy_decoding_in_torch(prompted: Bundle, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    moved = _moved(prompted, tmp_path / "moved")
    prompt = PromptTemplate(TEMPLATE).render("Oil prices fall")
    text = generate(moved, prompt, GenerationSettings(max_new_tokens=4))
    tok = load_tokenizer(moved)
    ids = tok.encode(prompt).ids
    lm = torch_twin_from_bundle(moved).model.lm
    with torch.no_grad():  # greedy decoding with the same LoRA values in torch, token by token
        for _ in range(4):
            ids.append(int(lm(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    assert text == tok.decode(ids[-4:])
    sampled = {generate(moved, prompt, GenerationSettings(max_new_tokens=3, temperature=1.0, seed=s)) for s in range(4)}
    assert len(sampled) > 1  # sampling draws different continuations with different seeds
    with pytest.raises(DataError, match="sequence length is 40"):
        generate(moved, "word " * 60)
    assert main(["bundle", "generate", str(moved.path), "--text", "Oil prices fall", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip() == (prompt + text).strip()


def test_instruction_data_trains_on_the_response_tokens(source: Path, tmp_path: Path) -> None:
    from fwdfleet.device_runtime.data import read_data

    cfg = CausalLmExport(source=source, lora=LoraSettings(rank=2, alpha=4), max_length=48, objective="response")
    bundle = export_causal_lm(cfg, tmp_path / "resp").bundle
    data_file = tmp_path / "instructions.csv"
    data_file.write_text('prompt,response\n"Q: what rose?\nA:"," stocks rose"\n"Q: who won?\nA:"," the home team"\n')
    raw = read_data(data_file)
    assert raw.responses == (" stocks rose", " the home team") and raw.labels is None
    batch = dataset_for_bundle(raw, bundle).take(np.arange(2))
    tok = load_tokenizer(bundle)
    for row, (prompt, response) in enumerate(zip(raw.texts, raw.responses, strict=True)):
        n = int(batch["attention_mask"][row].sum())
        marked = batch["input_ids"][row][batch["loss_mask"][row] == 1]
        response_ids = tok.encode(prompt + response).ids[len(tok.encode(prompt).ids):]
        assert tok.decode(marked.tolist()) == tok.decode(response_ids)
        assert batch["loss_mask"][row][:n].sum() < n and batch["loss_mask"][row][n:].sum() == 0
    with pytest.raises(DataError, match="holds no prompt/response pairs"):
        dataset_for_bundle(RawData(source="plain", texts=("just text",), labels=None), bundle)
