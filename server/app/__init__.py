"""The wiring: settings built once from flags (`config`), model loading (`loading`), building, starting and
draining the server (`server`), and the `softprompt serve` command (`serve_cli`).

The only package allowed to import every other server package; nothing in the server imports it.
"""
