"""`jaxdecode explain`: draw what each decoding parameter does to the next-token
distribution (`jaxdecode.explain`)."""

from __future__ import annotations

import argparse

from jaxdecode.cli import common, flags


def cmd_explain(args: argparse.Namespace) -> int:
    import jax
    import numpy as np

    from jaxdecode import explain
    from jaxdecode.trace import trace

    try:
        explain._pyplot()
    except ImportError as e:  # matplotlib is an optional extra
        raise common.CLIError(str(e)) from None
    if args.steps < 1 or args.top < 1:
        raise common.CLIError(f"--steps and --top must be >= 1, got {args.steps} and {args.top}")
    if args.system is not None and not args.chat:
        raise common.CLIError("--system needs --chat (it is the chat's system message)")
    lm = common.load_model(args)
    overrides = flags.config_overrides(args)
    if "max_length" not in overrides:
        overrides.setdefault("max_new_tokens", args.steps)
    config = common.make_config(lm, overrides)
    # With --chat, the prompt is the user's turn and the answer alone is printed (as generate).
    text = common.chat_text(lm, args.prompt, args.system) if args.chat else args.prompt
    ids, mask = common.encode_batch(lm, [text], config.pad_id, chat=args.chat)
    key = jax.random.key(config.seed if config.seed is not None else 0)
    try:
        tr = trace(lm, ids, config, attention_mask=mask, key=key)
    except ValueError as e:
        raise common.CLIError(str(e)) from None
    decode = lambda t: lm.tokenizer.decode([t])
    try:
        written = explain.write_report(
            tr,
            args.output,
            decode=decode,
            steps=args.steps,
            m=args.top,
            title=f"jaxdecode explain: {args.prompt!r}",
            prompt_text=text,
        )
    except OSError as e:
        raise common.CLIError(f"cannot write to {args.output}: {e}") from None
    seq = np.asarray(tr.output.sequences)[0, ids.shape[1] :][: int(tr.output.lengths[0])]
    seq = [int(t) for t in seq if not (args.chat and int(t) in config.eos_ids)]
    answer = lm.tokenizer.decode(seq)
    print(answer if args.chat else args.prompt + answer)
    print(f"wrote {len(written) - 1} pictures and {written[-1]}")
    return 0
