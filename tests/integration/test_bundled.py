"""The bundled model: ships inside the package, loads offline, writes KJV-style English."""

import re

import numpy as np

import jaxdecode as jd


def test_bundled_model_loads_and_writes_english():
    lm = jd.from_pretrained("bundled")
    assert lm.tokenizer is not None and lm.vocab_size == 257
    assert lm.config.n_positions == 128
    ids = np.array([lm.tokenizer.encode("And God said")])
    out = lm.generate(ids, max_new_tokens=80, do_sample=False, repetition_penalty=1.2)
    text = lm.tokenizer.decode(np.asarray(out.sequences)[0, ids.shape[1] :])
    words = re.findall(r"[A-Za-z]+", text)
    assert len(words) >= 8, text
    # KJV vocabulary, not byte noise: most words are common ones.
    common = {"the", "and", "of", "unto", "lord", "god", "that", "he", "his", "in", "to", "said"}
    assert sum(w.lower() in common for w in words) >= len(words) // 4, text
    assert all(ch.isprintable() or ch == "\n" for ch in text), text
