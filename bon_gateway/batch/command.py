"""`bon-gateway batch`: the argument parser and the command.

Exit status: 0 when every input row is in the output; 3 when some rows failed
or were invalid (they are in the errors file; running the same command again
retries the failed ones); 1 when the engine or workers cannot start; 130 when
stopped by Ctrl-C / SIGTERM; 2 for bad arguments or config. Importing this
module is cheap: the runner, the engine and matplotlib load when the command runs.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

__all__ = ["add_batch_parser", "run_batch_command"]

EXIT_OK, EXIT_START_FAILED, EXIT_BAD_ARGS, EXIT_ROWS_FAILED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


def add_batch_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `batch` on the `bon-gateway` parser."""
    from bon_gateway.helpformat import DefaultsHelpFormatter

    p = subparsers.add_parser(
        "batch",
        help="offline Best-of-N over a JSONL file (resumable), preference pairs, step labels",
        description="Run Best-of-N over every row of a JSONL file. Rows already in --output are skipped, "
        "so the same command resumes an interrupted run.",
        formatter_class=DefaultsHelpFormatter,
    )
    io = p.add_argument_group("files")
    io.add_argument(
        "--input", type=Path, required=True, help="JSONL: {id, messages|prompt, reference} or GSM8K"
    )
    io.add_argument("--output", type=Path, required=True, help="JSONL results, appended (resumable)")
    io.add_argument("--errors", type=Path, help="JSONL of failed rows (default: OUTPUT.errors.jsonl)")
    io.add_argument(
        "--format",
        choices=("auto", "chat", "gsm8k"),
        default="auto",
        help="input rows: auto-detect (default), chat ({messages|prompt}) or GSM8K ({question, answer})",
    )
    io.add_argument("--limit", type=int, help="only the first LIMIT input rows")
    io.add_argument("--pairs", type=Path, help="write TRL preference pairs (prompt/chosen/rejected) here")
    io.add_argument(
        "--pairs-mode",
        choices=("best-worst", "all"),
        default="best-worst",
        help="best-worst: one pair per row; all: chosen vs every lower candidate (see --margin)",
    )
    io.add_argument("--margin", type=float, default=0.0, help="smallest reward gap of a pair (default 0)")
    io.add_argument(
        "--step-labels", type=Path, help="write TRL stepwise rows (prompt/completions/labels) here"
    )
    io.add_argument(
        "--step-threshold", type=float, default=0.5, help="a step is good when its reward >= this"
    )
    io.add_argument(
        "--step-delimiter", help="how answers split into steps (default: the reward model's, or \\n\\n)"
    )
    io.add_argument("--report", type=Path, help="report file: .html (figure + tables) or .png")
    io.add_argument("--summary-json", type=Path, help="also write the summary as JSON here")

    target = p.add_argument_group("gateway (one of)")
    where = target.add_mutually_exclusive_group(required=True)
    where.add_argument("--gateway-url", help="a running gateway, e.g. http://127.0.0.1:8080")
    where.add_argument("--config", type=Path, help="build the engine in this process from a serve config")
    target.add_argument("--generator-url", help="with --config: override generator.url")
    target.add_argument(
        "--api-key",
        default=os.environ.get("BON_GATEWAY_API_KEY"),
        help="with --gateway-url (default: $BON_GATEWAY_API_KEY)",
    )
    target.add_argument("--timeout", type=float, default=600.0, help="seconds per request (HTTP)")

    req = p.add_argument_group("Best-of-N request")
    req.add_argument("--best-of", type=int, default=4, help="candidates generated and ranked per row")
    req.add_argument("--reward-model", help="reward model name (default: the gateway's first)")
    req.add_argument(
        "--selection",
        choices=("argmax", "weighted_vote", "majority_vote"),
        default="argmax",
        help="how the selected candidate is picked",
    )
    req.add_argument(
        "--aggregation",
        choices=("last", "min", "prod", "mean"),
        default="last",
        help="a PRM's step rewards to one reward",
    )
    req.add_argument("--model", help="generator model name (default: the gateway's)")
    req.add_argument("--temperature", type=float, default=0.8, help="sampling temperature")
    req.add_argument("--top-p", type=float, help="nucleus sampling (default: the generator's)")
    req.add_argument("--max-tokens", type=int, default=256, help="tokens per candidate at most")
    req.add_argument("--seed", type=int, help="base seed: candidate i of every row samples with SEED + i")
    req.add_argument("--stop", action="append", default=[], help="stop sequence (repeatable)")

    run = p.add_argument_group("run")
    run.add_argument("--concurrency", type=int, default=4, help="rows in flight at once (default 4)")
    run.add_argument("--retries", type=int, default=2, help="retries of a row on 429/5xx/timeouts")
    run.add_argument(
        "--max-consecutive-failures", type=int, default=20,
        help="stop when this many rows fail in a row: the gateway is probably down (0 = never)",
    )  # fmt: skip
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument(
        "--no-fsync", action="store_true", help="do not fsync each output line (faster, less safe)"
    )
    run.add_argument("--log-level", default="WARNING", help="engine and worker log lines on stderr")


def _delimiter(args: argparse.Namespace, config: Any) -> str:
    if args.step_delimiter:
        return str(args.step_delimiter).encode("utf-8").decode("unicode_escape")
    if config is not None and config.reward_models:
        names = [m.name for m in config.reward_models]
        entry = (
            config.reward_model(args.reward_model) if args.reward_model in names else config.reward_models[0]
        )
        return str(entry.steps.delimiter)
    return "\n\n"


def run_batch_command(args: argparse.Namespace) -> int:
    """Run `bon-gateway batch` with parsed arguments; returns the exit status."""
    from bon_gateway.batch.clients import EngineClient, GatewayHttpClient
    from bon_gateway.batch.runner import BatchOptions
    from bon_gateway.config import load_config

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        logging.getLogger("httpx").setLevel(logging.WARNING)
        # engine/answers.py turns math-verify's signal-based timeouts off on purpose
        # (threads); its warning about that would interleave with the progress bar.
        logging.getLogger("math_verify").setLevel(logging.ERROR)
    if not args.input.is_file():
        print(f"bon-gateway batch: no input file {args.input}", file=sys.stderr)
        return EXIT_BAD_ARGS
    if args.best_of < 1 or args.concurrency < 1:
        print("bon-gateway batch: --best-of and --concurrency must be >= 1", file=sys.stderr)
        return EXIT_BAD_ARGS
    if args.report is not None and importlib.util.find_spec("matplotlib") is None:
        # Said before the run, not after hours of it: the report's plots need the batch extra.
        print(
            "bon-gateway batch: --report needs matplotlib: pip install 'bon-gateway[batch]'",
            file=sys.stderr,
        )
        return EXIT_BAD_ARGS
    config = None
    client: Any
    if args.config is not None:
        config = load_config(args.config)
        if args.generator_url:
            config = config.model_copy(
                update={"generator": config.generator.model_copy(update={"url": args.generator_url})}
            )
        client = EngineClient(config)
    else:
        client = GatewayHttpClient(
            args.gateway_url,
            api_key=args.api_key,
            timeout_s=args.timeout,
            max_connections=max(8, args.concurrency * 2),
        )
    options = BatchOptions(
        best_of=args.best_of,
        reward_model=args.reward_model,
        selection=args.selection,
        aggregation=args.aggregation,
        model=args.model,
        temperature=args.temperature,
        top_p=args.top_p,
        max_tokens=args.max_tokens,
        seed=args.seed,
        stop=tuple(args.stop),
        concurrency=args.concurrency,
        retries=args.retries,
        max_consecutive_failures=args.max_consecutive_failures,
        progress=not args.no_progress,
        fsync=not args.no_fsync,
    )
    errors = args.errors or args.output.with_name(args.output.name + ".errors.jsonl")
    return asyncio.run(_main(args, client, options, errors, _delimiter(args, config)))


async def _main(args: argparse.Namespace, client: Any, options: Any, errors: Path, delimiter: str) -> int:
    from bon_gateway.batch.clients import RequestFailed, check_reward_model
    from bon_gateway.batch.rows import read_items
    from bon_gateway.batch.runner import install_stop_signals, run_batch

    stop = asyncio.Event()
    undo = install_stop_signals(stop)
    try:
        starting = asyncio.create_task(client.start())
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if not starting.done():  # Ctrl-C while the reward workers were loading
            starting.cancel()
            await asyncio.gather(starting, return_exceptions=True)
            return EXIT_INTERRUPTED
        try:
            starting.result()
        except Exception as err:  # e.g. a reward model that cannot load
            print(f"bon-gateway batch: cannot start: {type(err).__name__}: {err}", file=sys.stderr)
            return EXIT_START_FAILED
        try:
            # Once, before the first row: a wrong --reward-model would fail every row.
            served = await client.served_models()
            reward_model = check_reward_model(served, options.reward_model, _where(args))
        except RequestFailed as err:
            print(f"bon-gateway batch: {err}", file=sys.stderr)
            return EXIT_START_FAILED
        produced_by = _produced_by(args, options, served.generator, reward_model)
        items = read_items(args.input, args.format, limit=args.limit)
        stats = await run_batch(items, client, args.output, errors, options, stop=stop)
    finally:
        undo()
        await client.aclose()
    # Exports and the report are rebuilt from the whole output file, so a resumed
    # run's pairs cover every row once, whatever run produced it.
    summary = await asyncio.to_thread(_finish, args, stats, errors, delimiter, produced_by)
    print(summary, flush=True)
    if stats.interrupted:
        return EXIT_INTERRUPTED
    return EXIT_ROWS_FAILED if stats.failed or stats.invalid else EXIT_OK


def _where(args: argparse.Namespace) -> str:
    return f"the gateway at {args.gateway_url}" if args.gateway_url else f"the config {args.config}"


def _produced_by(
    args: argparse.Namespace, options: Any, generator_model: str | None, reward_model: str
) -> dict[str, Any]:
    """What produced this run's rows, for the report and --summary-json."""
    from datetime import UTC, datetime

    from bon_gateway import __version__

    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "bon_gateway": __version__,
        "gateway": args.gateway_url or f"in-process engine ({args.config})",
        "generator": options.model or generator_model,
        "reward_model": reward_model,
        "best_of": options.best_of,
        "selection": options.selection,
        "aggregation": options.aggregation,
        "temperature": options.temperature,
        "top_p": options.top_p,
        "max_tokens": options.max_tokens,
        "seed": options.seed,
        "stop": list(options.stop) or None,
        "input": str(args.input),
        "output": str(args.output),
    }


def _finish(
    args: argparse.Namespace, stats: Any, errors: Path, delimiter: str, produced_by: dict[str, Any]
) -> str:
    from bon_gateway.batch.export import ExportCounts, preference_pairs, step_label_rows
    from bon_gateway.batch.io import atomic_write_jsonl, iter_jsonl
    from bon_gateway.batch.summary import compute_figures

    rows: dict[str, dict[str, Any]] = {}
    for row in iter_jsonl(args.output):
        if "candidates" in row:
            rows.setdefault(str(row.get("id")), row)
    figures = compute_figures(rows.values())
    this_run = [rows[i] for i in stats.finished_ids if i in rows]
    run_figures = compute_figures(this_run)
    lines = _summary_lines(stats, figures, errors, run_figures)
    report: dict[str, Any] = {
        "produced_by": produced_by,
        "run": _stats_dict(stats),
        "this_run": run_figures.as_dict(),
        "output": figures.as_dict(),
    }
    if args.pairs is not None:
        counts = ExportCounts()
        n = atomic_write_jsonl(
            args.pairs,
            preference_pairs(rows.values(), mode=args.pairs_mode, margin=args.margin, counts=counts),
        )
        lines.append(
            f"  pairs                {n} written to {args.pairs} ({counts.skipped_ties} rows gave none: "
            f"ties or gap < margin)"
        )
        report["pairs"] = {"written": n, "rows_without_pair": counts.skipped_ties}
    if args.step_labels is not None:
        counts = ExportCounts()
        n = atomic_write_jsonl(
            args.step_labels,
            step_label_rows(rows.values(), threshold=args.step_threshold, delimiter=delimiter, counts=counts),
        )
        lines.append(
            f"  step labels          {n} written to {args.step_labels} ({counts.skipped_no_steps} "
            "candidates without usable step rewards)"
        )
        report["step_labels"] = {"written": n, "candidates_skipped": counts.skipped_no_steps}
    if args.report is not None:
        from bon_gateway.batch.report import write_report

        write_report(
            args.report,
            figures,
            extra=_stats_dict(stats),
            title=f"bon-gateway batch: {args.input.name}",
            produced_by=produced_by,
            run_figures=run_figures,
            examples=this_run or list(rows.values()),
        )
        lines.append(f"  report               {args.report}")
    if args.summary_json is not None:
        from bon_gateway.batch.io import atomic_write_bytes

        atomic_write_bytes(args.summary_json, (json.dumps(report, indent=2) + "\n").encode("utf-8"))
    return "\n".join(lines)


def _stats_dict(stats: Any) -> dict[str, Any]:
    return {
        "input_rows": stats.input_rows,
        "skipped_already_done": stats.skipped,
        "done": stats.done,
        "failed": stats.failed,
        "invalid": stats.invalid,
        "retries": stats.retried,
        "interrupted": stats.interrupted,
        "gave_up": stats.gave_up,
        "seconds": round(stats.seconds, 3),
        "rows_per_second": round(stats.rows_per_second, 4),
        "completion_tokens_per_second": round(stats.completion_tokens / stats.seconds, 2)
        if stats.seconds
        else 0.0,
    }


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f} %"


def _accuracy_line(label: str, figures: Any, scope: str) -> str:
    return (
        f"  {label} selected {_pct(figures.accuracy(figures.correct_selected))}, "
        f"first {_pct(figures.accuracy(figures.correct_first))}, "
        f"oracle {_pct(figures.accuracy(figures.correct_oracle))} ({figures.with_reference} {scope})"
    )


def _summary_lines(stats: Any, figures: Any, errors: Path, run_figures: Any = None) -> list[str]:
    tok_rate = stats.completion_tokens / stats.seconds if stats.seconds else 0.0
    lines = [
        "batch summary" + (" (interrupted: run the same command to resume)" if stats.interrupted else ""),
        *([f"  stopped early        {stats.gave_up}"] if stats.gave_up else []),
        f"  input rows           {stats.input_rows}",
        f"  skipped (done)       {stats.skipped}",
        f"  done this run        {stats.done}",
        f"  failed this run      {stats.failed}" + (f"  (see {errors})" if stats.failed else ""),
        f"  invalid rows         {stats.invalid}" + (f"  (see {errors})" if stats.invalid else ""),
        f"  time                 {stats.seconds:.1f} s, {stats.rows_per_second:.3f} rows/s, "
        f"{tok_rate:.1f} completion tok/s",
        f"  output rows          {figures.rows} ({figures.candidates} candidates, all runs)",
    ]
    if figures.with_reference:
        lines.append(_accuracy_line("accuracy            ", figures, "rows, all runs"))
    if run_figures is not None and run_figures.with_reference and run_figures.rows != figures.rows:
        lines.append(_accuracy_line("accuracy, this run  ", run_figures, "rows"))
    if figures.gains:
        gain = sum(figures.gains) / len(figures.gains)
        best = sum(figures.selected_rewards) / len(figures.selected_rewards)
        first = sum(figures.first_rewards) / len(figures.first_rewards)
        lines.append(f"  mean reward          selected {best:.4f}, first {first:.4f}, gain {gain:+.4f}")
    return lines
