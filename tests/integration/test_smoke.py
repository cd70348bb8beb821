import jax.numpy as jnp

import jaxdecode as jd


def test_import_and_chain():
    c = jd.chain(jd.temperature(0.5), jd.top_k(2))
    out = c(
        jnp.array([[1.0, 3.0, 2.0]]), jd.DecodeContext.from_ids(jnp.zeros((1, 1)), vocab_size=3)
    )
    assert jnp.isneginf(out[0, 0]) and out[0, 1] == 6.0
