"""`llama2zh serve`: an OpenAI-compatible HTTP server (server.py) over the C engine, whose requests share
its decode steps (scheduler.py). Needs the `serve` extra (aiohttp)."""
