"""The wiring and entry points: model loading (`loading`), building, starting and draining the server
(`server`), the `softprompt serve` command (`serve_cli`) and in-process training for `softprompt train
--store` (`train_local`).

The only package allowed to import every other server package; nothing in the server imports it.
"""
