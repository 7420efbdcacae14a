"""Helpers the tests share: the tiny model, a running server, PEFT adapters, the no-cache reference, engine rows,
synthetic training data, and the reliability tests' utilities. Tests import from here, never from each other.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from softprompt.prompts.data import Example
from softprompt.server.core.engine import Engine, Sequence
from softprompt.prompts.options import DecodingOptions

TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a soft prompt is a small matrix of virtual token embeddings",
    "one frozen model serves many tasks in a single batch",
    "positive negative neutral review movie film great awful boring",
    "translate english to french: hello world, how are you today?",
    "0123456789 + - * / = ( ) [ ] { } , . ; : ! ? ' \" @ # $ % & _",
] * 4


def build_tiny_model_dir(path: Path, *, seed: int = 0) -> Path:
    """Writes a tiny Llama model with a byte-level BPE tokenizer and a chat template to `path`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|im_end|>", bos_token="<|endoftext|>"
    )
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    # Larger-than-default weights make the logits peaked, so greedy choices are far from ties.
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(8.0 if p.dim() > 1 else 1.0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@contextmanager
def running_server(base, store: Path, **settings) -> Iterator[tuple[object, str]]:
    """A real server for `base` on a free loopback port: yields (app, address), then drains it."""
    from softprompt.server.app.server import build_app, shutdown, start
    from softprompt.server.config import ServerConfig

    settings.setdefault("http_port", None)  # the HTTP API only where a test asks for it (0: a free port)
    app = build_app(ServerConfig(port=0, store=store, **settings), base=base)
    grpc_server, port, health = start(app)
    try:
        yield app, f"127.0.0.1:{port}"
    finally:
        shutdown(app, grpc_server, health, grace_s=1.0)


def make_peft_adapter(base_model, out_dir: Path, *, num_virtual_tokens: int, seed: int) -> Path:
    """Saves a real PEFT prompt-tuning adapter with seeded random prompt vectors.

    PEFT wraps `base_model`; pass a copy that is not used for serving.
    """
    from peft import PromptTuningConfig, get_peft_model

    torch.manual_seed(seed)
    config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=num_virtual_tokens)
    peft_model = get_peft_model(base_model, config)
    with torch.no_grad():
        emb = peft_model.prompt_encoder["default"].embedding.weight
        # Scale like real token embeddings rather than N(0, 1).
        scale = base_model.get_input_embeddings().weight.std()
        emb.copy_(torch.randn_like(emb) * scale * 4)
    peft_model.save_pretrained(out_dir)
    return out_dir


def reference_greedy(model, prompt: torch.Tensor | None, input_ids: list[int], max_new_tokens: int, eos_ids) -> list[int]:
    """The correctness reference: full forward over [prompt ; input ; generated], no KV cache, greedy."""
    embed = model.get_input_embeddings()
    generated: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            ids = torch.tensor([input_ids + generated], dtype=torch.long, device=embed.weight.device)
            x = embed(ids)
            if prompt is not None:
                x = torch.cat([prompt[None].to(x), x], dim=1)
            logits = model(inputs_embeds=x, use_cache=False).logits[0, -1]
            token = int(logits.argmax())
            generated.append(token)
            if token in eos_ids:
                break
    return generated


# ---------------------------------------------------------------- engine rows

TEXTS = ["the quick brown fox", "hello", "a soft prompt is a small matrix of", "one frozen model serves"]


def engine_prompts(base, seed: int = 1) -> list[torch.Tensor | None]:
    hidden = base.model.config.hidden_size
    scale = base.model.get_input_embeddings().weight.std()
    g = torch.Generator().manual_seed(seed)
    return [None, torch.randn(5, hidden, generator=g) * scale * 4, torch.randn(9, hidden, generator=g) * scale * 4]


def engine_rows(engine: Engine, base, count: int, max_new: int = 12) -> list[Sequence]:
    prompts = engine_prompts(base)
    rows = []
    for i in range(count):
        seq = Sequence(request_id=i, input_ids=base.tokenizer(TEXTS[i % 4]).input_ids,
                       params=DecodingOptions(max_new_tokens=max_new + i), prompt=prompts[i % 3])
        engine.start(seq)
        rows.append(seq)
    return rows


def run_to_end(engine: Engine, batch) -> None:
    while batch is not None:
        engine.decode(batch)
        batch = engine.filter(batch, [i for i, s in enumerate(batch.sequences) if s.finish_reason is None])


# ---------------------------------------------------------------- synthetic training data

WORDS = "the quick brown fox jumps over lazy dog movie film".split()
CUES = {"positive": "great", "negative": "awful"}
FAST = dict(num_virtual_tokens=4, learning_rate=0.1, batch_size=8, patience=0)


def synthetic(n: int, seed: int) -> list[Example]:
    """Inputs of four random words and a cue; the target is the cue's label."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        label = rng.choice(sorted(CUES))
        words = " ".join(rng.choice(WORDS) for _ in range(4))
        out.append(Example(f"{words} {CUES[label]}", label))
    return out


def to_jsonl(examples: list[Example]) -> str:
    return "".join(json.dumps({"input": e.input, "target": e.target}) + "\n" for e in examples)


# ---------------------------------------------------------------- reliability


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Runs the block with `n` intra-op torch threads, then restores the previous setting.

    The tiny test model's matrices are far too small to gain from parallelism, and on a busy 2-core
    runner OpenMP's spinning threads make each forward up to 100x slower; one thread keeps these
    tests' run time bounded without changing any result.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def wait_until(predicate: Callable[[], bool], what: str = "the condition", timeout_s: float = 60.0,
               poll_s: float = 0.01) -> float:
    """Polls `predicate` until it holds; returns the seconds that took. The generous bound only turns a hang
    into a failure: no test passes or fails by how fast a correct system is."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout_s:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(poll_s)
    return time.monotonic() - started


def expected_ids(base, prompt: torch.Tensor | None, text: str, max_new_tokens: int) -> list[int]:
    """The reference greedy continuation of `text` under `prompt` (no KV cache, no batching)."""
    ids = base.tokenizer(text).input_ids
    return reference_greedy(base.model, prompt, ids, max_new_tokens, {base.tokenizer.eos_token_id})


# Dummy credentials for the loopback S3 endpoint; no real AWS configuration may leak into the tests.
S3_TEST_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
               "AWS_CONFIG_FILE": "/nonexistent", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent"}


@contextmanager
def s3_endpoint() -> Iterator[str]:
    """A real S3 HTTP endpoint (moto's server) on a free loopback port: yields its URL, then stops it.

    Sets dummy AWS credentials in the environment meanwhile (inherited by spawned processes). Requests
    are handled one at a time: moto checks If-None-Match / If-Match and stores the object in two steps,
    and serializing them gives the atomic conditional writes real S3 has.
    """
    import os
    import threading

    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    class QuietHandler(MotoRequestHandler):
        def log_request(self, *args, **kwargs) -> None:  # one line per request would drown test output
            pass

    moto_app = DomainDispatcherApplication(create_backend_app)
    lock = threading.Lock()

    def serialized(environ, start_response):
        with lock:
            return list(moto_app(environ, start_response))

    saved = {k: os.environ.get(k) for k in [*S3_TEST_ENV, "AWS_PROFILE", "AWS_SESSION_TOKEN"]}
    os.environ.update(S3_TEST_ENV)
    os.environ.pop("AWS_PROFILE", None)
    os.environ.pop("AWS_SESSION_TOKEN", None)
    server = make_server("127.0.0.1", 0, serialized, threaded=True, request_handler=QuietHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        thread.join(timeout=30)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def new_bucket(endpoint_url: str) -> str:
    """Creates a bucket with a fresh name on the S3 endpoint and returns its name."""
    import uuid

    import boto3

    name = f"test-{uuid.uuid4().hex[:16]}"
    boto3.client("s3", endpoint_url=endpoint_url).create_bucket(Bucket=name)
    return name


def race(target: Callable[..., None], first: object, count: int, timeout: float = 180.0) -> dict[int, list[int]]:
    """Runs `target(first, worker, count, barrier, results)` in two spawned processes (workers 1 and 2) that
    start together at `barrier`; each puts `(worker, made, error)` on `results`. Returns what each made,
    failing on a worker's error, exit or timeout."""
    import multiprocessing
    import queue

    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    results = ctx.Queue()
    procs = [ctx.Process(target=target, args=(first, w, count, barrier, results)) for w in (1, 2)]
    for p in procs:
        p.start()
    got: dict[int, list[int]] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(got) < len(procs):
            try:
                worker, made, error = results.get(timeout=1)
            except queue.Empty:
                dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                assert not dead, f"a worker died with exit code {dead}"
                assert time.monotonic() < deadline, "workers did not finish"
                continue
            assert error is None, f"worker {worker} failed after {made}: {error}"
            got[worker] = made
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert [p.exitcode for p in procs] == [0, 0]
    return got



# ---------------------------------------------------------------- PEFT's other prompt-learning methods (issue 21)


def peft_ready(model):
    """`model` with the test matrix's stray `num_key_value_heads` removed from a config whose family takes none
    (the matrix's tiny configs pass it to every family; PEFT reads it as grouped-query attention and would size a
    prefix for 2 heads on a model that caches 4). A real checkpoint of those families has no such field."""
    import inspect

    config = model.config
    if "num_key_value_heads" in vars(config) and \
            "num_key_value_heads" not in inspect.signature(type(config).__init__).parameters:
        delattr(config, "num_key_value_heads")
    return model


def realistic_prefix(base_model, num_virtual_tokens: int, seed: int) -> torch.Tensor:
    """PEFT's [n, layers * 2 * token_dim] prefix: the keys and values `base_model` computes for random tokens, plus
    noise at their scale (real magnitudes, far from what the model's own tokens give)."""
    from softprompt.prompts.base import kv_layout_of
    from softprompt.prompts.methods.prefix_tuning import initial_prefix

    g = torch.Generator().manual_seed(seed)
    vocab = base_model.get_input_embeddings().weight.shape[0]
    ids = torch.randint(3, vocab, (num_virtual_tokens,), generator=g).tolist()
    kv = initial_prefix(base_model, ids, kv_layout_of(base_model))
    return kv + torch.randn(kv.shape, generator=g) * kv.std() * 0.5


def make_prefix_adapter(base_model, out_dir: Path, *, num_virtual_tokens: int, seed: int,
                        peft_type: str = "PREFIX_TUNING", projection: bool = False) -> Path:
    """Saves a real PEFT PREFIX_TUNING (or CARTRIDGE) adapter for `base_model` with PEFT's own save_pretrained.

    Its keys and values are `realistic_prefix`'s; with `projection`, PEFT's reparameterization MLP with random
    weights (PEFT saves its output). PEFT wraps a copy of `base_model`. The config names the model's KV layout,
    as PEFT derives it for grouped-query attention."""
    import copy

    from peft import CartridgeConfig, PrefixTuningConfig, get_peft_model

    from softprompt.prompts.base import kv_layout_of

    layout = kv_layout_of(base_model)
    fields = dict(task_type="CAUSAL_LM", num_virtual_tokens=num_virtual_tokens, num_layers=layout.num_layers,
                  num_attention_heads=layout.kv_heads, token_dim=layout.token_dim)
    config = (CartridgeConfig(**fields) if peft_type == "CARTRIDGE"
              else PrefixTuningConfig(**fields, prefix_projection=projection, encoder_hidden_size=32))
    peft_model = get_peft_model(peft_ready(copy.deepcopy(base_model)), config)
    encoder = peft_model.prompt_encoder["default"]
    with torch.no_grad():
        if projection:
            g = torch.Generator().manual_seed(seed)
            for p in encoder.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        else:
            encoder.load_prompt_embeddings(realistic_prefix(base_model, num_virtual_tokens, seed))
    peft_model.save_pretrained(out_dir)
    return out_dir


def make_multitask_adapter(base_model, out_dir: Path, *, num_virtual_tokens: int, num_tasks: int, seed: int) -> Path:
    """Saves a real PEFT MULTITASK_PROMPT_TUNING adapter (shared prompt, rank-2 factors per task), random values at
    the scale of real embeddings."""
    import copy

    from peft import MultitaskPromptTuningConfig, get_peft_model

    config = MultitaskPromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=num_virtual_tokens,
                                         num_tasks=num_tasks, num_ranks=2)
    peft_model = get_peft_model(copy.deepcopy(base_model), config)
    encoder = peft_model.prompt_encoder["default"]
    scale = float(base_model.get_input_embeddings().weight.detach().std())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        encoder.embedding.weight.copy_(torch.randn(encoder.embedding.weight.shape, generator=g) * scale * 4)
        encoder.prefix_task_cols.copy_(torch.randn(encoder.prefix_task_cols.shape, generator=g))
        encoder.prefix_task_rows.copy_(torch.randn(encoder.prefix_task_rows.shape, generator=g))
    peft_model.save_pretrained(out_dir)
    return out_dir


def make_cpt_adapter(base_model, out_dir: Path, *, token_ids: list[int], seed: int) -> Path:
    """Saves a real PEFT CPT adapter: the tokens' embeddings plus random (projected) deltas."""
    import copy

    from peft import CPTConfig, get_peft_model

    n = len(token_ids)
    config = CPTConfig(task_type="CAUSAL_LM", cpt_token_ids=token_ids, cpt_mask=[1] * n,
                       cpt_tokens_type_mask=[1] + [2] * (n - 2) + [3])
    peft_model = get_peft_model(copy.deepcopy(base_model), config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        delta = peft_model.prompt_encoder["default"].delta_embedding.weight
        delta.copy_(torch.randn(delta.shape, generator=g))
    peft_model.save_pretrained(out_dir)
    return out_dir


def peft_greedy(peft_model, input_ids: list[int], max_new_tokens: int, **forward_kwargs) -> list[int]:
    """PEFT's own answer: greedy tokens from a no-cache loop of `PeftModel.forward` (PeftModel.generate is broken
    for prompt learning on these transformers releases: it re-injects the prompt at every step)."""
    generated: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            ids = torch.tensor([input_ids + generated])
            logits = peft_model(input_ids=ids, attention_mask=torch.ones_like(ids), **forward_kwargs).logits
            generated.append(int(logits[0, -1].argmax()))
    return generated
