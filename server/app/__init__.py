"""The wiring and entry points: model loading (`loading`), building, starting and draining the server
(`server`), the `softprompt serve` command (`serve_cli`), in-process training for `softprompt train
--store` (`train_local`) and the Ray Serve application (`ray_serve`: one App per replica behind Ray's
gRPC and HTTP proxies; imported only by `serve run`, as Ray is an extra).

The only package allowed to import every other server package; nothing in the server imports it.
"""
