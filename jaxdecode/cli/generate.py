"""`jaxdecode generate`: one batch of prompts, printed as text, a stream or JSON."""

from __future__ import annotations

import argparse
import sys
import time

from jaxdecode.cli import common, flags, records


def cmd_generate(args: argparse.Namespace) -> int:
    import jaxdecode

    if not args.prompts:
        raise common.CLIError("give at least one PROMPT")
    if args.stream and args.json:
        raise common.CLIError(
            "--stream prints text as it is produced and --json whole records: give one of them"
        )
    if args.system is not None and not args.chat:
        raise common.CLIError("--system needs --chat (it is the chat's system message)")
    lm = common.load_model(args)
    mesh, lm = common.mesh_and_model(args, lm)
    config = common.make_config(lm, flags.config_overrides(args))
    assistant = common.load_assistant(args)
    texts = (
        [common.chat_text(lm, p, args.system) for p in args.prompts] if args.chat else args.prompts
    )
    ids, mask = common.encode_batch(lm, texts, config.pad_id, chat=args.chat)
    config, drawn = common.sampling_seed(config)
    seed = config.seed if config.do_sample else None

    asked = [
        name
        for name, on in (
            ("output_raw_logprobs", config.output_raw_logprobs),
            ("output_routed_experts", config.output_routed_experts),
            ("logprobs", config.logprobs is not None),
            ("prompt_logprobs", config.prompt_logprobs is not None),
        )
        if on
    ]
    if asked and not args.json:
        raise common.CLIError(f"{', '.join(asked)}: printed in the --json records only; add --json")
    if args.stream:
        if assistant is not None or mesh is not None:
            raise common.CLIError(
                "--stream decodes one token per call on one device; --assistant_model and "
                "--mesh need generate without --stream"
            )
        # With --chat the answer alone is printed, as without --stream.
        _stream(lm, ids, mask, config, args.prompts, echo=not args.chat, verbose=args.verbose)
        common.tell_seed(config, drawn)
        return 0
    try:
        if args.verbose:
            from jaxdecode.generation import generate_timed

            out, timings = generate_timed(
                lm, ids, mask, config, mesh=mesh, assistant_model=assistant
            )
        else:
            out = jaxdecode.generate(lm, ids, mask, config, mesh=mesh, assistant_model=assistant)
    except ValueError as e:
        raise common.CLIError(str(e)) from None
    common.tell_seed(config, drawn)
    if args.verbose:
        print(
            f"jaxdecode: compile {timings.compile_s:.2f} s, weights {timings.prepare_s:.3f} s, "
            f"prefill {timings.prefill_s:.3f} s ({ids.shape[0]} x {ids.shape[1]} tokens), "
            f"decode {timings.tokens} tokens in "
            f"{timings.decode_s:.3f} s ({timings.tokens_per_s:.1f} tokens/s, "
            f"{timings.steps} steps)",
            file=sys.stderr,
        )
    r = config.num_return_sequences
    for i, prompt in enumerate(args.prompts):
        outputs = records.output_records(
            args.model, lm, config, out, i * r, r, ids.shape[1], mask[i]
        )
        if args.json:
            print(
                records.dumps(records.result_record(records.GENERATE_SCHEMA, prompt, seed, outputs))
            )
        else:
            for j, o in enumerate(outputs):
                if i or j:
                    print("---")
                print(o["text"] if args.chat else prompt + o["text"])
    return 0


class _StreamClock:
    """`--stream --verbose`: the time to the first token (compilation and prefill
    included), then the decoding rate of the tokens after it."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.first: float | None = None
        self.last = self.start

    def tick(self) -> None:
        self.last = time.perf_counter()
        if self.first is None:
            self.first = self.last

    def report(self, tokens: int) -> None:
        if self.first is None:
            return
        rest = self.last - self.first
        rate = f"{(tokens - 1) / rest:.1f} tokens/s" if tokens > 1 and rest > 0 else "n/a"
        print(
            f"jaxdecode: first token after {self.first - self.start:.2f} s (compile + prefill), "
            f"then {max(tokens - 1, 0)} tokens in {rest:.3f} s ({rate})",
            file=sys.stderr,
        )


def _stream(
    lm, ids, mask, config, prompts: list[str], echo: bool = True, verbose: bool = False
) -> None:
    """Prints the continuation of `prompts[0]` token by token (after the prompt
    itself when `echo`); every option is checked before anything is printed."""
    import jaxdecode

    if config.num_beams > 1:
        raise common.CLIError(
            "--stream works with greedy search and sampling, not with --num_beams > 1"
        )
    if len(prompts) > 1 or config.num_return_sequences > 1:
        raise common.CLIError(
            "--stream prints one continuation: give one prompt and num_return_sequences 1"
        )
    try:
        steps = jaxdecode.stream(lm, ids, mask, config)  # validates: raises before any output
    except ValueError as e:
        raise common.CLIError(str(e)) from None
    out_tokens: list[int] = []
    if echo:
        sys.stdout.write(prompts[0])
        sys.stdout.flush()
    emitted = ""
    clock = _StreamClock() if verbose else None
    try:
        for step in steps:
            if clock is not None:
                clock.tick()
            if not step.active[0]:
                break
            tok = int(step.tokens[0])
            if tok in config.eos_ids:
                break
            out_tokens.append(tok)
            text = lm.tokenizer.decode(out_tokens)
            if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                sys.stdout.write(text[len(emitted) :])
                sys.stdout.flush()
                emitted = text
    except ValueError as e:
        raise common.CLIError(str(e)) from None
    sys.stdout.write(lm.tokenizer.decode(out_tokens)[len(emitted) :] + "\n")
    sys.stdout.flush()
    if clock is not None:
        clock.report(len(out_tokens))
