"""Model sources, adapters and fingerprints (tiny models; the real one is in tests/slow)."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from headpolicy import ModelSourceError, UnsupportedModelError, describe_model, fingerprint, load_model
from headpolicy.models import get_adapter, resolve_source
from tests.conftest import tiny_llama


def test_fingerprint_is_stable_and_specific():
    a, a_again, b = tiny_llama(seed=0), tiny_llama(seed=0), tiny_llama(seed=1)
    assert fingerprint(a) == fingerprint(a_again)
    assert fingerprint(a) != fingerprint(b)
    assert fingerprint(a) != fingerprint(tiny_llama(seed=0, layers=3))
    # the same checkpoint loaded in bfloat16 is the same model
    assert fingerprint(a) == fingerprint(tiny_llama(seed=0, dtype=torch.bfloat16))


def test_describe_model():
    info = describe_model(tiny_llama(layers=3, heads=6, kv_heads=2, head_dim=16))
    assert (info.num_layers, info.num_attention_heads, info.num_kv_heads, info.head_dim) == (3, 6, 2, 16)
    assert info.architecture == "LlamaForCausalLM" and info.fingerprint.startswith("sha256:")


def test_unsupported_architecture_is_named():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50))
    with pytest.raises(UnsupportedModelError, match=r"GPT2LMHeadModel \(model_type 'gpt2'\).*supported.*llama"):
        get_adapter(gpt2)


def test_bad_sources(tmp_path):
    with pytest.raises(ModelSourceError, match="not a known alias"):
        resolve_source("no-such-model")
    with pytest.raises(ModelSourceError, match="no config.json"):
        resolve_source(tmp_path)
    with pytest.raises(ModelSourceError, match="not a known alias"):
        load_model(tmp_path / "missing.gguf")


def write_gguf(path):
    """A small but well-formed .gguf (llama metadata, a vocabulary, one tensor)."""
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(2)
    w.add_context_length(64)
    w.add_embedding_length(16)
    w.add_head_count(2)
    w.add_tokenizer_model("llama")
    w.add_token_list([f"t{i}".encode() for i in range(8)])
    w.add_tensor("token_embd.weight", np.zeros((8, 16), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("keep", [3, 12, 100, 0.5])
def test_a_truncated_gguf_is_a_model_source_error(tmp_path, keep):
    """gguf's reader raises struct.error, ValueError... on a cut file: all become one named error."""
    data = write_gguf(tmp_path / "full.gguf").read_bytes()
    cut = tmp_path / "t.gguf"
    cut.write_bytes(data[: int(keep * len(data)) if isinstance(keep, float) else keep])
    with pytest.raises(ModelSourceError, match=f"cannot load {cut}: "):
        load_model(cut)


def test_checkpoint_directory_round_trip(tmp_path):
    """A Hugging Face checkpoint directory loads offline (tokenizer from a tiny word-level vocab)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model = tiny_llama(seed=7)
    model.save_pretrained(tmp_path)
    vocab = {f"w{i}": i for i in range(97)} | {"[UNK]": 0}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", eos_token="w2").save_pretrained(tmp_path)
    loaded, tok = load_model(tmp_path)
    assert fingerprint(loaded) == fingerprint(model)
    assert describe_model(loaded).name == tmp_path.name
    assert tok.padding_side == "left" and tok.pad_token is not None
