"""Checkpoint loading and writing: sharded safetensors, name/shape checks, corrupt
files, the pickle opt-in, config and generation config files, tokenizers, and a
`save_pretrained` round trip through transformers."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file
from support.hf_models import TINY, hf_logits, left_padded_batch, make_hf_model, save_hf_model

import jaxdecode as jd

IDS, MASK = left_padded_batch(np.random.default_rng(0), TINY["vocab_size"], 7, [0, 3])
ALL_FLAGS = dict(
    n_layer=3,
    n_head=2,
    n_inner=24,
    layer_norm_epsilon=1e-3,
    activation_function="quick_gelu",
    scale_attn_weights=False,
    scale_attn_by_inverse_layer_idx=True,
    reorder_and_upcast_attn=True,
)


@pytest.fixture(scope="module")
def hf_model():
    return make_hf_model(seed=11)


@pytest.fixture(scope="module")
def base_dir(hf_model, tmp_path_factory):
    """A single-file checkpoint (config.json, generation_config.json, model.safetensors)."""
    return save_hf_model(hf_model, tmp_path_factory.mktemp("base"))


@pytest.fixture(scope="module")
def base_logits(base_dir):
    return np.asarray(jd.from_pretrained(base_dir).logits(IDS, MASK))


@pytest.fixture
def ckpt(base_dir, tmp_path):
    """A fresh copy of the base checkpoint to edit."""
    out = tmp_path / "ckpt"
    shutil.copytree(base_dir, out)
    return out


def _edit_tensors(directory, edit) -> None:
    path = os.path.join(directory, "model.safetensors")
    tensors = dict(load_file(path))
    edit(tensors)
    save_file(tensors, path, {"format": "pt"})


def _real(x):
    return np.asarray(x)[MASK == 1]


# --------------------------------------------------------------------------- #
def test_single_file_checkpoint_matches_transformers(hf_model, base_dir, base_logits):
    lm = jd.from_pretrained(base_dir)
    assert isinstance(lm, jd.CausalLM)
    assert lm.config == jd.GPT2Config.from_hf(hf_model.config.to_dict())
    np.testing.assert_allclose(_real(base_logits), _real(hf_logits(hf_model, IDS, MASK)), atol=1e-4)
    # os.PathLike works too.
    lm2 = jd.from_pretrained(Path(base_dir))
    np.testing.assert_array_equal(np.asarray(lm2.logits(IDS, MASK)), base_logits)


def test_sharded_checkpoint_loads_with_identical_logits(hf_model, base_logits, tmp_path):
    hf_model.save_pretrained(tmp_path, max_shard_size="20KB")
    files = os.listdir(tmp_path)
    assert "model.safetensors.index.json" in files and "model.safetensors" not in files
    assert sum(f.endswith(".safetensors") for f in files) > 2
    lm = jd.from_pretrained(tmp_path)
    np.testing.assert_array_equal(np.asarray(lm.logits(IDS, MASK)), base_logits)


def test_sharded_index_written_by_hand(base_dir, base_logits, tmp_path):
    tensors = load_file(os.path.join(base_dir, "model.safetensors"))
    names = sorted(tensors)
    shards = {"part-a.safetensors": names[::2], "part-b.safetensors": names[1::2]}
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, tmp_path / shard, {"format": "pt"})
    weight_map = {k: shard for shard, keys in shards.items() for k in keys}
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    shutil.copy(os.path.join(base_dir, "config.json"), tmp_path)
    lm = jd.from_pretrained(tmp_path)
    np.testing.assert_array_equal(np.asarray(lm.logits(IDS, MASK)), base_logits)

    # A shard listed in the index but missing on disk.
    os.remove(tmp_path / "part-b.safetensors")
    with pytest.raises(ValueError, match="part-b.safetensors"):
        jd.from_pretrained(tmp_path)
    # A tensor listed in the index but absent from its shard.
    save_file(
        {k: tensors[k] for k in shards["part-b.safetensors"][1:]},
        tmp_path / "part-b.safetensors",
        {"format": "pt"},
    )
    with pytest.raises(ValueError, match=re.escape(shards["part-b.safetensors"][0])):
        jd.from_pretrained(tmp_path)
    # An index that is not JSON.
    (tmp_path / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(ValueError, match="model.safetensors.index.json"):
        jd.from_pretrained(tmp_path)


@pytest.mark.parametrize("storage", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_half_precision_checkpoint(tmp_path, storage):
    """Checkpoints stored in float16 / bfloat16 load (upcast to the requested dtype)."""
    hf = make_hf_model(seed=12).to(storage)
    save_hf_model(hf, tmp_path)
    hf = hf.float()  # the same rounded weights, computed in float32
    lm = jd.from_pretrained(tmp_path)
    assert {x.dtype for x in jax.tree_util.tree_leaves(lm.params)} == {jnp.dtype(jnp.float32)}
    np.testing.assert_allclose(
        _real(lm.logits(IDS, MASK)), _real(hf_logits(hf, IDS, MASK)), rtol=0, atol=1e-4
    )


# --------------------------------------------------------------------------- #
@pytest.mark.parametrize(
    "name",
    ["transformer.h.1.mlp.c_fc.bias", "transformer.wpe.weight", "transformer.ln_f.weight"],
)
def test_missing_tensor_is_named(ckpt, name):
    _edit_tensors(ckpt, lambda t: t.pop(name))
    with pytest.raises(ValueError, match=re.escape(name.removeprefix("transformer."))):
        jd.from_pretrained(ckpt)


@pytest.mark.parametrize(
    "name",
    ["transformer.h.2.ln_1.weight", "transformer.h.0.attn.q_attn.weight", "encoder.weight"],
)
def test_unexpected_tensor_is_named(ckpt, name):
    _edit_tensors(ckpt, lambda t: t.__setitem__(name, np.ones((32,), np.float32)))
    with pytest.raises(ValueError, match=re.escape(name)):
        jd.from_pretrained(ckpt)


@pytest.mark.parametrize(
    ("name", "shape"),
    [
        ("transformer.h.0.attn.c_attn.weight", (96, 32)),  # transposed
        ("transformer.wte.weight", (95, 32)),  # vocab off by one
        ("transformer.h.1.mlp.c_proj.bias", (33,)),
        ("lm_head.weight", (96, 16)),  # the tied head must agree with wte
    ],
)
def test_wrong_shape_is_named(ckpt, name, shape):
    _edit_tensors(ckpt, lambda t: t.__setitem__(name, np.zeros(shape, np.float32)))
    with pytest.raises(ValueError, match=re.escape(name) + r".*" + str(shape[0])):
        jd.from_pretrained(ckpt)


def test_legacy_buffers_and_tied_head_are_accepted(ckpt, base_logits, hf_model):
    """Older GPT-2 checkpoints carry causal-mask buffers and an explicit lm_head."""

    def edit(t):
        t["transformer.h.0.attn.bias"] = np.tril(np.ones((1, 1, 32, 32), np.float32))
        t["transformer.h.1.attn.masked_bias"] = np.array(-1e4, np.float32)
        t["lm_head.weight"] = t["transformer.wte.weight"].copy()

    _edit_tensors(ckpt, edit)
    lm = jd.from_pretrained(ckpt)
    np.testing.assert_array_equal(np.asarray(lm.logits(IDS, MASK)), base_logits)


def test_tensor_names_without_transformer_prefix(ckpt, base_logits):
    def edit(t):
        for k in list(t):
            t[k.removeprefix("transformer.")] = t.pop(k)

    _edit_tensors(ckpt, edit)
    np.testing.assert_array_equal(
        np.asarray(jd.from_pretrained(ckpt).logits(IDS, MASK)), base_logits
    )


def test_integer_tensor_is_refused(ckpt):
    name = "transformer.ln_f.bias"
    _edit_tensors(ckpt, lambda t: t.__setitem__(name, np.zeros((32,), np.int32)))
    with pytest.raises(ValueError, match=r"ln_f\.bias"):
        jd.from_pretrained(ckpt)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "bad_header"])
def test_corrupt_safetensors_names_the_file(ckpt, damage):
    path = ckpt / "model.safetensors"
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) - 1000])
    elif damage == "garbage":
        path.write_bytes(np.random.default_rng(0).bytes(len(data)))
    elif damage == "empty":
        path.write_bytes(b"")
    else:  # a plausible header length followed by broken JSON
        path.write_bytes(len(b"{broken").to_bytes(8, "little") + b"{broken" + data[64:])
    with pytest.raises(ValueError, match=r"model\.safetensors.*(truncated or corrupt)"):
        jd.from_pretrained(ckpt)


def test_truncated_shard_names_the_shard(hf_model, tmp_path):
    hf_model.save_pretrained(tmp_path, max_shard_size="20KB")
    shard = sorted(p for p in os.listdir(tmp_path) if p.startswith("model-"))[1]
    data = (tmp_path / shard).read_bytes()
    (tmp_path / shard).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=shard):
        jd.from_pretrained(tmp_path)


# --------------------------------------------------------------------------- #
def _pickle_only(ckpt, hf_model):
    os.remove(ckpt / "model.safetensors")
    torch.save(hf_model.state_dict(), ckpt / "pytorch_model.bin")


def test_pickle_only_is_refused_with_conversion_hint(ckpt, hf_model):
    _pickle_only(ckpt, hf_model)
    with pytest.raises(ValueError, match="pytorch_model.bin") as info:
        jd.from_pretrained(ckpt)
    message = str(info.value)
    assert "save_pretrained" in message and "safetensors" in message.lower()
    assert "allow_pickle=True" in message


def test_pickle_with_allow_pickle_loads_and_matches(ckpt, hf_model, base_logits):
    _pickle_only(ckpt, hf_model)
    lm = jd.from_pretrained(ckpt, allow_pickle=True)
    np.testing.assert_array_equal(np.asarray(lm.logits(IDS, MASK)), base_logits)


def test_safetensors_preferred_over_pickle(ckpt, hf_model, base_logits):
    torch.save({"garbage": torch.zeros(1)}, ckpt / "pytorch_model.bin")
    np.testing.assert_array_equal(
        np.asarray(jd.from_pretrained(ckpt).logits(IDS, MASK)), base_logits
    )


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def test_allow_pickle_never_runs_arbitrary_code(ckpt, tmp_path):
    """`allow_pickle=True` still refuses pickles that are not plain tensors."""
    os.remove(ckpt / "model.safetensors")
    marker = str(tmp_path / "code-ran")
    with open(ckpt / "pytorch_model.bin", "wb") as f:
        pickle.dump({"transformer.wte.weight": _Payload(marker)}, f, protocol=2)
    with pytest.raises(ValueError, match="pytorch_model.bin"):
        jd.from_pretrained(ckpt, allow_pickle=True)
    assert not os.path.exists(marker)


def test_no_weights_at_all(ckpt):
    os.remove(ckpt / "model.safetensors")
    with pytest.raises(ValueError, match="no weights"):
        jd.from_pretrained(ckpt)


# --------------------------------------------------------------------------- #
def test_missing_config(ckpt):
    os.remove(ckpt / "config.json")
    with pytest.raises(ValueError, match="config.json"):
        jd.from_pretrained(ckpt)


def test_invalid_config_json(ckpt):
    (ckpt / "config.json").write_text('{"model_type": "gpt2", "n_layer": ')
    with pytest.raises(ValueError, match=r"config\.json.*JSON"):
        jd.from_pretrained(ckpt)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"model_type": "bert"}, "model_type"),  # no family reads it
        ({"n_head": 5}, "divisible"),
        ({"activation_function": "swiglu"}, "activation_function"),
        ({"n_layer": 0}, "n_layer"),
        ({"tie_word_embeddings": False}, "tie_word_embeddings"),
    ],
)
def test_bad_config_values(ckpt, change, match):
    data = json.loads((ckpt / "config.json").read_text())
    data.update(change)
    (ckpt / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=match):
        jd.from_pretrained(ckpt)


def test_config_disagreeing_with_tensors_names_a_tensor(ckpt):
    """config.json says 3 layers, the weights hold 2: the first missing tensor is named."""
    data = json.loads((ckpt / "config.json").read_text())
    data["n_layer"] = 3
    (ckpt / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"h\.2\."):
        jd.from_pretrained(ckpt)


@pytest.mark.parametrize("dtype", [jnp.int32, "float64"])
def test_bad_dtype(base_dir, dtype):
    with pytest.raises(ValueError, match="dtype"):
        jd.from_pretrained(base_dir, dtype=dtype)


@pytest.mark.parametrize("path", ["/definitely/not/a/model", "./no-such-model", "a/b/c", ""])
def test_nonexistent_local_path(path):
    with pytest.raises(ValueError, match="neither a local directory nor"):
        jd.from_pretrained(path)


def test_file_instead_of_directory(base_dir):
    with pytest.raises(ValueError, match="is a file"):
        jd.from_pretrained(os.path.join(base_dir, "config.json"))


# --------------------------------------------------------------------------- #
def test_generation_config_from_transformers_save(base_dir):
    gen = jd.from_pretrained(base_dir).generation_config
    assert isinstance(gen, jd.GenerationConfig)
    assert gen.bos_token_id == TINY["bos_token_id"] and gen.eos_token_id == TINY["eos_token_id"]


def test_generation_config_fields_are_read(ckpt):
    (ckpt / "generation_config.json").write_text(
        json.dumps(
            {
                "bos_token_id": 1,
                "eos_token_id": [2, 3],
                "pad_token_id": 0,
                "do_sample": True,
                "top_k": 7,
                "top_p": 0.9,
                "temperature": 0.7,
                "max_new_tokens": 12,
                "repetition_penalty": 1.3,
                "transformers_version": "5.24.0",
                "num_assistant_tokens": 5,  # unknown to jaxdecode: ignored
            }
        )
    )
    gen = jd.from_pretrained(ckpt).generation_config
    assert gen.bos_token_id == 1 and gen.pad_token_id == 0
    assert tuple(np.atleast_1d(gen.eos_token_id)) == (2, 3)
    assert gen.do_sample is True and gen.top_k == 7
    assert gen.top_p == pytest.approx(0.9) and gen.temperature == pytest.approx(0.7)
    assert gen.max_new_tokens == 12 and gen.repetition_penalty == pytest.approx(1.3)


def test_generation_config_defaults_without_file(ckpt):
    os.remove(ckpt / "generation_config.json")
    gen = jd.from_pretrained(ckpt).generation_config
    assert gen.bos_token_id == TINY["bos_token_id"] and gen.eos_token_id == TINY["eos_token_id"]
    assert gen.do_sample is False


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("{oops", "JSON"),
        (json.dumps({"top_k": -1}), "top_k"),
        (json.dumps({"eos_token_id": 500}), "500"),
    ],
)
def test_bad_generation_config(ckpt, content, match):
    (ckpt / "generation_config.json").write_text(content)
    with pytest.raises(ValueError, match=match):
        jd.from_pretrained(ckpt)


# --------------------------------------------------------------------------- #
CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "hello world, hello jax",
    "pure functions compile once",
    "héllo wörld 🙂 unicode bytes",
] * 5
TEXTS = ["hello world", " the lazy fox", "héllo 🙂!", "never seen zebra-words 123"]


@pytest.fixture(scope="module")
def trained_bpe():
    from tokenizers import ByteLevelBPETokenizer

    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(
        CORPUS, vocab_size=300, min_frequency=1, special_tokens=["<|endoftext|>"]
    )
    return tok


@pytest.mark.parametrize("files", ["vocab_merges", "tokenizer_json"])
def test_tokenizer_files(ckpt, trained_bpe, files):
    if files == "vocab_merges":
        trained_bpe.save_model(str(ckpt))
        assert (ckpt / "vocab.json").exists() and (ckpt / "merges.txt").exists()
    else:
        trained_bpe.save(str(ckpt / "tokenizer.json"))
    tok = jd.from_pretrained(ckpt).tokenizer
    assert isinstance(tok, jd.Tokenizer)
    assert tok.vocab_size == trained_bpe.get_vocab_size()
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == trained_bpe.encode(text).ids
        assert all(isinstance(i, int) for i in ids)
        assert tok.decode(ids) == text
        assert tok.decode(np.asarray(ids, np.int32)) == text
    eot = trained_bpe.token_to_id("<|endoftext|>")
    assert tok.decode([eot], skip_special_tokens=False) == "<|endoftext|>"


@pytest.mark.parametrize("files", ["vocab_merges", "tokenizer_json"])
def test_tokenizer_endoftext_is_special_as_in_transformers(ckpt, trained_bpe, files):
    """GPT-2's `<|endoftext|>` is a special token: `decode(skip_special_tokens=True)`
    drops it and `encode` keeps it whole, as transformers' GPT2Tokenizer does for
    the same files."""
    trained_bpe.save_model(str(ckpt))
    if files == "tokenizer_json":
        trained_bpe.save(str(ckpt / "tokenizer.json"))
    ref = transformers.GPT2Tokenizer.from_pretrained(ckpt)
    tok = jd.from_pretrained(ckpt).tokenizer
    eot = trained_bpe.token_to_id("<|endoftext|>")
    ids = [*tok.encode("hello world"), eot]
    assert ref.decode(ids, skip_special_tokens=True) == "hello world"
    assert tok.decode(ids) == "hello world"
    assert tok.encode("hello<|endoftext|>") == ref.encode("hello<|endoftext|>")


def test_no_tokenizer_files(base_dir):
    assert jd.from_pretrained(base_dir).tokenizer is None


def test_corrupt_tokenizer_json(ckpt):
    (ckpt / "tokenizer.json").write_text('{"model": 3}')
    with pytest.raises(ValueError, match="tokenizer"):
        jd.from_pretrained(ckpt)


# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("config", ["tiny", "all_flags"])
def test_save_pretrained_round_trip_through_transformers(tmp_path, config):
    hf = make_hf_model(seed=5, **(ALL_FLAGS if config == "all_flags" else {}))
    src = save_hf_model(hf, tmp_path / "src")
    lm = jd.from_pretrained(src)
    gen = lm.generation_config.replace(
        do_sample=True, top_k=5, pad_token_id=0, eos_token_id=[95, 3]
    )
    lm = lm.replace(generation_config=gen)
    out = tmp_path / "out"
    lm.save_pretrained(str(out))
    assert {"config.json", "model.safetensors"} <= set(os.listdir(out))

    reloaded_hf = transformers.GPT2LMHeadModel.from_pretrained(
        out, attn_implementation="eager"
    ).eval()
    for field in ("n_layer", "n_head", "n_embd", "n_positions", "vocab_size", *ALL_FLAGS):
        assert getattr(reloaded_hf.config, field) == getattr(hf.config, field), field
    for name, tensor in hf.state_dict().items():
        torch.testing.assert_close(reloaded_hf.state_dict()[name], tensor, rtol=0, atol=0)
    ref = hf_logits(hf, IDS, MASK)
    np.testing.assert_array_equal(hf_logits(reloaded_hf, IDS, MASK), ref)
    assert reloaded_hf.generation_config.top_k == 5
    assert reloaded_hf.generation_config.do_sample is True

    again = jd.from_pretrained(out)
    assert again.config == lm.config
    assert again.generation_config == gen
    np.testing.assert_array_equal(
        np.asarray(again.logits(IDS, MASK)), np.asarray(lm.logits(IDS, MASK))
    )


def test_save_pretrained_of_bfloat16_model_writes_float32(base_dir, tmp_path):
    lm = jd.from_pretrained(base_dir, dtype=jnp.bfloat16)
    lm.save_pretrained(str(tmp_path))
    tensors = load_file(tmp_path / "model.safetensors")
    assert {t.dtype for t in tensors.values()} == {np.dtype(np.float32)}
    again = jd.from_pretrained(tmp_path, dtype=jnp.bfloat16)
    for a, b in zip(
        jax.tree_util.tree_leaves(again.params), jax.tree_util.tree_leaves(lm.params), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_save_pretrained_float16_with_tokenizer(ckpt, trained_bpe, tmp_path):
    trained_bpe.save(str(ckpt / "tokenizer.json"))
    lm = jd.from_pretrained(ckpt)
    out = tmp_path / "f16"
    lm.save_pretrained(str(out), dtype="float16")
    tensors = load_file(out / "model.safetensors")
    assert {t.dtype for t in tensors.values()} == {np.dtype(np.float16)}
    again = jd.from_pretrained(out)
    for text in TEXTS:
        assert again.tokenizer.encode(text) == lm.tokenizer.encode(text)
    # transformers reads the float16 file; computed in float32 both agree closely.
    hf = transformers.GPT2LMHeadModel.from_pretrained(
        out, attn_implementation="eager", dtype=torch.float32
    ).eval()
    ours = np.asarray(again.logits(IDS, MASK))
    np.testing.assert_allclose(_real(ours), _real(hf_logits(hf, IDS, MASK)), rtol=0, atol=1e-4)
    # float16 storage moved the logits a little, not a lot.
    base = np.asarray(lm.logits(IDS, MASK))
    assert 0 < np.abs(_real(ours) - _real(base)).max() < 0.05 * np.abs(_real(base)).max()
    with pytest.raises(ValueError, match="dtype"):
        lm.save_pretrained(str(tmp_path / "bad"), dtype="int8")


def test_config_without_model_type_is_named(ckpt):
    """No model_type: refused (as transformers' AutoConfig does), never read as GPT-2."""
    data = json.loads((ckpt / "config.json").read_text())
    del data["model_type"]
    (ckpt / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"config\.json has no model_type.*'gpt2'"):
        jd.from_pretrained(ckpt)


def test_truncated_gguf_names_expected_and_actual_sizes(tmp_path):
    """A GGUF cut short (an interrupted download) says so, with both sizes, instead
    of the gguf reader's "cannot reshape array"."""
    import gguf

    path = tmp_path / "full.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("token_embd.weight", np.ones((64, 32), np.float32))
    writer.add_tensor("output_norm.weight", np.ones((32,), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    data = path.read_bytes()
    assert len(jd.checkpoints.read_gguf(str(path)).tensors) == 2
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) - 100])
    want = rf"cut\.gguf is truncated: .*ending at byte {len(data)} .*has {len(data) - 100} bytes"
    with pytest.raises(ValueError, match=want):
        jd.checkpoints.read_gguf(str(cut))


def test_hub_failure_is_one_line(monkeypatch):
    """huggingface_hub's errors span several lines; ours is one."""
    import huggingface_hub

    def fail(*args, **kwargs):
        raise OSError("Got: ConnectError\nAn error happened.\nPlease check your connection.")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    with pytest.raises(ValueError) as info:
        jd.from_pretrained("someone/some-model")
    message = str(info.value)
    assert "\n" not in message and "someone/some-model" in message
    assert "Got: ConnectError An error happened. Please check" in message


def test_pad_token_id_is_read_as_transformers_reads_it(tmp_path):
    """A directory without generation_config.json: bos / eos / pad come from
    config.json, as transformers' `generation_config` takes them (GGUF loading
    already set pad; HF-directory loading dropped it). A pad id set nowhere else
    comes from the tokenizer's pad token, as transformers' tokenizer reads it."""
    bundled = jd.checkpoints.BUNDLED_DIR
    directory = tmp_path / "no-generation-config"
    directory.mkdir()
    for name in ("model.safetensors", "tokenizer.json"):
        shutil.copy(os.path.join(bundled, name), directory / name)
    config = json.loads(Path(bundled, "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "pad_token_id": 5}))

    ours = jd.from_pretrained(directory).generation_config
    theirs = transformers.AutoModelForCausalLM.from_pretrained(directory).generation_config
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours.pad_token_id == 5

    (directory / "config.json").write_text(json.dumps(config))
    (directory / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<|endoftext|>"}))
    ours = jd.from_pretrained(directory).generation_config
    assert ours.pad_token_id == transformers.AutoTokenizer.from_pretrained(directory).pad_token_id
    assert ours.pad_token_id == 256
