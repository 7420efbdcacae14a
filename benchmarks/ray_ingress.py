"""`python -m softprompt.benchmarks.ray_ingress`: tokens/s through Ray Serve's gRPC ingress against a direct connection.

The same requests to two servers on this machine, built from the same flags: `softprompt serve` (a
subprocess, clients connecting to it directly) and one replica of the Ray Serve deployment
(`server/app/ray_serve.py`) behind Ray Serve's gRPC proxy, in `--repeats` alternating runs with both up
(this shared machine's noise then hits both alike), each run after a warm-up request per task.
`--clients` concurrent greedy GenerateStream calls over `--tasks` random soft prompts (registered beforehand
in a temporary folder store both servers read), each sending `multiplexed_model_id` as a Ray client does;
tokens/s is the tokens generated over the wall time from the first send to the last stream's end. Both
servers generate the same tokens (checked): only the ingress differs. The replica gets every CPU of the
machine (`ray.init(num_cpus=...)` and its `num_cpus`), as the direct server does. `--proxy-transport`
picks how Ray's proxy reaches the replica: Ray actor calls (Ray's default) or gRPC
(RAY_SERVE_PROXY_USE_GRPC=1).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import statistics
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import grpc
import torch

from softprompt.benchmarks.workload import build_texts, task_name
from softprompt.prompts.format.tensor import PromptTensor
from softprompt.prompts.registry import Registry
from softprompt.protos import softprompt_pb2 as pb
from softprompt.protos import softprompt_pb2_grpc as pb_grpc
from softprompt.server.app.loading import load_base_model

def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stream(channel: grpc.Channel, task: str, text: str, new_tokens: int) -> list[int]:
    request = pb.GenerateRequest(task=task, input=text, params=pb.DecodingParameters(max_new_tokens=new_tokens))
    metadata = [("multiplexed_model_id", task)]
    responses = pb_grpc.InferenceStub(channel).GenerateStream(request, metadata=metadata, timeout=600)
    return [t for m in responses for t in m.token_ids]


def drive(target: str, requests: Sequence[tuple[str, str]], clients: int,
          new_tokens: int) -> tuple[list[list[int]], float]:
    """Warms each task, then sends `requests` from `clients` threads at once; their tokens and the wall time."""
    with grpc.insecure_channel(target) as channel:
        grpc.channel_ready_future(channel).result(timeout=600)
        for task in sorted({task for task, _ in requests}):
            _stream(channel, task, "warm up", 2)
        with ThreadPoolExecutor(clients) as pool:
            started = time.perf_counter()
            tokens = list(pool.map(lambda r: _stream(channel, *r, new_tokens), requests))
            return tokens, time.perf_counter() - started


@contextmanager
def direct_server(flags: list[str]) -> Iterator[str]:
    """`softprompt serve` in a subprocess on a free port: yields its address."""
    port = _free_port()
    command = [sys.executable, "-m", "softprompt.client.cli", "serve", *flags, f"--port={port}", "--http-port=off",
               "--log-level=WARNING"]
    with subprocess.Popen(command) as server:
        try:
            yield f"127.0.0.1:{port}"
        finally:
            server.terminate()
            server.wait(timeout=60)


@contextmanager
def ray_server(flags: list[str], cpus: int, proxy_grpc: bool) -> Iterator[str]:
    """One Ray Serve replica behind Ray Serve's gRPC proxy on a local Ray instance: yields the proxy's address.

    `proxy_grpc`: the proxy reaches the replica over gRPC (RAY_SERVE_PROXY_USE_GRPC=1), else through Ray's
    actor calls (Ray's default).
    """
    # Read by the proxy's worker process, which the local Ray instance starts with this environment.
    os.environ["RAY_SERVE_PROXY_USE_GRPC"] = "1" if proxy_grpc else "0"
    import ray
    from ray import serve

    from softprompt.server.app.ray_serve import GRPC_SERVICER_FUNCTIONS, Deployment

    port = _free_port()
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": _free_port()},
                    grpc_options={"port": port, "grpc_servicer_functions": GRPC_SERVICER_FUNCTIONS})
        serve.run(Deployment.options(num_replicas=1, ray_actor_options={"num_cpus": cpus}).bind(flags),
                  name="softprompt")
        yield f"127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def build_parser() -> argparse.ArgumentParser:
    """The command's argument parser."""
    parser = argparse.ArgumentParser(prog="python -m softprompt.benchmarks.ray_ingress", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model id or folder (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--requests", type=int, default=32, help="requests (default: 32)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent streaming clients (default: 16)")
    parser.add_argument("--tasks", type=int, default=4, help="random soft prompts (default: 4)")
    parser.add_argument("--virtual-tokens", type=int, default=20, help="soft-prompt length (default: 20)")
    parser.add_argument("--input-tokens", type=int, default=32, help="input length (default: 32)")
    parser.add_argument("--new-tokens", type=int, default=32, help="new tokens per request (default: 32)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs per server (default: 3)")
    parser.add_argument("--proxy-transport", choices=["actor", "grpc"], default="actor",
                        help="how Ray's proxy reaches the replica: Ray actor calls (Ray's default, and this one's) "
                             "or gRPC (RAY_SERVE_PROXY_USE_GRPC=1)")
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 1, help="the replica's CPUs (default: all)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Prints both servers' tokens/s and their ratio; exits 1 if their tokens differ."""
    a = build_parser().parse_args(argv)
    base = load_base_model(a.model, device="cpu")
    tasks = [task_name(t) for t in range(a.tasks)]
    texts = build_texts(base.tokenizer, a.requests, a.input_tokens, None)
    requests = [(tasks[i % a.tasks], text) for i, text in enumerate(texts)]
    with tempfile.TemporaryDirectory() as store:
        registry = Registry(Path(store))
        scale = base.model.get_input_embeddings().weight.std()
        torch.manual_seed(0)
        for task in tasks:
            prompt = torch.randn(a.virtual_tokens, base.spec.hidden_size) * scale
            registry.register(task, PromptTensor(prompt.float(), "RAW"), base.spec)
        del base  # each server loads its own copy
        flags = [f"--store={store}", "--device=cpu", f"--max-batch-size={a.clients}"]
        if a.model:
            flags.append(f"--model={a.model}")
        rates: dict[str, list[float]] = {"direct gRPC": [], "Ray Serve ingress": []}
        outputs: dict[str, list[list[int]]] = {}
        with direct_server(flags) as plain, ray_server(flags, a.cpus, a.proxy_transport == "grpc") as ingress:
            # Alternating runs, both servers up and idle in between: this shared machine's noise hits both alike.
            for _ in range(a.repeats):
                for name, target in (("direct gRPC", plain), ("Ray Serve ingress", ingress)):
                    tokens, seconds = drive(target, requests, a.clients, a.new_tokens)
                    rates[name].append(sum(map(len, tokens)) / seconds)
                    outputs.setdefault(name, tokens)
    print(f"{a.requests} requests, {a.clients} streaming clients, {a.tasks} tasks x {a.virtual_tokens} virtual tokens, "
          f"~{a.input_tokens} input + {a.new_tokens} new tokens, greedy, cpu x{a.cpus}; Ray proxy -> replica over "
          f"{a.proxy_transport}; {a.repeats} alternating runs each")
    best = {name: max(r) for name, r in rates.items()}
    for name, r in rates.items():
        print(f"  {name:18}: best {best[name]:6.1f} tok/s, median {statistics.median(r):6.1f} "
              f"({', '.join(f'{x:.1f}' for x in r)})")
    print(f"  Ray / direct      : {best['Ray Serve ingress'] / best['direct gRPC']:.2f}x (best), "
          f"{statistics.median(rates['Ray Serve ingress']) / statistics.median(rates['direct gRPC']):.2f}x (median)")
    same = outputs["direct gRPC"] == outputs["Ray Serve ingress"]
    print(f"  same tokens       : {same}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
