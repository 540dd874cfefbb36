"""Policies that travel with checkpoints: attach, load_model applies, save_pretrained round-trips."""

import json
import logging

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, MistralConfig, MistralForCausalLM, PreTrainedTokenizerFast

from headpolicy import (
    PolicyError,
    PolicyMismatchError,
    UnsupportedModelError,
    applied_policy,
    apply,
    describe_model,
    fingerprint,
    load_model,
)
from headpolicy.cli import main
from headpolicy.policies.schema import CHECKPOINT_FILE as POLICY_FILE
from headpolicy.runtime.apply import save_pretrained
from headpolicy.runtime.checkpoint import attach, attached_policy
from tests.conftest import alias_bomb, policy_for, tiny_llama

RETRIEVAL = [[False, True], [True, False]]  # retrieval heads not first: apply permutes both layers


def save_checkpoint(model, directory):
    """A Hugging Face checkpoint directory with a word-level tokenizer (nothing from the network)."""
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3} | {f"w{i}": i for i in range(4, 97)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    model.save_pretrained(directory)
    fast.save_pretrained(directory)
    return directory


@pytest.fixture
def ckpt(tmp_path):
    return save_checkpoint(tiny_llama(seed=3), tmp_path / "tiny-llama")


def ids(length=40):
    return torch.randint(3, 97, (1, length), generator=torch.Generator().manual_seed(7))


def plain(directory):
    return AutoModelForCausalLM.from_pretrained(directory, local_files_only=True).eval()


@torch.no_grad()
def logits(model, x):
    return model(x).logits


def test_attach_then_load_model_applies_and_logs(ckpt, caplog):
    model = plain(ckpt)
    policy = policy_for(model, RETRIEVAL, sink=2, window=6)
    path = attach(ckpt, policy)
    assert path == ckpt / POLICY_FILE and attached_policy(ckpt) == policy

    with caplog.at_level(logging.INFO, logger="headpolicy"):
        applied, tok = load_model(ckpt)
    assert applied_policy(applied) == policy
    assert any(POLICY_FILE in r.getMessage() and "applied" in r.getMessage() for r in caplog.records)

    expected = apply(plain(ckpt), policy)
    assert torch.equal(logits(applied, ids()), logits(expected, ids()))

    bare, _ = load_model(ckpt, apply_policy=False)
    assert applied_policy(bare) is None
    assert torch.equal(logits(bare, ids()), logits(model, ids()))


def test_attach_refuses_a_policy_for_other_weights(ckpt, tmp_path):
    other = tiny_llama(seed=4)
    with pytest.raises(PolicyMismatchError, match="fingerprint"):
        attach(ckpt, policy_for(other, RETRIEVAL))
    assert not (ckpt / POLICY_FILE).exists()
    wrong_shape = tiny_llama(seed=3, layers=3)
    with pytest.raises(PolicyMismatchError, match="3 layers"):
        attach(ckpt, policy_for(wrong_shape, RETRIEVAL + [[True, True]]))
    assert not (ckpt / POLICY_FILE).exists()


def test_saved_applied_model_loads_identically_everywhere(ckpt, tmp_path):
    original = plain(ckpt)
    policy = policy_for(original, RETRIEVAL, sink=2, window=6)
    attach(ckpt, policy)
    model, _ = load_model(ckpt)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = ids()
    applied_logits = logits(model, x)

    out = tmp_path / "saved"
    model.save_pretrained(out)
    # the live model is untouched (weights back in permuted order, still applied)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(logits(model, x), applied_logits)

    assert (out / POLICY_FILE).is_file() and attached_policy(out) == policy
    assert "headpolicy" not in (out / "config.json").read_text()
    reloaded_plain = plain(out)  # plain transformers: the original model
    assert fingerprint(reloaded_plain) == policy.model.fingerprint
    assert torch.equal(logits(reloaded_plain, x), logits(original, x))
    for name, p in original.state_dict().items():
        assert torch.equal(reloaded_plain.state_dict()[name], p), name

    save_checkpoint_tokenizer_only(ckpt, out)
    reloaded, _ = load_model(out)  # headpolicy: the applied model
    assert applied_policy(reloaded) == policy
    assert torch.equal(logits(reloaded, x), applied_logits)


def save_checkpoint_tokenizer_only(src, dst):
    for f in src.iterdir():
        if "token" in f.name and not (dst / f.name).exists():
            (dst / f.name).write_bytes(f.read_bytes())


def test_save_pretrained_function_for_a_model_applied_by_hand(tmp_path):
    model = tiny_llama(seed=5)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    apply(model, policy_for(model, RETRIEVAL))
    save_pretrained(model, tmp_path / "out")
    reloaded = plain(tmp_path / "out")
    assert all(torch.equal(reloaded.state_dict()[k], v) for k, v in original.items())
    assert attached_policy(tmp_path / "out") == applied_policy(model)


def test_a_stale_attached_policy_is_a_named_error(ckpt, tmp_path):
    policy = policy_for(plain(ckpt), RETRIEVAL)
    attach(ckpt, policy)
    save_checkpoint(tiny_llama(seed=9), ckpt)  # new weights, old policy file left behind
    with pytest.raises(PolicyMismatchError, match=f"{POLICY_FILE}.*apply_policy=False"):
        load_model(ckpt)
    model, _ = load_model(ckpt, apply_policy=False)
    assert applied_policy(model) is None


@pytest.mark.timeout(30)
def test_a_poisoned_attached_policy_fails_fast_before_the_weights_load(ckpt, monkeypatch):
    """An alias bomb in head_policy.yaml used to hang every load_model of its checkpoint."""
    (ckpt / POLICY_FILE).write_text(alias_bomb(policy_for(plain(ckpt), RETRIEVAL).to_yaml()))
    loads = []
    monkeypatch.setattr("headpolicy.runtime.checkpoint.load_source", lambda *a, **k: loads.append(a))
    with pytest.raises(PolicyError, match=f"{POLICY_FILE}: line .*MAX_YAML_NODES.*apply_policy=False"):
        load_model(ckpt)
    assert loads == []  # refused before the weights were read
    monkeypatch.undo()
    model, _ = load_model(ckpt, apply_policy=False)
    assert applied_policy(model) is None


def test_cli_import_attach_inspect(ckpt, tmp_path, capsys):
    info = describe_model(plain(ckpt))
    src = tmp_path / "razor.json"
    src.write_text(json.dumps({"0": [1], "1": [0]}))
    out = tmp_path / "policy.yaml"
    assert main(["import", "razor-attention", str(src), "--model", str(ckpt), "-o", str(out)]) == 0
    assert "2/4 retrieval KV heads" in capsys.readouterr().out
    assert main(["attach", str(ckpt), str(out)]) == 0
    policy = attached_policy(ckpt)
    assert policy.model.fingerprint == info.fingerprint and policy.retrieval_table() == RETRIEVAL

    other = tmp_path / "other.yaml"
    policy_for(tiny_llama(seed=11), RETRIEVAL).save(other)
    assert main(["attach", str(ckpt), str(other)]) == 2
    assert "PolicyMismatchError" in capsys.readouterr().err
    assert attached_policy(ckpt) == policy


def test_cli_attach_without_the_fingerprint_check(ckpt, tmp_path, capsys):
    """The mismatch message names the CLI flag, and the flag exists; the attached copy then loads."""
    other = tmp_path / "other.yaml"
    foreign = policy_for(tiny_llama(seed=11), RETRIEVAL)  # same shape, other weights
    foreign.save(other)
    assert main(["attach", str(ckpt), str(other)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("headpolicy attach: PolicyMismatchError: policy fingerprint")
    assert "pass --no-fingerprint-check (check_fingerprint=False in Python)" in err
    assert not (ckpt / POLICY_FILE).exists()

    assert main(["attach", str(ckpt), str(other), "--no-fingerprint-check"]) == 0
    kept = attached_policy(ckpt)
    assert kept.retrieval_table() == foreign.retrieval_table()
    assert kept.model.fingerprint == fingerprint(plain(ckpt))
    assert kept.provenance.settings["compiled_for_fingerprint"] == foreign.model.fingerprint
    model, _ = load_model(ckpt)
    assert applied_policy(model) == kept


def test_model_with_its_own_window_loads_only_without_it(tmp_path):
    cfg = MistralConfig(
        vocab_size=97,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=16,
        sliding_window=64,
        max_position_embeddings=512,
    )
    directory = save_checkpoint(MistralForCausalLM(cfg), tmp_path / "mistral")
    with pytest.raises(UnsupportedModelError, match=r"MistralForCausalLM .*window of 64 tokens.*config_overrides"):
        load_model(directory)
    model, _ = load_model(directory, config_overrides={"sliding_window": None})
    assert model.config.sliding_window is None
    policy = policy_for(model, RETRIEVAL)
    with pytest.raises(UnsupportedModelError):
        attach(directory, policy)
    attach(directory, policy, config_overrides={"sliding_window": None})
    model, _ = load_model(directory, config_overrides={"sliding_window": None})
    assert applied_policy(model) == policy
