"""The `ragkit` command: registers the subcommands and `--version`; nothing else."""

from __future__ import annotations

from typing import Annotated

import typer

from ragkit import __version__


from ragkit.commands import embed as embed_cmd
from ragkit.commands import env as env_cmd
from ragkit.commands import eval as eval_cmd
from ragkit.commands import export as export_cmd
from ragkit.commands import generate as generate_cmd
from ragkit.commands import index as index_cmd
from ragkit.commands import prune as prune_cmd
from ragkit.commands import retro as retro_cmd
from ragkit.commands import selfrag as selfrag_cmd
from ragkit.commands import serve as serve_cmd
from ragkit.commands import train as train_cmd

app = typer.Typer(
    name="ragkit",
    help="Retrieval-augmented language models: embed, index, train, generate, evaluate.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"ragkit {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Data in and out as JSONL on stdin/stdout; progress and tables on stderr.

    Exit codes: 0 ok, 1 internal error, 2 usage, 3 invalid input data,
    4 missing or incompatible resource, 130 interrupted.
    """


app.command("embed")(embed_cmd.embed)
app.add_typer(index_cmd.app, name="index")
app.command("generate")(generate_cmd.generate)
app.add_typer(eval_cmd.app, name="eval")
train_cmd.register(app)
app.command("export")(export_cmd.export)
app.command("prune")(prune_cmd.prune)
app.add_typer(selfrag_cmd.app, name="selfrag")
app.add_typer(retro_cmd.app, name="retro")
app.command("serve")(serve_cmd.serve)
app.command("env")(env_cmd.env)


def main() -> None:
    """The `ragkit` program itself (console script, `python -m ragkit.cli`), as opposed to `app` run in-process."""
    import sys

    # typer >= 0.2x vendors click; its exception classes live there (typer re-exports only Exit and Abort)
    from typer._click import exceptions as click

    from ragkit.retrieval import loopback

    loopback.allow_reexec()
    try:
        code = app(standalone_mode=False, prog_name="ragkit")
    except click.NoArgsIsHelpError as exc:  # `ragkit index`: the help, as click would print it
        click.echo(exc.ctx.get_help() if exc.ctx else "", err=True)
        code = 2
    except click.UsageError as exc:  # a bad option value: one line, like every other ragkit error
        where = exc.ctx.command_path if exc.ctx else "ragkit"
        sys.stderr.write(f"Error: {exc.format_message()}\nHint: see `{where} --help`.\n")
        code = 2
    except typer.Abort:
        sys.stderr.write("Error: interrupted\n")
        code = 130
    except click.ClickException as exc:
        exc.show()
        code = exc.exit_code
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
