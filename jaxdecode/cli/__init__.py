"""The `jaxdecode` command: generate text, or evaluate a JSONL file of prompts.

    jaxdecode generate "In the beginning" --max_new_tokens 60 --do_sample --top_p 0.9
    jaxdecode eval prompts.jsonl -o out.jsonl --batch_size 32

Every `GenerationConfig` field is a flag under its transformers name (dashes work
too: `--max-new-tokens`). Errors are one line on stderr with exit code 2.

The package, by command: `app` (parser, entry point), `generate`, `evaluate`,
`explain`; what they share: `flags` (config fields as flags), `common` (model,
config, prompts, seeds), `records` (the JSON records).
"""

from jaxdecode.cli.app import (
    BROKEN_PIPE_EXIT,
    CACHE_ENV,
    build_parser,
    compilation_cache_dir,
    main,
)
from jaxdecode.cli.common import CLIError

__all__ = [
    "BROKEN_PIPE_EXIT",
    "CACHE_ENV",
    "CLIError",
    "build_parser",
    "compilation_cache_dir",
    "main",
]
