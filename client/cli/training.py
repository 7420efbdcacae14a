"""`softprompt train`: one flag per TrainingOptions field; trains on the server, or here with --store.

On the server (the default) the command starts a job and follows it (see `jobs.follow_job`); with
--store it trains in this process through `handoff.train_locally`, which needs the server extras.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, NoReturn

from softprompt.client.cli import handoff, render
from softprompt.client.cli.jobs import follow_job
from softprompt.client.cli.parsing import add_command, command_line, tag, wants_json
from softprompt.client.client import Client
from softprompt.prompts.options import TrainingOptions

# TrainingOptions field -> (flag, metavar, help); `softprompt train` has one flag per field, typed
# and defaulted like the field, and TrainingOptions itself checks the values.
_TRAINING_FLAGS: dict[str, tuple[str, str, str]] = {
    "num_virtual_tokens": (
        "--num-virtual-tokens", "N", "virtual tokens of the learned prompt, i.e. rows of its matrix"
    ),
    "init": (
        "--init",
        "SPEC",
        "initial prompt: 'vocab' (embeddings of sampled vocabulary tokens), 'random', "
        "'text:SOME WORDS' (those words' embeddings, repeated) or 'from:TASK[@VERSION]' "
        "(warm start from a registered prompt of the same length)",
    ),
    "learning_rate": ("--lr", "LR", "AdamW learning rate"),
    "epochs": ("--epochs", "N", "passes over the training data"),
    "max_steps": ("--max-steps", "N", "cap on optimizer steps; 0: no cap"),
    "batch_size": ("--batch-size", "N", "examples per forward pass"),
    "grad_accum": (
        "--grad-accum", "N", "forward passes per optimizer step; examples per step: batch size x this"
    ),
    "max_length": (
        "--max-length", "N", "tokens per example, input + target; longer inputs are cut at the end"
    ),
    "seed": ("--seed", "N", "makes initialisation, shuffling and the held-out split reproducible"),
    "eval_fraction": (
        "--eval-fraction", "F", "share of --data held out for evaluation when --eval is not given"
    ),
    "eval_every": (
        "--eval-every", "N", "optimizer steps between held-out evaluations; 0: once per epoch"
    ),
    "patience": (
        "--patience", "N", "evaluations without a better held-out loss before stopping early; 0: never"
    ),
    "apply_chat_template": (
        "--chat", "", "wrap each input as a user turn with the chat template (then run it with --chat)"
    ),
    "warmup_steps": ("--warmup-steps", "N", "optimizer steps of linear learning-rate warm-up"),
    "method": (
        "--method", "prompt|prefix",
        "'prompt': prompt tuning (virtual-token embeddings in front of the input); 'prefix': prefix tuning "
        "(keys and values in front of every layer's KV cache, initialised from those the model computes "
        "for --init's tokens)",
    ),
    "prefix_projection": (
        "--prefix-projection", "",
        "with --method prefix: learn the prefix through PEFT's reparameterization MLP (embedding, linear, "
        "tanh, linear), materialized into plain keys and values when training ends",
    ),
    "encoder_hidden_size": (
        "--encoder-hidden-size", "N", "hidden width of --prefix-projection's MLP; 0: the prefix's token_dim, as PEFT"
    ),
}

# `train` flags that only the local trainer (--store) uses, by dest.
_LOCAL_ONLY_FLAGS = {"model": "--model", "device": "--device", "dtype": "--dtype",
                     "output_dir": "--output-dir", "s3_endpoint_url": "--s3-endpoint-url"}


def add_train(commands: Any, common: argparse.ArgumentParser) -> None:
    """Adds `train` to the subparsers `commands`."""
    parser = add_command(
        commands,
        "train",
        common,
        _cmd_train,
        "train a soft prompt and register it as a new version",
        "Learn a soft prompt for TASK from examples and register it as TASK's next version.\n"
        "--data (and --eval) are JSONL files with one {\"input\": ..., \"target\": ...} object a "
        "line.\nThe base model stays frozen; only the prompt's virtual tokens are trained. Without "
        "--eval,\n--eval-fraction of --data is held out; held-out loss drives early stopping, and "
        "the\nheld-out metrics before and after training are reported and stored with the version.\n"
        "\n"
        "By default the server trains on its own model (no second copy) and this command watches\n"
        "the job until it ends: progress goes to stderr, the result (held-out metrics before and\n"
        "after, the registered version, the promotion) to stdout, as JSON with --json; the exit\n"
        "status is 0 if the job succeeded. Ctrl-C stops watching, not the job (see `softprompt\n"
        "jobs`). With --store DIR the prompt is trained here, in this process, and registered into\n"
        "the prompt store at DIR (needs the server extras: pip install 'softprompt[server]').\n"
        "\n"
        "--promote ALIAS moves TASK@ALIAS to the new version only if it beats the version the\n"
        "alias points at on the held-out data (accuracy for classification data, else exact\n"
        "match; then loss).",
        "  softprompt train --task sentiment --data train.jsonl --eval dev.jsonl\n"
        "  softprompt train --task sentiment --data train.jsonl --epochs 5 --lr 0.1 --promote prod\n"
        "  softprompt train --task qa --data qa.jsonl --chat --init 'text:Answer the question' "
        "--no-wait\n"
        "  softprompt train --task sentiment --data train.jsonl --store ./prompts --device cuda\n"
        "  softprompt classify sentiment@prod 'Great service' --labels positive,negative\n",
    )
    parser.set_defaults(command_parser=parser)  # for usage errors found after parsing
    data = parser.add_argument_group("data")
    data.add_argument(
        "--task", required=True, metavar="NAME", help="register the prompt as a new version of NAME"
    )
    data.add_argument("--data", required=True, type=Path, metavar="FILE", help="training examples (JSONL)")
    data.add_argument(
        "--eval", type=Path, metavar="FILE", help="held-out examples (JSONL; default: part of --data)"
    )

    defaults = TrainingOptions()
    options = parser.add_argument_group("training options")
    for name, (flag, metavar, help_text) in _TRAINING_FLAGS.items():
        default = getattr(defaults, name)
        if isinstance(default, bool):
            options.add_argument(flag, dest=name, action="store_true", help=help_text)
        else:
            options.add_argument(
                flag, dest=name, type=type(default), default=default, metavar=metavar,
                help=f"{help_text} (default: {default})",
            )

    registration = parser.add_argument_group("registration")
    registration.add_argument("--description", default="", help="free text stored with the version")
    registration.add_argument(
        "--tag", dest="tags", action="append", type=tag, default=[], metavar="KEY=VALUE",
        help="a label stored with the version (repeatable)",
    )
    registration.add_argument(
        "--promote", default="", metavar="ALIAS",
        help="move TASK@ALIAS to the new version if it beats the alias's current version",
    )

    where = parser.add_argument_group("where to train")
    where.add_argument(
        "--store", metavar="DIR_OR_URL",
        help="train locally and register into the prompt store DIR_OR_URL (a folder or s3://bucket/prefix; "
        "S3 endpoint and credentials from the AWS configuration), as `softprompt serve --store` uses it "
        "(default: train on the server)",
    )
    where.add_argument(
        "--s3-endpoint-url", metavar="URL",
        help="with an s3:// --store: the endpoint of an S3-compatible store that is not AWS (MinIO, Ceph, ...), "
             "e.g. http://minio:9000, as `softprompt serve --s3-endpoint-url` takes it (default: the AWS "
             "configuration, $AWS_ENDPOINT_URL_S3 or $AWS_ENDPOINT_URL)",
    )
    where.add_argument(
        "--no-wait", action="store_true",
        help="on the server: print the job id and return instead of watching the job",
    )
    where.add_argument(
        "--model", metavar="ID",
        help="with --store: Hugging Face model id or local folder (default: as `softprompt serve`)",
    )
    where.add_argument(
        "--device", help="with --store: torch device, e.g. cpu, cuda, cuda:1 (default: as `softprompt serve`)"
    )
    where.add_argument(
        "--dtype", help="with --store: float32, bfloat16 or float16 (default: as `softprompt serve`)"
    )
    where.add_argument(
        "--output-dir", type=Path, metavar="DIR",
        help="with --store: where the loss plot and report go (default: ./runs/TASK-DATE-TIME); "
             "the version's folder in the store holds them too",
    )


def _cmd_train(client: Client, args: argparse.Namespace) -> int:
    options = _training_options(args)
    _check_train_mode(args)
    if args.store is not None:
        return _train_locally(args, options)
    job = client.train(
        args.task,
        args.data,
        args.eval,
        options=options,
        description=args.description,
        tags=dict(args.tags),
        promote_alias=args.promote,
    )
    if args.no_wait:
        if wants_json(args):
            render.print_json(job)
        else:
            print(f"started training job {job.job_id} ({job.state})")
            print(f"follow it with `{command_line(args)} jobs watch {job.job_id}`")
        return 0
    print(f"started training job {job.job_id}", file=sys.stderr)
    return follow_job(client, job.job_id, args, json_lines=False)


def _training_options(args: argparse.Namespace) -> TrainingOptions:
    """Builds TrainingOptions from the flags; a value it refuses is a usage error naming the flag."""
    try:
        return TrainingOptions(**{name: getattr(args, name) for name in _TRAINING_FLAGS})
    except ValueError as e:
        message = str(e)
        # TrainingOptions' messages start with the field's name; name the flag the user typed.
        flags = [flag for name, (flag, _, _) in _TRAINING_FLAGS.items() if message.startswith(f"{name} ")]
        _usage_error(args, f"argument {flags[0]}: {message}" if flags else message)


def _check_train_mode(args: argparse.Namespace) -> None:
    if args.store is None:
        local = [flag for dest, flag in _LOCAL_ONLY_FLAGS.items() if getattr(args, dest) is not None]
        if local:
            _usage_error(args, f"{', '.join(local)} only apply to local training (--store DIR)")
    elif args.no_wait:
        _usage_error(args, "--no-wait only applies to training on the server (without --store)")


def _usage_error(args: argparse.Namespace, message: str) -> NoReturn:
    """Exits with status 2 after printing the command's usage and `message`, as argparse does."""
    parser: argparse.ArgumentParser = args.command_parser
    parser.error(message)


def _train_locally(args: argparse.Namespace, options: TrainingOptions) -> int:
    return handoff.train_locally(
        task=args.task,
        train_path=args.data,
        eval_path=args.eval,
        options=options,
        store=args.store,
        description=args.description,
        tags=dict(args.tags),
        promote_alias=args.promote,
        output_dir=args.output_dir,
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        json_output=wants_json(args),
        # Only when given: without it the store's endpoint comes from the AWS configuration, as for `serve`.
        **({"s3_endpoint_url": args.s3_endpoint_url} if args.s3_endpoint_url else {}),
    )
