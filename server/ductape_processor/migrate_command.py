"""`ductape-processor migrate run|rollback|status|plan`: a database's migrations, through a running processor.

The command is a client of MigrationService (the processor that serves the product holds the pools, the secrets and
the lock), so it works the same against a sidecar or a shared service: `--address` (default 127.0.0.1:50051), and an
API key from `PROCESSOR_API_KEY` when the processor requires one.
"""

from __future__ import annotations

import argparse
import asyncio
import os


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The `migrate` sub-command and its four actions."""
    migrate = commands.add_parser("migrate", help="run, roll back, report or plan a database's migrations")
    migrate.add_argument("action", choices=("run", "rollback", "status", "plan"))
    migrate.add_argument("--address", default="127.0.0.1:50051", help="the processor (default 127.0.0.1:50051)")
    migrate.add_argument("--product", required=True)
    migrate.add_argument("--env", required=True, help="the environment's slug or name")
    migrate.add_argument("--database", required=True, help="the database's tag")
    migrate.add_argument("--tag", default="", help="run up to / roll back to this migration")
    migrate.add_argument("--steps", type=int, default=0, help="rollback: how many (default 1)")
    migrate.add_argument("--rollback", action="store_true", help="plan: plan a rollback")
    migrate.add_argument("--timeout", type=float, default=300.0, help="seconds the call may take (default 300)")


async def _migrate(args: argparse.Namespace) -> int:
    # The client's facade is imported here, by the command, not by the server that imports this module with the CLI.
    from ductape.processor import Processor, ProcessorError

    target = {"product": args.product, "env": args.env, "database": args.database, "timeout": args.timeout}
    async with Processor(args.address, api_key=os.environ.get("PROCESSOR_API_KEY") or None) as processor:
        client = processor.migration
        try:
            if args.action == "run":
                for run in await client.run(**target, tag=args.tag):
                    print(f"applied {run.tag} ({run.statements} statements, {run.duration_ms} ms)")
            elif args.action == "rollback":
                for run in await client.rollback(**target, steps=args.steps, tag=args.tag):
                    print(f"rolled back {run.tag} ({run.statements} statements, {run.duration_ms} ms)")
            elif args.action == "status":
                for item in await client.status(**target):
                    print(f"{item.state:<8} {item.tag}" + (f"  (applied {item.applied_at})" if item.applied_at else ""))
            else:
                plan = await client.plan(**target, tag=args.tag, rollback=args.rollback, steps=args.steps)
                for tag, statements in plan:
                    print(f"-- {tag}")
                    for sql in statements:
                        print(sql.rstrip().rstrip(";") + ";")
        except ProcessorError as exc:
            print(f"migrate {args.action}: {exc.reason}: {exc}")
            return 1
    return 0


def migrate(args: argparse.Namespace) -> int:
    """Run the `migrate` command; its exit status."""
    return asyncio.run(_migrate(args))
