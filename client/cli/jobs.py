"""`softprompt jobs list|show|watch|cancel`, and following a server-side training job to its end."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from softprompt.client.cli import render
from softprompt.client.cli.parsing import add_command, command_line, wants_json
from softprompt.client.client import Client
from softprompt.client.types import TrainingJob


def add_jobs(commands: Any, common: argparse.ArgumentParser) -> None:
    """Adds `jobs` and its actions to the subparsers `commands`."""
    parser = commands.add_parser(
        "jobs",
        help="list, show, watch or cancel server-side training jobs",
        description="Follow the training jobs that `softprompt train` started on the server. The "
        "server runs\none job at a time and forgets its jobs when it restarts.",
        epilog="examples:\n"
        "  softprompt jobs list\n"
        "  softprompt jobs watch 3f2a9c\n"
        "  softprompt jobs show 3f2a9c --json\n"
        "  softprompt jobs cancel 3f2a9c\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[common],
    )
    actions = parser.add_subparsers(dest="jobs_action", metavar="ACTION", required=True)
    add_command(
        actions, "list", common, _cmd_list, "list training jobs, newest first",
        "List the server's training jobs, newest first.",
        "  softprompt jobs list\n  softprompt jobs list --json\n",
    )
    for name, handler, summary, description in (
        ("show", _cmd_show, "describe a training job",
         "Describe training job ID: state, progress, held-out metrics, registered version."),
        ("watch", _cmd_watch, "follow a training job until it ends",
         "Show training job ID's progress until it ends, then its result (exit status 0 if it\n"
         "succeeded). Ctrl-C stops watching, not the job. --json prints the job as one JSON\n"
         "line per change."),
        ("cancel", _cmd_cancel, "stop a queued or running training job",
         "Stop training job ID; nothing is registered."),
    ):
        action = add_command(
            actions, name, common, handler, summary, description,
            f"  softprompt jobs {name} 3f2a9c\n",
        )
        action.add_argument("job_id", metavar="ID", help="the job id `softprompt train` printed")


def _cmd_list(client: Client, args: argparse.Namespace) -> int:
    jobs = client.list_training_jobs()
    if wants_json(args):
        render.print_json(jobs)
    elif not jobs:
        print("no training jobs")
    else:
        render.print_table(render.JOB_COLUMNS, [render.job_row(job) for job in jobs])
    return 0


def _cmd_show(client: Client, args: argparse.Namespace) -> int:
    job = client.get_training_job(args.job_id)
    if wants_json(args):
        render.print_json(job)
    else:
        render.print_job(job)
    return 0


def _cmd_watch(client: Client, args: argparse.Namespace) -> int:
    return follow_job(client, args.job_id, args, json_lines=wants_json(args))


def _cmd_cancel(client: Client, args: argparse.Namespace) -> int:
    job = client.cancel_training_job(args.job_id)
    if wants_json(args):
        render.print_json(job)
    else:
        print(f"training job {job.job_id}: {job.state}")
    return 0


def follow_job(client: Client, job_id: str, args: argparse.Namespace, *, json_lines: bool) -> int:
    """Watches a job until it ends, then prints it; 0 if it succeeded, 1 otherwise, 130 on Ctrl-C.

    Progress goes to stderr and the final job to stdout (as JSON with --json); with `json_lines`,
    every change of the job goes to stdout as one JSON line instead.
    """
    try:
        if json_lines:
            job = _watch_to_end(client, job_id, render.print_json_line)
        else:
            with render.ProgressLine(sys.stderr) as progress:
                job = _watch_to_end(client, job_id, progress.update)
    except KeyboardInterrupt:
        command = command_line(args)
        print(
            f"stopped watching; training job {job_id} goes on on the server.\n"
            f"follow it with `{command} jobs watch {job_id}`, "
            f"stop it with `{command} jobs cancel {job_id}`",
            file=sys.stderr,
        )
        return 130
    if wants_json(args) and not json_lines:
        render.print_json(job)
    elif not json_lines:  # with JSON lines, the final job was the last line
        render.print_job(job)
    if job.state == "succeeded":
        return 0
    print(
        f"error: training job {job_id} {job.state or 'ended'}" + (f": {job.error}" if job.error else ""),
        file=sys.stderr,
    )
    return 1


def _watch_to_end(client: Client, job_id: str, show: Callable[[TrainingJob], None]) -> TrainingJob:
    """Calls `show` with the job each time it changes until it ends; returns the final job."""
    job = None
    # No deadline: --timeout bounds each call, and a watch lasts as long as the job.
    for job in client.watch_training_job(job_id):
        show(job)
    if job is None or not job.done:  # the watch began just as the job ended: ask for its state
        job = client.get_training_job(job_id)
        show(job)
    return job
