"""The `--help` formatter of the `bon-gateway` commands: every option with a default
shows it (argparse's ArgumentDefaultsHelpFormatter also prints "(default: None)" for
options without one, and a second default where the help already names it)."""

from __future__ import annotations

import argparse

__all__ = ["DefaultsHelpFormatter"]


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to an option's help when it has a real default."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        help_text = action.help or ""
        default = action.default
        if (
            action.option_strings
            and default not in (None, False, [], argparse.SUPPRESS)
            and "default" not in help_text
        ):
            help_text += " (default: %(default)s)"
        return help_text or None
