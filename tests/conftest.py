"""Tiny random-config models of every supported family, built in code (nothing downloaded)."""

from __future__ import annotations

import pytest
import torch
import transformers as T

T.logging.set_verbosity_error()

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
    else:
        raise ValueError(family)
    return m.eval()


DECODERS = ["llama", "qwen3", "mistral", "qwen2", "gpt2", "opt"]
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
def llama():
    torch.manual_seed(0)
    cfg = T.LlamaConfig(num_hidden_layers=TOKENS_L, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                        intermediate_size=128, vocab_size=128, max_position_embeddings=256, tie_word_embeddings=True)
    return T.LlamaForCausalLM(cfg).eval()
