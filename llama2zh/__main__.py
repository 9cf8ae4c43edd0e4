"""`python -m llama2zh` is the same as the `llama2zh` command."""

from llama2zh.cli import main

raise SystemExit(main())
