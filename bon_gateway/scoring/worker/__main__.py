"""`python -m bon_gateway.scoring.worker` / `bon-gateway worker`: one RewardWorker process.

Models come from `--config FILE [--model NAME ...]`, from `--reward-model NAME=PATH`
plus flags, or from `--model-json` entries (what the gateway's pool passes).
Logs one line per phase; never prompt or answer text.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

from bon_gateway.config import (
    ConfigError,
    RewardModelConfig,
    load_config,
    parse_config,
    parse_reward_model_flag,
    with_overrides,
)
from bon_gateway.logs import configure_logging, log_phase
from bon_gateway.scoring.preflight import all_local, check_device, check_hub, check_path
from bon_gateway.scoring.worker.owner import (
    die_with_owner,
    exit_at_once_on_signals,
    remove_socket_dir_if_orphan,
)
from bon_gateway.scoring.worker.status import Serving, StartFailed, write_status

log = logging.getLogger("bon_gateway.worker")

#: Bounds of oneDNN's primitive cache and ideep's (torch's oneDNN wrapper) LRU of computations,
#: set before torch is imported (an operator's own values win). Each holds one entry per
#: input shape, and packed batches have a new token count nearly every time: with their
#: defaults (1,024 each) a worker's RSS grew from ~420 MiB to over 1.2 GiB within 600 varied
#: requests of a tiny model (issue 13, finding 11; bench/worker_rss.py) and kept growing.
#: With 16, RSS stays flat and scoring was no slower (the fused linears rebuild a primitive
#: for a new shape either way).
ONEDNN_CACHE_DEFAULTS = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "16", "LRU_CACHE_CAPACITY": "16"}


def bound_onednn_caches() -> None:
    for key, value in ONEDNN_CACHE_DEFAULTS.items():
        os.environ.setdefault(key, value)


#: printed before the message of a fatal start-up error, for an operator reading stderr
#: (the pool that spawned the worker gets the error on its status pipe instead)
ERROR_PREFIX = "bon-gateway worker: error: "


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bon-gateway worker", description="Serve RewardWorker over gRPC")
    p.add_argument("--listen", required=True, help="unix:PATH or HOST:PORT")
    p.add_argument("--config", type=Path, help="gateway TOML config; serve its reward_models")
    p.add_argument("--model", action="append", default=[], help="with --config: serve only this model")
    p.add_argument("--reward-model", action="append", default=[], metavar="NAME=PATH_OR_HF_ID")
    p.add_argument("--model-json", action="append", default=[], help="a reward_models entry as JSON")
    p.add_argument("--kind", choices=["auto", "judge", "causal_prm"])
    p.add_argument("--gguf-file")
    p.add_argument("--device")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--max-batch-tokens", type=int)
    p.add_argument("--max-wait-ms", type=float)
    p.add_argument("--max-length", type=int)
    p.add_argument("--truncate-prompt", action="store_true", default=None)
    p.add_argument(
        "--max-queue-tokens",
        type=int,
        help="shed load above this many queued tokens (default 64 x max_batch_tokens)",
    )
    p.add_argument(
        "--prefix-cache-bytes",
        type=int,
        help="bytes of prompt keys/values kept across requests (default 256 MiB; 0: off)",
    )
    p.add_argument(
        "--no-prefix-reuse",
        action="store_true",
        help="always recompute the shared prompt (and keep no prefix cache)",
    )
    p.add_argument("--threads", type=int, help="torch intra-op threads")
    p.add_argument("--parent-pid", type=int, help="exit when this process is gone")
    p.add_argument(
        "--status-fd",
        type=int,
        help="inherited pipe: write one JSON status line there (serving, or the start-up error)",
    )
    p.add_argument("--log-level", default="INFO")
    p.add_argument(
        "--log-format",
        choices=["text", "json"],
        default="text",
        help="json: one object per line (ts, level, logger, message, phase fields)",
    )
    return p


def model_entries(args: argparse.Namespace) -> list[RewardModelConfig]:
    entries: list[RewardModelConfig] = []
    if args.config is not None:
        config = load_config(args.config)
        wanted = set(args.model)
        entries += [m for m in config.reward_models if not wanted or m.name in wanted]
        missing = wanted - {m.name for m in entries}
        if missing:
            raise ConfigError(f"--model {sorted(missing)} not in {args.config}")
    if args.reward_model:
        # --reward-model NAME=PATH entries, with the model flags laid over them (one place:
        # config.with_overrides, as `serve` does; errors name the key).
        flagged = [
            dict(zip(("name", "path"), parse_reward_model_flag(f), strict=True)) for f in args.reward_model
        ]
        overrides = {
            f"reward_models.*.{key}": getattr(args, key)
            for key in (
                "kind",
                "gguf_file",
                "device",
                "dtype",
                "max_batch_tokens",
                "max_wait_ms",
                "max_length",
                "prefix_cache_bytes",
            )
        }
        overrides["reward_models.*.truncate_prompt"] = args.truncate_prompt
        entries += with_overrides(parse_config({"reward_models": flagged}), overrides).reward_models
    for text in args.model_json:
        entries.append(RewardModelConfig.model_validate_json(text))
    if not entries:
        raise ConfigError("no reward model: give --config, --reward-model NAME=PATH or --model-json")
    return entries


async def _parent_watch(parent: int, stop: asyncio.Event) -> None:
    # Co-located workers must not outlive the gateway, even when it is killed with -9.
    while not stop.is_set():
        if os.getppid() != parent:
            log_phase(log, "stop", logging.WARNING, reason="parent-gone")
            stop.set()
            return
        await asyncio.sleep(0.5)


async def serve(args: argparse.Namespace, entries: list[RewardModelConfig]) -> None:
    from bon_gateway.scoring.worker.loading import load_adapter
    from bon_gateway.scoring.worker.runtime import ModelRuntime
    from bon_gateway.scoring.worker.server import build_server

    runtimes: dict[str, ModelRuntime] = {}
    for entry in entries:
        if entry.backend != "workers":
            from bon_gateway.scoring.worker.loading import load_tokenizing_adapter
            from bon_gateway.scoring.worker.remote_runtime import RemoteRuntime

            remote = RemoteRuntime(
                entry,
                await asyncio.to_thread(load_tokenizing_adapter, entry),
                max_queue_tokens=args.max_queue_tokens,
            )
            await remote.start_backend()
            runtimes[entry.name] = remote
            continue
        check_device(entry)
        adapter = await asyncio.to_thread(load_adapter, entry)
        runtimes[entry.name] = ModelRuntime(
            entry, adapter, prefix_reuse=not args.no_prefix_reuse, max_queue_tokens=args.max_queue_tokens
        )
    for runtime in runtimes.values():
        runtime.batcher.start()
    server = await build_server(runtimes, args.listen)
    log_phase(log, "serving", listen=args.listen, models=",".join(runtimes), pid=os.getpid())
    if args.status_fd is not None:
        write_status(args.status_fd, Serving(args.listen, os.getpid(), tuple(runtimes)))
        args.status_fd = None  # one status per process: a later failure is a crash, seen by the pool
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    watch = asyncio.create_task(_parent_watch(args.parent_pid, stop)) if args.parent_pid else None
    await stop.wait()
    log_phase(log, "stopping")
    await server.stop(grace=5.0)
    if watch is not None:
        watch.cancel()
    for runtime in runtimes.values():
        await runtime.batcher.aclose()
        await runtime.aclose_backend()
    log_phase(log, "stopped")
    remove_socket_dir_if_orphan(args.listen, args.parent_pid)
    # The server has stopped and nothing is in flight: skip asyncio's and the interpreter's
    # teardown of torch and gRPC, which takes seconds and delays every shutdown and restart.
    logging.shutdown()
    sys.stderr.flush()
    os._exit(0)


def main(argv: list[str] | None = None) -> None:
    bound_onednn_caches()  # before anything imports torch
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.status_fd is not None:
        # Only this process holds the pipe: a child it might start must not keep it open,
        # or the pool would not see it close when this process dies.
        os.set_inheritable(args.status_fd, False)
    if args.parent_pid:
        die_with_owner(args.parent_pid)
    exit_at_once_on_signals(args.listen, args.parent_pid)
    configure_logging(args.log_level, args.log_format, sys.stderr)
    try:
        entries = model_entries(args)
        for entry in entries:
            check_path(entry)  # a missing local directory: one line at once, not the hub's retries
        if all_local(entries):
            os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported
        check_hub(entries)  # no network: cached models offline, else one line at once
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        asyncio.run(serve(args, entries))
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as err:  # start-up failures: the pool's status pipe, one clear line for the operator
        from bon_gateway.errors import BonError

        message = err.message if isinstance(err, BonError) else str(err) or type(err).__name__
        log.debug("start-up failure", exc_info=True)
        if args.status_fd is not None:
            # The pool that spawned it reports the error (once, with the model's name).
            write_status(args.status_fd, StartFailed(message))
        else:
            print(ERROR_PREFIX + message.replace("\n", " "), file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
